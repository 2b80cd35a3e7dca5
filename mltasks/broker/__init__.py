"""How a batch travels from the bridge to a worker: the Celery app, its settings, the queues
(one per tier of the fallback ladder) and kombu's Redis transport, trimmed."""
