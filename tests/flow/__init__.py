"""Flow tests: the service's parts on real PostgreSQL, Redis and Celery workers."""
