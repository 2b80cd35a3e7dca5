"""A worker's first batch as cheap as its thousandth: what the first batch would pay for
once, paid before the worker takes work (as Triton's ``model_warmup`` does for a model).

Measured here (docs/PERFORMANCE.md, 2026-12-07 afternoon): a fresh worker's first batch of
15 rows took 12-15 ms of wall time and its second about 8, against 5.5-6 and 4.5 after this
warm-up (later batches about 2.5). The database connection (the pool opens it on first
use), the answer statement's first run in a fresh PostgreSQL backend (its catalog and
plan), the deploy pointers' first read and the answering path's first run are each a few
ms. The bulk benchmark's first second showed no difference through its noise: this is for
a restarted or deployed worker's first batches, not for throughput.

Nothing here answers or caches anything real: the models see sample states and their
answers are dropped; the answer statement runs with a token no claim ever has
(`WARM_TOKEN`), so it matches no row; the cache only connects and loads its script.
Each step may fail (PostgreSQL or Redis away at start): it is logged and the worker
starts all the same, cold.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from psycopg_pool import ConnectionPool

from mltasks.cache.client import Cache
from mltasks.config import Config
from mltasks.contract import ARCHETYPES
from mltasks.errors import MLTasksError
from mltasks.models import shadow as deploy_shadow
from mltasks.models.engine import Engine
from mltasks.models.fusion import rule_of
from mltasks.serving.answers import ID_MAX, write_answers
from mltasks.serving.inference import answer_batch
from mltasks.serving.plan import Predictors
from mltasks.serving.records import Row, traditional
from mltasks.state import sample_states

log = logging.getLogger(__name__)

# Claim tokens are 32 hex digits (bridge/loop.py, secrets.token_hex(16)): this is never one.
WARM_TOKEN = "warm-up"
ROWS_PER_ARCHETYPE = 2


def warm_rows(config: Config) -> list[Row]:
    """Sample states of every archetype, as a batch the bridge could have sent."""
    rng = np.random.default_rng(0)
    states = sample_states(rng, ROWS_PER_ARCHETYPE * len(ARCHETYPES), config.state.layout)
    return [
        Row(ID_MAX - i, ARCHETYPES[i % len(ARCHETYPES)], None, state)
        for i, state in enumerate(states.tolist())
    ]


def warm_models(config: Config, engine: Predictors) -> int:
    """Run the answering path once on sample rows (no cache, nothing written); returns
    how many rows it answered with a model."""
    if isinstance(engine, Engine):
        deploy_shadow.refresh(engine)  # the deploy pointers' first read
    outcome = answer_batch(
        warm_rows(config), engine, None, rule_of(config), lookup=False, observe=False
    )
    return sum(1 for a in outcome.answers if a.action_id != 255)


def warm_database(pool: ConnectionPool, timeout_s: float) -> None:
    """Open the pool's connection and run the answer statement once in its backend: it
    touches no row (`WARM_TOKEN`)."""
    pool.wait(timeout_s)
    with pool.connection(timeout=timeout_s) as conn:
        write_answers(conn, [traditional(ID_MAX, "warm_up")], WARM_TOKEN)


def warm_cache(cache: Cache) -> None:
    """Connect and load the write script; the cache's breaker keeps Redis's error."""
    if not cache.warm():
        raise MLTasksError("Redis is unavailable (the cache's breaker has the error)")


def warm(
    config: Config,
    pool: ConnectionPool,
    cache: Cache | None,
    engine: Predictors | None,
    timeout_s: float,
) -> dict[str, float]:
    """Each step once, timed (ms); a step that fails is logged and skipped."""
    took: dict[str, float] = {}
    steps = [
        ("models", None if engine is None else (lambda: warm_models(config, engine))),
        ("database", lambda: warm_database(pool, timeout_s)),
        ("cache", None if cache is None else (lambda: warm_cache(cache))),
    ]
    for name, step in steps:
        if step is None:
            continue
        started = time.perf_counter()
        try:
            step()
        except Exception as exc:  # the worker starts cold rather than not at all
            log.warning(
                "warm-up of the %s skipped: %s",
                name,
                exc,
                extra={"event": "warm_up_failed", "step": name},
            )
            continue
        took[name] = round((time.perf_counter() - started) * 1000, 2)
    log.debug(  # once a process; at INFO it would land among the first batches' lines
        "warmed up: %s",
        ", ".join(f"{k} {v} ms" for k, v in took.items()) or "nothing",
        extra={"event": "worker_warmed", **{f"{k}_ms": v for k, v in took.items()}},
    )
    return took
