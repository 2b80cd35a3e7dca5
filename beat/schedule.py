"""What beat runs, and how often. Jobs run on the `cpu` queue's workers."""

from __future__ import annotations

from typing import Any

CLEANUP_TASK = "mltasks.cleanup"

SCHEDULE: dict[str, dict[str, Any]] = {
    # Finished rows must be gone long before request ids come round (2^31 ids).
    "cleanup-finished-requests": {
        "task": CLEANUP_TASK,
        "schedule": 60.0,
        "options": {"queue": "cpu", "expires": 55},
    },
}
