"""``mltasks status``: every indicator read from real PostgreSQL and Redis, the verdict and
its exit code (0 healthy, 1 degraded, 2 unreachable), as a table and as JSON.

The tests use Redis db 15 for both cache and broker: the session's in-process worker
beats and probes into db 12, and its heartbeats must not make a queue look live here.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
import redis

from mltasks import keys
from mltasks.cache.stats import stats_key, stats_scope
from mltasks.config import Config
from mltasks.fallback.ladder import QUEUES
from mltasks.fallback.levels import LevelStore
from mltasks.fallback.registry import WorkerRegistry
from mltasks.ops import status

STATUS_DB = 15
ALL_QUEUES = list(QUEUES)
CPU_HOST: dict[str, Any] = {
    "gpu_present": False,
    "vram_used_bytes": None,
    "vram_total_bytes": None,
    "cpu_load_per_core": 0.4,
    "ram_used_fraction": 0.3,
    "queue_lag_s": None,
    "taken_at": 0.0,
    "gpu_status": "no GPU",
    "models_loaded": 18,  # the default level-3 fusion: 3 types x 6 archetypes
}
GPU_HOST = dict(
    CPU_HOST,
    models_loaded=54,
    gpu_present=True,
    vram_used_bytes=2 << 30,
    vram_total_bytes=8 << 30,
    gpu_status="ok",
)


@pytest.fixture
def cfg(config: Config) -> Config:
    """The test database, Redis db 15 for the cache and the broker, a 2 s deadline."""
    return dataclasses.replace(
        config,
        redis=dataclasses.replace(config.redis, cache_db=STATUS_DB, broker_db=STATUS_DB),
        inference=dataclasses.replace(config.inference, max_latency_ms=2000),
    )


@pytest.fixture
def r(cfg: Config) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(cfg.redis.db_url(STATUS_DB))
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def store(cfg: Config, r: redis.Redis) -> LevelStore:
    return LevelStore(cfg, r)


def answered(pg: psycopg.Connection[Any], n: int, latency_s: float, action: int = 3) -> None:
    """``n`` requests made 5 s ago, answered ``latency_s`` later."""
    pg.execute(
        """
        WITH r AS (
            INSERT INTO ai_requests (monster_id, mob_id, archetype, status, created_at)
            SELECT g, 1002, 'aggressive', 'completed', clock_timestamp() - interval '5 s'
            FROM generate_series(1, %(n)s) AS g
            RETURNING request_id, created_at
        )
        INSERT INTO ai_responses (request_id, action_id, confidence, source, created_at)
        SELECT request_id, %(action)s, 0.9, 'model',
               created_at + make_interval(secs => %(latency_s)s)
        FROM r
        """,
        {"n": n, "latency_s": latency_s, "action": action},
    )


def pending(pg: psycopg.Connection[Any], age_s: float) -> None:
    pg.execute(
        "INSERT INTO ai_requests (monster_id, mob_id, archetype, created_at) "
        "VALUES (1, 1002, 'aggressive', clock_timestamp() - make_interval(secs => %s))",
        (age_s,),
    )


def healthy_cpu_host(store: LevelStore, r: redis.Redis, pg: psycopg.Connection[Any]) -> None:
    """A CPU-only host serving at level 3 with all models, fast answers, some cache hits."""
    store.set(3, "GPU missing (no GPU)")
    WorkerRegistry(store.redis).beat(ALL_QUEUES, 60_000)
    store.publish_health("gpu", {1: (False, "GPU missing"), 2: (False, "GPU missing")}, CPU_HOST)
    store.publish_health("cpu", {3: (True, "")}, CPU_HOST)
    bucket = int(time.time() // keys.STATS_BUCKET_S)
    scope = stats_scope(store.config)
    r.hset(stats_key("l2", bucket, scope), mapping={"hits": 1, "misses": 3})
    r.hset(stats_key("l3", bucket, scope), mapping={"hits": 1, "misses": 1})
    answered(pg, 40, 0.004)
    answered(pg, 1, 0.050, action=255)


def never_load(config: Config, level: int = 3) -> int:
    raise AssertionError("the workers' reports must be used, not the files")


def run_command(cfg: Config, monkeypatch: pytest.MonkeyPatch, *argv: str) -> tuple[int, str]:
    """`mltasks status ...` through the parser `add_parser` builds, as cli.py will call it."""
    monkeypatch.setattr(status, "get_config", lambda: cfg)
    parser = argparse.ArgumentParser(prog="mltasks")
    status.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["status", *argv])
    out = io.StringIO()
    code = args.func(args, out)
    return code, out.getvalue()


# --- healthy ------------------------------------------------------------------------------


def test_healthy_cpu_host_table_json_and_exit_0(
    cfg: Config,
    store: LevelStore,
    r: redis.Redis,
    pg: psycopg.Connection[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    healthy_cpu_host(store, r, pg)
    monkeypatch.setattr(status, "count_loadable_models", never_load)

    code, text = run_command(cfg, monkeypatch)
    assert code == status.HEALTHY, text
    assert "mltasks status: healthy" in text
    assert "18/18 (workers)" in text
    assert "combat_dqn 1, skill_dqn 0.5, threat_assessment 1" in text
    assert "3 CPU" in text and "best reachable 3" in text
    assert "l2 25%, l3 50%" in text
    assert "41 answers, 1 of them 255" in text
    assert "no GPU" in text
    assert "FAIL" not in text

    code, text = run_command(cfg, monkeypatch, "--json")
    doc = json.loads(text)
    assert code == status.HEALTHY and doc["exit_code"] == 0 and doc["verdict"] == "healthy"
    assert doc["problems"] == []
    assert doc["postgres"]["reachable"] and doc["redis"]["reachable"]
    models = doc["models"]
    assert (models["loaded"], models["expected"], models["source"]) == (18, 18, "workers")
    assert models["level"] == 3 and len(models["fusion"]["1"]) == 9
    assert models["fusion"]["3"] == {"combat_dqn": 1.0, "skill_dqn": 0.5, "threat_assessment": 1.0}
    assert doc["level"]["level"] == 3 and doc["level"]["serving"] == 3
    assert doc["level"]["ceiling"] == 3 and doc["level"]["since"] is not None
    assert doc["cache"] == {"l2": 0.25, "l3": 0.5}
    lat = doc["latency"]
    assert lat["answered"] == 41 and lat["answered_255"] == 1
    assert 3.5 <= lat["avg_ms"] <= 6.0, lat
    assert 4.0 <= lat["p99_ms"] <= 50.5 and 49.5 <= lat["max_ms"] <= 50.5, lat
    assert doc["queue"]["pending"] == 0 and doc["queue"]["lag_ms"] == 0.0
    assert doc["queue"]["broker"] == {"gpu": 0, "cpu": 0, "rules": 0}
    assert all(doc["workers"][q]["live"] for q in ALL_QUEUES)
    assert doc["gpu"]["present"] is False


def test_another_deployments_counters_do_not_count(
    cfg: Config, store: LevelStore, r: redis.Redis, pg: psycopg.Connection[Any]
) -> None:
    """The cache db is the game's; another deployment writing it (another database, another
    broker db) keeps its hit counters apart, and status shows only this deployment's."""
    from mltasks.cache.client import Cache

    healthy_cpu_host(store, r, pg)
    bucket = int(time.time() // keys.STATS_BUCKET_S)
    other = dataclasses.replace(cfg, redis=dataclasses.replace(cfg.redis, broker_db=1))
    other = dataclasses.replace(
        other, database=dataclasses.replace(cfg.database, url="postgresql:///ragnarok_ml")
    )
    assert stats_scope(other) != stats_scope(cfg)
    r.hset(stats_key("l2", bucket, stats_scope(other)), mapping={"hits": 900, "misses": 100})
    r.hset(stats_key("l1", bucket, stats_scope(other)), mapping={"hits": 5, "misses": 5})
    # ... as its workers write them: a real Cache on the same db, another deployment.
    theirs = Cache(other)
    try:
        theirs.remember_states([(7, np.full(64, 0.5, dtype=np.float32))])
        theirs.recent_states(7)
        theirs.flush_stats()
    finally:
        theirs.close()
    assert status.collect(cfg, count_files=lambda c, level: 54).cache == {"l2": 0.25, "l3": 0.5}
    assert status.collect(other, count_files=lambda c, level: 54).cache["l2"] == 0.9


def test_gpu_host_at_level_1_shows_vram(
    cfg: Config, store: LevelStore, pg: psycopg.Connection[Any]
) -> None:
    store.set(1, "recovered")
    WorkerRegistry(store.redis).beat(["gpu", "cpu"], 60_000)
    store.publish_health("gpu", {1: (True, ""), 2: (True, "")}, GPU_HOST)
    s = status.collect(cfg, count_files=never_load)
    assert s.exit_code == status.HEALTHY, s.problems
    assert s.level is not None and s.level.ceiling == 1
    assert ("VRAM", "2.0 GiB / 8.0 GiB (25%)", "-") in status.rows(s)


def test_what_serves_each_level_is_said_truthfully(
    cfg: Config, store: LevelStore, r: redis.Redis
) -> None:
    """mltasks dev's one worker listens on gpu, cpu and rules on a host without a GPU: the
    screen says nothing serves levels 1-2, and that one process serves 3 and 4."""
    store.set(3, "GPU missing (no GPU)")
    WorkerRegistry(store.redis).beat(ALL_QUEUES, 60_000, member="devhost:4242")
    store.publish_health("gpu", {1: (False, "GPU missing"), 2: (False, "GPU missing")}, CPU_HOST)
    store.publish_health("cpu", {3: (True, "")}, CPU_HOST)
    s = status.collect(cfg, count_files=lambda c, level: 54)
    table = {name: (value, state) for name, value, state in status.rows(s)}
    gpu_value, _ = table["levels 1-2 GPU"]
    assert gpu_value.startswith("nothing: 1 worker on queue gpu"), gpu_value
    assert "but no GPU" in gpu_value and "the same process as cpu and rules" in gpu_value
    cpu_value, cpu_state = table["level 3 CPU"]
    assert cpu_value.startswith("1 worker on queue cpu (the same process as gpu and rules)")
    assert cpu_state == "ok"  # level 3 is the level, and it is served
    assert table["level 4 rules"][0].startswith("1 worker on queue rules")
    assert table["level 5 255"][0].startswith("the bridge itself")
    assert not any("live" in value for value, _ in table.values() if "gpu" in value)
    assert s.to_dict()["workers"]["gpu"]["processes"] == ["devhost:4242"]
    text = render_text(s)
    assert "gpu 1 live" not in text and "nothing: 1 worker on queue gpu" in text

    # A GPU host: two workers on gpu, their own processes, serve levels 1-2.
    r.delete(keys.workers("gpu"))
    WorkerRegistry(store.redis).beat(["gpu"], 60_000, member="gpuhost:1")
    WorkerRegistry(store.redis).beat(["gpu"], 60_000, member="gpuhost:2")
    store.publish_health("gpu", {1: (True, ""), 2: (True, "")}, GPU_HOST)
    store.set(1, "recovered")
    table = {
        n: (v, st) for n, v, st in status.rows(status.collect(cfg, count_files=lambda c, level: 54))
    }
    assert table["levels 1-2 GPU"][0].startswith("2 workers on queue gpu, heartbeat"), table
    assert table["levels 1-2 GPU"][1] == "ok"


def render_text(s: status.Status) -> str:
    from rich.console import Console

    console = Console(width=200, record=True, file=io.StringIO())
    console.print(status.render(s))
    return console.export_text()


# --- degraded -----------------------------------------------------------------------------


def _level5(store: LevelStore, pg: psycopg.Connection[Any]) -> None:
    store.set(5, "no usable model")


def _no_worker_for_level(store: LevelStore, pg: psycopg.Connection[Any]) -> None:
    r = store.redis
    r.delete(keys.heartbeat("cpu"))


def _worse_than_reachable(store: LevelStore, pg: psycopg.Connection[Any]) -> None:
    store.set(4, "load 2.5/core above 2")


def _slow_answers(store: LevelStore, pg: psycopg.Connection[Any]) -> None:
    answered(pg, 30, 2.5)  # the test config's deadline is 2000 ms


def _queue_lag(store: LevelStore, pg: psycopg.Connection[Any]) -> None:
    pending(pg, 3.0)


def _missing_models(store: LevelStore, pg: psycopg.Connection[Any]) -> None:
    store.publish_health("cpu", {3: (True, "")}, dict(CPU_HOST, models_loaded=12))


@pytest.mark.parametrize(
    ("break_it", "why", "row"),
    [
        (_level5, "level 5: every request gets 255", "fallback level"),
        (_no_worker_for_level, "no live worker on queue 'cpu' for level 3", "fallback level"),
        (_worse_than_reachable, "level 4 is worse than the reachable level 3", "fallback level"),
        (_slow_answers, "above the 2000 ms deadline", "latency (5 min)"),
        (_queue_lag, "queue lag", "queue"),
        (_missing_models, "12/18 models load (workers)", "models loaded"),
    ],
)
def test_each_degraded_rule_exits_1_and_marks_its_row(
    cfg: Config,
    store: LevelStore,
    r: redis.Redis,
    pg: psycopg.Connection[Any],
    monkeypatch: pytest.MonkeyPatch,
    break_it: Any,
    why: str,
    row: str,
) -> None:
    healthy_cpu_host(store, r, pg)
    break_it(store, pg)
    s = status.collect(cfg, count_files=never_load)
    assert s.exit_code == status.DEGRADED
    assert any(why in p for p in s.problems), s.problems
    marks = {name: state for name, _, state in status.rows(s)}
    assert marks[row] == "fail", marks

    code, text = run_command(cfg, monkeypatch, "--json")
    doc = json.loads(text)
    assert code == status.DEGRADED and doc["verdict"] == "degraded"
    assert any(why in p for p in doc["problems"])
    code, text = run_command(cfg, monkeypatch)
    assert code == status.DEGRADED
    assert "mltasks status: degraded" in text and "FAIL" in text


def test_no_worker_at_all_is_degraded_not_a_crash(
    cfg: Config, r: redis.Redis, pg: psycopg.Connection[Any]
) -> None:
    """Nothing published yet: the start level, no workers, so no models loaded."""
    s = status.collect(cfg, count_files=never_load)
    assert s.exit_code == status.DEGRADED
    assert s.level is not None and s.level.since is None and s.level.serving == 5
    assert s.problems == ["no live worker on queue 'gpu' for level 1: served at level 5"]
    assert s.models is not None and s.models.loaded is None
    assert s.gpu is not None and s.gpu.present is None
    shown = {name: value for name, value, _ in status.rows(s)}
    assert shown["models loaded"] == "-/18 (no live model worker)"
    assert shown["fusion level 1"].count(" 1") == 9
    assert shown["latency (5 min)"] == "no answers in the window"


def test_workers_that_do_not_report_models_are_checked_against_the_files(
    cfg: Config, store: LevelStore, pg: psycopg.Connection[Any], models_dir: Path, tmp_path: Path
) -> None:
    store.set(3, "test")
    WorkerRegistry(store.redis).beat(ALL_QUEUES, 60_000)
    s = status.collect(cfg)
    # Served at level 3: its fusion's three types, from the files.
    assert s.models is not None and (s.models.loaded, s.models.source) == (18, "files")
    assert s.models.level == 3 and s.models.by_type == dict.fromkeys(s.models.fusion[3], 6)
    shown = {name: value for name, value, _ in status.rows(s)}
    assert shown["models of level 3"].startswith("combat_dqn 6/6, skill_dqn 6/6")
    assert s.exit_code == status.HEALTHY, s.problems
    empty = dataclasses.replace(cfg, models=dataclasses.replace(cfg.models, dir=tmp_path))
    s = status.collect(empty)
    assert s.models is not None and (s.models.loaded, s.models.source) == (0, "files")
    assert s.problems == ["0/18 models load (files)"]


def test_garbage_in_redis_is_shown_as_unknown(
    cfg: Config, store: LevelStore, r: redis.Redis, pg: psycopg.Connection[Any]
) -> None:
    store.set(3, "test")
    r.set(keys.heartbeat("cpu"), "not a time", px=60_000)
    r.set(keys.probes("cpu"), "{not json", ex=60)
    r.set(keys.probes("gpu"), json.dumps([1, 2]), ex=60)
    bucket = int(time.time() // keys.STATS_BUCKET_S)
    r.hset(stats_key("l1", bucket, stats_scope(cfg)), "hits", "many")
    s = status.collect(cfg, count_files=lambda c, level: 54)
    assert s.workers["cpu"].live
    assert s.gpu is not None and s.gpu.present is None
    status.render(s)  # renders


# --- unreachable --------------------------------------------------------------------------


def test_unreachable_servers_exit_2_with_what_could_be_read(
    cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = dataclasses.replace(
        cfg,
        database=dataclasses.replace(cfg.database, url="postgresql://x@127.0.0.1:1/x"),
        redis=dataclasses.replace(cfg.redis, url="redis://127.0.0.1:1"),
    )
    t0 = time.monotonic()
    code, text = run_command(closed, monkeypatch, "--json", "--timeout", "0.5")
    assert time.monotonic() - t0 < 10
    doc = json.loads(text)
    assert code == status.UNREACHABLE and doc["verdict"] == "unreachable"
    assert not doc["postgres"]["reachable"] and "refused" in doc["postgres"]["error"].lower()
    assert not doc["redis"]["reachable"] and doc["redis"]["error"]
    code, text = run_command(closed, monkeypatch)
    assert code == status.UNREACHABLE and "mltasks status: unreachable" in text


def test_redis_away_postgres_still_read(
    cfg: Config, pg: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    answered(pg, 5, 0.01)
    no_redis = dataclasses.replace(
        cfg, redis=dataclasses.replace(cfg.redis, url="redis://127.0.0.1:1")
    )
    s = status.collect(no_redis, timeout_s=0.5, count_files=lambda c, level: 54)
    assert s.exit_code == status.UNREACHABLE
    assert s.postgres.reachable and s.latency is not None and s.latency.answered == 5
    assert s.level is None
    names = [name for name, _, _ in status.rows(s)]
    assert "fallback level" in names and "latency (5 min)" in names


# --- pure parts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("live", "gpu", "best"),
    [
        ({"gpu": True, "cpu": True}, True, 1),
        ({"gpu": True, "cpu": True}, False, 3),
        ({"gpu": True}, None, 3),
        ({"cpu": True}, True, 3),
        ({"rules": True}, None, 4),
        ({}, None, 5),
    ],
)
def test_best_reachable_level(live: dict[str, bool], gpu: bool | None, best: int) -> None:
    assert status.best_reachable(live, gpu) == best


def test_the_registry_lists_each_queues_live_workers_or_none_where_none_ever_beat(
    config: Config, redis_cache: Any
) -> None:
    registry = WorkerRegistry(redis_cache)
    registry.beat(["cpu"], 60_000, member="host:2")
    registry.beat(["cpu"], 60_000, member="host:1")
    redis_cache.zadd(keys.workers("cpu"), {"host:3": time.time() - 120})  # lapsed
    assert registry.members(["cpu", "gpu"], 60) == {"cpu": ["host:1", "host:2"], "gpu": None}
