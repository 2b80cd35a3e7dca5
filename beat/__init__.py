"""Celery beat's schedule: periodic jobs of the service (``celery -A mltasks beat``)."""

from beat.schedule import SCHEDULE

__all__ = ["SCHEDULE"]
