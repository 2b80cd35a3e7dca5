"""The worker's tasks: answer a batch at a fallback level; beat's periodic jobs.

Shared tasks: the app (`mltasks.celery`) includes this module and takes them, so the tasks
never import the app that runs them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import redis
from celery import Task, shared_task
from celery.signals import (
    celeryd_init,
    setup_logging,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
)
from psycopg_pool import ConnectionPool

from mltasks import keys, metrics
from mltasks.broker.celery_app import CANARY_TASK, CLEANUP_TASK, INFER_TASK, RECOVER_TASK
from mltasks.cache.client import get_cache, reset_cache
from mltasks.config import Config, get_config
from mltasks.errors import DatabaseError
from mltasks.fallback.ladder import QUEUE_LEVELS, Level
from mltasks.fallback.levels import LevelStore
from mltasks.fallback.rules import rules_engine
from mltasks.logs import configure_logging
from mltasks.models import canary as deploy_canary
from mltasks.models import served
from mltasks.models.engine import Engine, get_engine, reset_engine
from mltasks.models.fusion import rule_of
from mltasks.serving.answers import valid_request_id, write_answers
from mltasks.serving.inference import Outcome, answer_batch
from mltasks.serving.plan import Predictors
from mltasks.serving.records import Answer, Row, as_row, traditional
from mltasks.serving.worker import worker_queues
from mltasks.sql import query

log = logging.getLogger(__name__)

_pool: ConnectionPool | None = None
_store: LevelStore | None = None
_failing: set[int] = set()
# No bridge sends more (inference.batch_size is at most 128): a larger message is forged.
MAX_BATCH_ROWS = 1024
# The longest any task waits for a database connection (the pool's own default is 30 s).
DB_WAIT_MAX_S = 2.0


def _db_pool() -> ConnectionPool:
    """This process's connections, opened after the fork."""
    global _pool
    if _pool is None:
        _pool = ConnectionPool(
            get_config().database.conninfo,
            min_size=1,
            max_size=2,
            kwargs={"autocommit": True},
            open=True,
            timeout=DB_WAIT_MAX_S,
            name="mltasks-worker",
        )
    return _pool


def close_pool() -> None:
    global _pool, _store
    if _pool is not None:
        _pool.close()
        _pool = None
    _store = None
    _failing.clear()
    reset_cache()


def level_store() -> LevelStore:
    global _store
    if _store is None or _store.config is not get_config():
        _store = LevelStore(get_config())
    return _store


def predictors(config: Config, level: int) -> Predictors:
    """What serves a level: the ONNX engine (1-3) or the rule policy (4)."""
    if level == Level.RULES:
        return rules_engine(config.state.layout)
    return get_engine(config, level)


@celeryd_init.connect
def _metrics_endpoint(**_: Any) -> None:
    # The CLI worker's main process, before the fork: one /metrics for all its children.
    from mltasks.ops.exporter import start_worker_metrics

    m = get_config().monitoring
    start_worker_metrics(m.metrics_host, m.metrics_port)


def preload() -> None:
    """Load the models of this worker's queues now, not on the first batch."""
    cfg = get_config()
    for queue in worker_queues():
        levels = QUEUE_LEVELS.get(queue, ())
        if levels and levels[0] != Level.RULES:
            engine = get_engine(cfg, levels[0])
            count = len(engine.models)
            metrics.set_models_loaded(count)
            metrics.set_models_by_type(engine.loaded_types())
            served.publish(engine)
            try:
                level_store().publish_models(queue, count)
            except (redis.RedisError, OSError) as exc:  # status shows it as unknown
                log.warning(
                    "cannot publish the models loaded: %s",
                    exc,
                    extra={"event": "models_publish_failed"},
                )
    _initial_gauges(cfg)
    metrics.set_service_up(True)


def _initial_gauges(cfg: Config) -> None:
    """Every gauge a worker can give a value to has one from its first scrape: the
    deployment's cache hit rates (0 for a layer without lookups yet) and the shared level.
    ``ml_vram_usage_bytes`` is GPU-only: it appears where a probe reads a GPU."""
    from mltasks.cache.stats import LAYERS

    rates: dict[str, float] = dict.fromkeys(LAYERS, 0.0)
    try:
        rates.update({str(k): v for k, v in get_cache(cfg).hit_rates().items()})
        metrics.set_fallback_level(level_store().read().level)
    except (redis.RedisError, OSError):  # the monitor sets them once Redis answers
        pass
    metrics.set_cache_hit_rates(rates)


@worker_process_init.connect
def _after_fork(**_: Any) -> None:
    # Sessions and connections are per process: a prefork child makes its own.
    reset_engine()
    preload()


@worker_ready.connect
def _ready(sender: Any = None, **_: Any) -> None:
    # solo and threads pools run tasks in this very process: load here.
    pool = getattr(sender, "pool", None)
    if pool is not None and "prefork" not in type(pool).__module__:
        preload()


@worker_process_shutdown.connect
def _before_exit(**_: Any) -> None:
    from mltasks.ops.exporter import mark_process_dead

    close_pool()
    mark_process_dead(os.getpid())


@setup_logging.connect
def _logging(**_: Any) -> None:
    configure_logging(get_config().logging)


def report(config: Config, level: int, outcome: Outcome, lag_s: float | None) -> None:
    """Tell the fallback ladder how the batch went; never fails the batch itself."""
    from mltasks.fallback.probes import is_oom_error

    try:
        store = level_store()
        if level <= Level.CPU and not get_engine(config, level).models:
            store.degrade(Level.TRADITIONAL, "no usable model", from_level=level)
            return
        if outcome.failures:
            _failing.add(level)
            if any(is_oom_error(f) for f in outcome.failures):
                store.degrade(level + 1, "out of memory", from_level=level)
            else:
                store.report_failure(level, f"batch failed: {outcome.failures[0]}")
        elif (
            level == Level.CPU and lag_s is not None and lag_s * 1000 > config.fallback.queue_lag_ms
        ):
            _failing.add(level)
            store.report_failure(level, f"queue lag {lag_s * 1000:.0f} ms")
        elif level in _failing:
            _failing.discard(level)
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
    engine = predictors(cfg, level)
    if isinstance(engine, Engine):
        deploy_canary.refresh(engine)  # between batches: deployed versions swap in here
    lookup = level in cfg.caching.lookup_levels
    outcome = answer_batch(batch, engine, cache, rule_of(cfg), lookup)
    try:
        with _db_pool().connection(timeout=_pool_wait_s(cfg, now, created)) as conn:
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
        deploy_canary.submit_shadows(
            outcome.shadow, cfg.models.dir, cfg.canary, level_store().redis
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
        return min(max(0.05, min(created) + limit - now), DB_WAIT_MAX_S)
    return min(max(0.05, limit), DB_WAIT_MAX_S)


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
        with _db_pool().connection(timeout=DB_WAIT_MAX_S) as conn:
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
