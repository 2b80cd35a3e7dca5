"""Beat's periodic jobs (cleanup, recovery) and the recovery canary they send.

Shared tasks, as `mltasks.serving.batch`; two beats never run one job at once (`job_lock`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from celery import shared_task

from mltasks import keys
from mltasks.broker.celery_app import CANARY_TASK, CLEANUP_TASK, RECOVER_TASK
from mltasks.config import get_config
from mltasks.serving.inference import answer_batch
from mltasks.serving.process import DB_WAIT_MAX_S, db_pool, level_store, predictors
from mltasks.sql import query

log = logging.getLogger(__name__)


@shared_task(name=CANARY_TASK, ignore_result=True, acks_late=True)
def canary(canary_id: str, level: int) -> bool:
    """A recovery probe: answer synthetic states at `level` and lift the level if all is well."""
    from mltasks.fallback.recovery import canary_passed, canary_rows, finish_canary

    cfg = get_config()
    try:
        passed, reason = canary_passed(
            answer_batch(canary_rows(cfg.state.layout), predictors(cfg, level)), level
        )
    except Exception as exc:
        passed, reason = False, f"canary crashed: {exc}"
    return finish_canary(cfg, level_store(), canary_id, level, passed, reason)


@contextmanager
def job_lock(job: str, ttl_s: float) -> Iterator[bool]:
    """True when this run holds the job: two beats never run one job twice at once."""
    r = level_store().redis
    key = keys.job_lock(job)
    token = str(time.time())
    held = bool(r.set(key, token, nx=True, px=int(ttl_s * 1000)))
    try:
        yield held
    finally:
        if held and r.get(key) == token.encode():
            r.delete(key)


@shared_task(name=RECOVER_TASK, ignore_result=True)
def recover() -> str:
    """Beat: try one level up when the tier above has been healthy long enough."""
    from mltasks.fallback.recovery import attempt

    cfg = get_config()
    with job_lock("recover", 10) as held:
        if not held:
            return "locked"

        def send(canary_id: str, level: int, queue: str) -> None:
            canary.apply_async(
                args=[canary_id, level], queue=queue, expires=cfg.fallback.canary_timeout_s
            )

        return attempt(cfg, level_store(), send).outcome


@shared_task(name=CLEANUP_TASK, ignore_result=True, acks_late=True)
def cleanup() -> int:
    """Beat: delete finished rows past the retention, batch by batch; returns rows deleted."""
    config = get_config()
    cfg, experience = config.cleanup, config.experience
    # While experience is recorded, rows the recorder has not read yet wait for it
    # (at most experience.hold_s longer).
    statement, hold = "delete_finished", {}
    if experience.enabled:
        statement, hold = "delete_finished_recorded", {"hold_s": experience.hold_s}
    total = 0
    with job_lock("cleanup", 300) as held:
        if not held:
            return 0
        with db_pool().connection(timeout=DB_WAIT_MAX_S) as conn:
            while True:
                cur = conn.execute(
                    query(statement),
                    {"retention_s": cfg.retention_s, "limit": cfg.batch_limit, **hold},
                )
                total += cur.rowcount
                if cur.rowcount < cfg.batch_limit:
                    break
    if total:
        log.info("deleted %d finished requests", total, extra={"event": "cleanup", "rows": total})
    return total
