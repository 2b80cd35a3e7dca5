"""The batch task: validate, infer and answer every row of a batch the bridge sent.

A shared task: the app (`mltasks.celery`) includes this module and takes it, so the task
never imports the app that runs it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import psycopg
from celery import Task, shared_task

from mltasks import metrics
from mltasks.broker.celery_app import INFER_TASK
from mltasks.cache.client import get_cache
from mltasks.config import Config, get_config
from mltasks.errors import DatabaseError
from mltasks.fallback.ladder import Level
from mltasks.models import shadow as deploy_shadow
from mltasks.models.engine import Engine, get_engine
from mltasks.models.fusion import rule_of
from mltasks.serving import process
from mltasks.serving.answers import valid_request_id, write_answers
from mltasks.serving.inference import Outcome, answer_batch
from mltasks.serving.records import Answer, Row, as_row, traditional

log = logging.getLogger(__name__)

# No bridge sends more (inference.batch_size is at most 128): a larger message is forged.
MAX_BATCH_ROWS = 1024


def report(config: Config, level: int, outcome: Outcome, lag_s: float | None) -> None:
    """Tell the fallback ladder how the batch went; never fails the batch itself."""
    from mltasks.fallback.probes import is_oom_error

    try:
        store = process.level_store()
        if level <= Level.CPU and not get_engine(config, level).models:
            store.degrade(Level.TRADITIONAL, "no usable model", from_level=level)
            return
        if outcome.failures:
            process.failing.add(level)
            if any(is_oom_error(f) for f in outcome.failures):
                store.degrade(level + 1, "out of memory", from_level=level)
            else:
                store.report_failure(level, f"batch failed: {outcome.failures[0]}")
        elif (
            level == Level.CPU and lag_s is not None and lag_s * 1000 > config.fallback.queue_lag_ms
        ):
            process.failing.add(level)
            store.report_failure(level, f"queue lag {lag_s * 1000:.0f} ms")
        elif level in process.failing:
            process.failing.discard(level)
            store.report_success(level)
    except Exception as exc:  # Redis away: the answers matter more than the bookkeeping
        log.warning(
            "cannot report to the fallback ladder: %s", exc, extra={"event": "report_failed"}
        )


# Acknowledged on receipt, not after the work (acks_late would cost kombu an unacked index
# and an ack per batch, to redeliver a lost batch after the visibility timeout: thousands
# of times the game's deadline). A batch lost with its worker is answered by the bridge,
# 255 `lost`, at 80% of the deadline, and by the lease (inference.lease_ms) at the latest.
@shared_task(
    name=INFER_TASK,
    bind=True,
    acks_late=False,
    reject_on_worker_lost=False,
    ignore_result=True,
    max_retries=2,
)
def infer_batch(
    self: Task,
    rows: list[Any],
    level: int = Level.CPU,
    sent_at: float = 0.0,
    created: list[float] | None = None,
    claim: str | None = None,
) -> int:
    """Validate, infer and answer every row of a batch; returns how many were answered.

    ``sent_at`` (the bridge's clock) gives the queue lag, ``created`` each row's
    created_at for end-to-end latency, ``claim`` the token of the claim that took the
    rows: only rows claimed with it are answered (a forged message answers nothing).
    """
    now = time.time()
    lag_s = now - sent_at if sent_at else None
    cfg = get_config()
    batch, created = _well_formed(rows, created)
    stale: list[Answer] = []
    if created and len(created) == len(batch):
        # Past the bridge's rescue point the bridge answers these 255 (and the game soon
        # gives up on them): inferring them would only delay the live ones.
        limit = cfg.inference.rescue_after_s
        keep = [i for i, c in enumerate(created) if now - c <= limit]
        if len(keep) < len(batch):
            kept = set(keep)
            stale = [
                traditional(r.request_id, "deadline", status="expired")
                for i, r in enumerate(batch)
                if i not in kept
            ]
            batch = [batch[i] for i in keep]
            created = [created[i] for i in keep]
    cache = get_cache(cfg) if level <= Level.CPU and cfg.caching.enabled else None
    engine = process.predictors(cfg, level)
    if isinstance(engine, Engine):
        deploy_shadow.refresh(engine)  # between batches: deployed versions swap in here
    lookup = level in cfg.caching.lookup_levels
    # Redis known away (the cache's breaker is not closed): no look at the heartbeats;
    # in doubt the states are written, which the breaker itself skips while it is open.
    write_states = cache is not None and (
        cache.breaker.state != "closed" or process.histories_read(cfg, level)
    )
    outcome = answer_batch(
        batch,
        engine,
        cache,
        rule_of(cfg),
        lookup,
        write_actions=cfg.caching.write_actions,
        write_states=write_states,
    )
    try:
        with process.db_pool().connection(timeout=_pool_wait_s(cfg, now, created)) as conn:
            accepted = write_answers(conn, [*outcome.answers, *stale], claim)
    except (DatabaseError, psycopg.Error) as exc:
        log.warning(
            "writing %d answers failed: %s",
            len(outcome.answers),
            exc,
            extra={"event": "answer_write_failed", "task_id": self.request.id},
        )
        # Unanswered rows are expired by the bridge once their lease runs out.
        raise self.retry(exc=exc, countdown=0.05) from exc
    if accepted.issuperset(a.request_id for a in outcome.answers):
        outcome.remember()
    else:  # answered meanwhile (a lost batch rescued by the bridge), replayed or forged:
        # nothing of it reaches the cache
        log.info(
            "%d of %d answers refused (not claimed with this token, or answered already)",
            len(outcome.answers) + len(stale) - len(accepted),
            len(outcome.answers) + len(stale),
            extra={"event": "answers_refused", "task_id": self.request.id},
        )
    if outcome.shadow:  # after the answers: the game never waits for a candidate
        deploy_shadow.submit_shadows(
            outcome.shadow, cfg.models.dir, cfg.canary, process.level_store().redis
        )
    metrics.observe_batch(len(batch))
    metrics.observe_fusion(outcome.fused)
    metrics.observe_answers(
        metrics.count_outcomes(outcome.answers), metrics.seconds_since(created or ())
    )
    if stale:
        metrics.observe_answers({"expired": len(stale)}, [])
    if level < Level.TRADITIONAL:
        report(cfg, level, outcome, lag_s)
    return len(outcome.answers) + len(stale)


def _well_formed(rows: Any, created: list[float] | None) -> tuple[list[Row], list[float] | None]:
    """The rows that can be answered at all (a list with a request_id a row can have), as
    ``Row`` records: msgpack hands the task plain lists, typed here, at the boundary.

    Anything else in a broker message (an id out of integer range, a row that is not a
    list) is dropped here, alone: it never costs the other rows their answer. What a row
    holds beyond its id is validated later (255 with a reason, never a crash).
    """
    if not isinstance(rows, list) or len(rows) > MAX_BATCH_ROWS:
        if isinstance(rows, list):  # no bridge sends that much: its rows get their lease
            log.warning(
                "dropped a batch of %d rows (at most %d)",
                len(rows),
                MAX_BATCH_ROWS,
                extra={"event": "batch_oversized"},
            )
        rows = []
    keep = [
        i
        for i, r in enumerate(rows)
        if isinstance(r, (list, tuple)) and len(r) >= 4 and valid_request_id(r[0])
    ]
    if len(keep) < len(rows):
        log.warning(
            "dropped %d malformed rows of a batch of %d",
            len(rows) - len(keep),
            len(rows),
            extra={"event": "rows_malformed"},
        )
        aligned = created is not None and len(created) == len(rows)
        created = [created[i] for i in keep] if aligned and created is not None else None
    return [as_row(rows[i]) for i in keep], created


def _pool_wait_s(cfg: Config, now: float, created: list[float] | None) -> float:
    """How long a batch may wait for a database connection: until its rows' deadline
    (an answer later than that is wasted), a little at least, never psycopg_pool's 30 s."""
    limit = cfg.inference.max_latency_ms / 1000
    if created:
        return min(max(0.05, min(created) + limit - now), process.DB_WAIT_MAX_S)
    return min(max(0.05, limit), process.DB_WAIT_MAX_S)
