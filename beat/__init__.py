"""Celery beat's schedule: periodic jobs of the service (``celery -A mltasks beat``)."""

from beat.schedule import SCHEDULE, Scheduler

__all__ = ["SCHEDULE", "Scheduler"]
