"""Celery's remote control channel for model versions: ``mltasks_models <model> <version>
<action>`` tells every worker that a pointer changed, so it reads the pointers before its next
batch instead of at its next look (the generation file).

Kept apart from the canary (`mltasks.models.shadow`, which registers the worker's side) so
that the operator's ``models deploy | rollback`` loads neither numpy nor the worker's
bootsteps just to send one message: on a loaded host every CPU second of the command is a
second the operator waits (docs/PERFORMANCE.md, "The operator's rollback on a busy host").
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

COMMAND = "mltasks_models"
REPLY_TIMEOUT_S = 1.0
# A worker that beat this recently is waited for (its heartbeat: fallback.heartbeat_interval_ms).
LIVE_WITHIN_S = 5.0


def broadcast(app: Any, model: str, version: str, action: str, reply: bool = False) -> list[Any]:
    """Tell every worker; with ``reply``, the replies, once every live worker answered or
    after `REPLY_TIMEOUT_S`. A failure is logged and ends here: the pointer already changed
    and the generation file still tells the workers."""
    try:
        replies = app.control.broadcast(
            COMMAND,
            arguments={"model": model, "version": version, "action": action},
            reply=reply,
            timeout=REPLY_TIMEOUT_S,
            # Stop waiting once every live worker answered, not at the timeout.
            limit=(live_workers() or None) if reply else None,
        )
    except Exception as exc:
        log.warning("control broadcast failed: %s", exc, extra={"event": "broadcast_failed"})
        return []
    return list(replies or [])


def live_workers() -> int:
    """Worker nodes with a fresh heartbeat on any queue (0 when Redis cannot say)."""
    from mltasks.config import get_config
    from mltasks.fallback.ladder import QUEUES
    from mltasks.fallback.registry import WorkerRegistry
    from mltasks.redisurl import cache_client

    try:
        return len(WorkerRegistry(cache_client(get_config())).live(QUEUES, LIVE_WITHIN_S))
    except Exception:
        return 0
