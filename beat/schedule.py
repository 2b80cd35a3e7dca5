"""What beat runs, and how often (``celery -A mltasks beat``).

Jobs go to the CPU tier's queue (`mltasks.fallback.ladder.JOBS_QUEUE`). Each takes a Redis
lock, so two beats started by mistake never run a job twice at once. Health probes are not
here: every worker probes its own host (mltasks/serving/monitor.py), since VRAM can only be
read where the GPU is.

The app names ``Scheduler`` in its ``beat_scheduler`` setting (a string, as Celery names its
pluggable classes), so ``celery -A mltasks beat`` gets this schedule while the core never
imports this package.
"""

from __future__ import annotations

from typing import Any

from celery.beat import PersistentScheduler

from mltasks.broker.celery_app import CLEANUP_TASK, RECOVER_TASK
from mltasks.fallback.ladder import JOBS_QUEUE

SCHEDULE: dict[str, dict[str, Any]] = {
    # Finished rows must be gone long before request ids come round (2^31 ids).
    "cleanup-finished-requests": {
        "task": CLEANUP_TASK,
        "schedule": 60.0,
        "options": {"queue": JOBS_QUEUE, "expires": 55},
    },
    # One step up the fallback ladder when the tier above is healthy again.
    "recover-fallback-level": {
        "task": RECOVER_TASK,
        "schedule": 5.0,
        "options": {"queue": JOBS_QUEUE, "expires": 4},
    },
}


class Scheduler(PersistentScheduler):  # type: ignore[misc]
    """Celery's persistent scheduler (the ``--schedule`` file) with ``SCHEDULE`` merged in."""

    def setup_schedule(self) -> None:
        self.app.conf.beat_schedule = {**SCHEDULE, **(self.app.conf.beat_schedule or {})}
        super().setup_schedule()
