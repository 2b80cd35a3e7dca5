"""A worker's warm-up (mltasks.serving.warm): real PostgreSQL and Redis, the demo models.

It must leave the game's tables and cache as it found them, prepare what the first batch
would pay for, and never keep a worker from starting when a server is away.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from psycopg_pool import ConnectionPool

from mltasks.cache.client import Cache
from mltasks.cache.writes import STORE_SHA
from mltasks.config import Config
from mltasks.contract import ARCHETYPES
from mltasks.fallback.ladder import Level
from mltasks.keys import GAME_ACTION_PREFIX, WORKING_MEMORY_PREFIX
from mltasks.models.engine import get_engine
from mltasks.serving import warm
from tests import game


def _pool(conninfo: str) -> ConnectionPool:
    return ConnectionPool(conninfo, min_size=1, max_size=1, kwargs={"autocommit": True}, open=True)


def test_warm_up_prepares_and_leaves_everything_as_it_was(
    config: Config, pg: psycopg.Connection[Any], redis_cache: redis.Redis, models_dir: Path
) -> None:
    pending = game.insert(pg, [0.5] * 64)
    claimed = game.insert(pg, [0.4] * 64)
    game.claim(pg, claimed)
    cache = Cache(config)
    engine = get_engine(config, Level.CPU)
    pool = _pool(config.database.conninfo)
    try:
        took = warm.warm(config, pool, cache, engine, timeout_s=5)
        assert set(took) == {"models", "database", "cache"}
        assert pool.get_stats()["pool_available"] == 1  # the connection is open, idle
    finally:
        pool.close()
        cache.close()
    # Every archetype's sample rows were answered by the models, none left to 255.
    assert warm.warm_models(config, engine) == warm.ROWS_PER_ARCHETYPE * len(ARCHETYPES)
    # The game's tables: no answer written, no row's status or claim changed.
    assert pg.execute("SELECT count(*) FROM ai_responses").fetchone() == (0,)
    rows = dict(pg.execute("SELECT request_id, status FROM ai_requests").fetchall())
    assert rows == {pending: "pending", claimed: "processing"}
    # The cache: the write script is loaded, no L2 or L1 key written (the db also holds an
    # in-process worker's heartbeats, which are not the warm-up's).
    assert redis_cache.script_exists(STORE_SHA) == [True]
    assert redis_cache.keys(f"{GAME_ACTION_PREFIX}*") == []
    assert redis_cache.keys(f"{WORKING_MEMORY_PREFIX}*") == []


def test_the_token_is_never_a_claims() -> None:
    # bridge/loop.py claims with secrets.token_hex(16): 32 hex digits.
    assert len(warm.WARM_TOKEN) != 32 or not all(c in "0123456789abcdef" for c in warm.WARM_TOKEN)


def test_a_server_away_skips_its_step_only(
    config: Config, models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    away = "postgresql://postgres@127.0.0.1:1/nothing?connect_timeout=1"
    redis_away = dataclasses.replace(config.redis, url="redis://127.0.0.1:1/0")
    cache = Cache(dataclasses.replace(config, redis=redis_away))
    pool = _pool(away)
    try:
        with caplog.at_level(logging.WARNING, logger="mltasks.serving.warm"):
            took = warm.warm(config, pool, cache, get_engine(config, Level.CPU), timeout_s=0.5)
    finally:
        pool.close(timeout=0)
    assert set(took) == {"models"}
    failed = {
        getattr(r, "step", None)
        for r in caplog.records
        if getattr(r, "event", "") == "warm_up_failed"
    }
    assert failed == {"database", "cache"}
