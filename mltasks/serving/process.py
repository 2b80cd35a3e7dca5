"""What one worker process holds: its database pool, its view of the fallback level, its
models; made after the fork (Celery's signals), closed when the process exits.

Prefork children, and the main process of a solo or threads pool, each make their own:
sessions and sockets never cross a fork.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import redis
from celery.signals import (
    celeryd_init,
    setup_logging,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
)
from psycopg_pool import ConnectionPool

from mltasks import keys, metrics
from mltasks.cache.client import get_cache, reset_cache
from mltasks.config import Config, get_config
from mltasks.fallback.ladder import LEVEL_QUEUE, MODEL_LEVELS, QUEUE_LEVELS, Level
from mltasks.fallback.levels import LevelStore
from mltasks.fallback.registry import WorkerRegistry
from mltasks.fallback.rules import rules_engine
from mltasks.heap import freeze_startup_objects
from mltasks.logs import configure_logging
from mltasks.models import served
from mltasks.models.engine import get_engine, reset_engine
from mltasks.models.family import FAMILY
from mltasks.serving.bootsteps import worker_queues
from mltasks.serving.plan import Predictors
from mltasks.serving.warm import warm

log = logging.getLogger(__name__)

_pool: ConnectionPool | None = None
_store: LevelStore | None = None
# Levels whose batches failed in this process: a success there is reported once.
failing: set[int] = set()
# The longest any task waits for a database connection (the pool's own default is 30 s).
DB_WAIT_MAX_S = 2.0
# How long a worker trusts its last look at whether a tier that reads L1 histories is alive.
HISTORY_READERS_RECHECK_S = 1.0
# The last look: (config, level, its monotonic time, whether the level's states are read).
_readers_seen: tuple[Config | None, int, float, bool] = (None, 0, 0.0, True)


def db_pool() -> ConnectionPool:
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
    global _pool, _store, _readers_seen
    if _pool is not None:
        _pool.close()
        _pool = None
    _store = None
    _readers_seen = (None, 0, 0.0, True)
    failing.clear()
    reset_cache()


def level_store() -> LevelStore:
    global _store
    if _store is None or _store.config is not get_config():
        _store = LevelStore(get_config())
    return _store


def history_queues(config: Config) -> frozenset[str]:
    """The queues whose level's fusion has a sequence type: their workers read L1."""
    return frozenset(
        LEVEL_QUEUE[level]
        for level in MODEL_LEVELS
        if any(FAMILY[t].input == "sequence" for t in config.models.fusion.for_level(level))
    )


def histories_read(config: Config, level: int) -> bool:
    """Whether a batch of ``level`` should push its states to L1: a worker that reads them
    can exist. Its own queue's fusion reads histories, or a live worker (heartbeat) serves
    a queue whose fusion does: by default the GPU tier, which a level-3 batch keeps warm for
    the climb back. Where none does (a CPU-only deployment) the states were the batch's one
    cache write, read by nobody. Looked at again every HISTORY_READERS_RECHECK_S; in doubt
    (Redis away), written."""
    global _readers_seen
    seen_config, seen_level, seen_at, wanted = _readers_seen
    now = time.monotonic()
    if seen_config is config and seen_level == level and now - seen_at < HISTORY_READERS_RECHECK_S:
        return wanted
    readers = history_queues(config)
    if LEVEL_QUEUE.get(level) in readers:
        wanted = True
    elif not readers:
        wanted = False
    else:
        beats = [keys.heartbeat(q) for q in sorted(readers)]
        try:
            wanted = bool(level_store().redis.exists(*beats))
        except (redis.RedisError, OSError):
            wanted = True
    _readers_seen = (config, level, now, wanted)
    return wanted


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
    """Load the models of this worker's queues now, and warm up (mltasks.serving.warm):
    nothing of it waits for the first batch. First, what starting made leaves the
    collector's full passes (`mltasks.heap`); the models, loaded after, stay in them."""
    freeze_startup_objects()
    cfg = get_config()
    queues = worker_queues()
    for queue in queues:
        levels = QUEUE_LEVELS.get(queue, ())
        if levels and levels[0] != Level.RULES:
            engine = get_engine(cfg, levels[0])
            engine.merge_all()  # one session per archetype's members, before the first batch
            count = len(engine.models)
            metrics.set_models_loaded(count)
            metrics.set_models_by_type(engine.loaded_types())
            served.publish(engine)
            try:
                WorkerRegistry(level_store().redis).publish_models(queue, count)
            except (redis.RedisError, OSError) as exc:  # status shows it as unknown
                log.warning(
                    "cannot publish the models loaded: %s",
                    exc,
                    extra={"event": "models_publish_failed"},
                )
    _initial_gauges(cfg)
    level = min((QUEUE_LEVELS[q][0] for q in queues if q in QUEUE_LEVELS), default=None)
    if level is not None:
        cached = cfg.caching.enabled and level <= Level.CPU
        cache = get_cache(cfg) if cached else None
        warm(cfg, db_pool(), cache, predictors(cfg, level), DB_WAIT_MAX_S)
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
