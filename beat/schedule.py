"""What beat runs, and how often (``celery -A mltasks beat``).

Jobs go to the `cpu` queue. Each takes a Redis lock, so two beats started by mistake
never run a job twice at once. Health probes are not here: every worker probes its own
host (mltasks/worker.py), since VRAM can only be read where the GPU is.
"""

from __future__ import annotations

from typing import Any

CLEANUP_TASK = "mltasks.cleanup"
RECOVER_TASK = "mltasks.recover"
CANARY_TASK = "mltasks.canary"

SCHEDULE: dict[str, dict[str, Any]] = {
    # Finished rows must be gone long before request ids come round (2^31 ids).
    "cleanup-finished-requests": {
        "task": CLEANUP_TASK,
        "schedule": 60.0,
        "options": {"queue": "cpu", "expires": 55},
    },
    # One step up the fallback ladder when the tier above is healthy again.
    "recover-fallback-level": {
        "task": RECOVER_TASK,
        "schedule": 5.0,
        "options": {"queue": "cpu", "expires": 4},
    },
}
