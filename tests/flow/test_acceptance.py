"""The real commands, as an operator runs them: `mltasks db init`, `python -m bridge` and
`celery -A mltasks worker -Q cpu` (prefork) as separate processes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from mltasks.config import Config
from mltasks.contract import ARCHETYPES
from mltasks.ops import launcher
from mltasks.ops.launcher import Child, bridge_argv, stop_children, worker_argv, write_config
from mltasks.ops.processes import free_port
from tests import game
from tests.waiting import wait_until


@pytest.fixture
def service_env(config: Config, models_dir: Path, tmp_path: Path) -> dict[str, str]:
    # Its own broker db: the in-process test worker must not take these batches.
    cfg = write_config(
        tmp_path / "acceptance.yaml",
        {
            "inference": {"max_latency_ms": 5000, "poll_interval_ms": 20},
            "redis": {
                "url": "${MLTASKS_TEST_REDIS_URL:-redis://127.0.0.1:6379}",
                "broker_db": 13,
                "cache_db": 14,
                "visibility_timeout_s": 10,
            },
            # this busy test host's own load must not move the level (issue 11: it does now)
            "fallback": {"cpu_load_per_core": 1000},
            # level 3 looks the cache up here too: this test follows a hit through the service
            "caching": {"lookup_levels": [1, 2, 3]},
            "worker": {"concurrency": 2},
            "monitoring": {
                "metrics_port": "${MLTASKS_METRICS_PORT:-0}",
                "bridge_metrics_port": "${MLTASKS_BRIDGE_METRICS_PORT:-0}",
            },
        },
    )
    return launcher.service_env(
        config=cfg,
        database_url=config.database.conninfo,
        redis_url=config.redis.url,
        models_dir=models_dir,
    )


@pytest.fixture
def ports(service_env: dict[str, str]) -> dict[str, int]:
    """Metrics endpoints on free ports for this run's bridge and worker."""
    chosen = {"worker": free_port(), "bridge": free_port()}
    service_env["MLTASKS_METRICS_PORT"] = str(chosen["worker"])
    service_env["MLTASKS_BRIDGE_METRICS_PORT"] = str(chosen["bridge"])
    return chosen


@pytest.fixture
def service(service_env: dict[str, str], ports: dict[str, int]) -> Iterator[list[Child]]:
    py = sys.executable
    subprocess.run([py, "-m", "mltasks.cli", "db", "init"], env=service_env, check=True)
    worker = worker_argv(
        "cpu", "--pool", "prefork", "--concurrency", "2",
        "--without-gossip", "--without-mingle", "-l", "WARNING",
    )  # fmt: skip
    # In the test's process group, their output on the test's (pytest captures it).
    procs = [
        Child("bridge", bridge_argv(), env=service_env, own_session=False),
        Child("worker", worker, env=service_env, own_session=False),
    ]
    try:
        for p in procs:
            p.start()
        yield procs
    finally:
        ends = stop_children(procs)
    # A graceful stop: both exit on SIGTERM without being killed.
    assert [e.code for e in ends] == [0, 0]


def test_operator_commands_answer_the_game(
    pg: psycopg.Connection[Any], service: list[Child]
) -> None:
    # Until the worker beats, the bridge rightly answers 255 (no consumer: level 5).
    wait_until(
        lambda: game.answered_by_model(pg, [0.8, 0.5] + [0.0] * 62, 5000),
        60,
        "the worker to come up",
    )
    pg.execute("TRUNCATE ai_requests CASCADE")
    good = {a: game.insert(pg, [0.8, 0.5] + [0.0] * 62, archetype=a) for a in ARCHETYPES}
    bad = game.insert(pg, [0.1] * 63, archetype="tank")

    def all_answered() -> bool:
        row = pg.execute("SELECT count(*) FROM ai_responses").fetchone()
        assert all(p.poll() is None for p in service), "a service process died"
        return row is not None and row[0] == len(good) + 1

    wait_until(all_answered, 60, "answers from the subprocess service")
    for archetype, rid in good.items():
        answer = game.poll(pg, rid)
        assert answer is not None and 0 <= answer[0] <= 9, archetype
    assert game.poll(pg, bad) == (255, 0.0)
    assert pg.execute(
        "SELECT count(*) FROM ai_requests WHERE status IN ('pending', 'processing')"
    ).fetchone() == (0,)


def test_metrics_move_with_real_traffic(
    pg: psycopg.Connection[Any], service: list[Child], ports: dict[str, int]
) -> None:
    from tests.flow.test_metrics import scrape, value

    wait_until(
        lambda: game.answered_by_model(pg, [0.8, 0.5] + [0.0] * 62, 5000),
        60,
        "the worker to come up",
    )
    worker_url = f"http://127.0.0.1:{ports['worker']}/metrics"
    bridge_url = f"http://127.0.0.1:{ports['bridge']}/metrics"
    before = scrape(worker_url)
    # Gauges a dashboard reads have a value from the first scrape on (issue: no "no data").
    for layer in ("l1", "l2", "l3"):
        assert value(before, "ml_cache_hit_rate", layer=layer) is not None, layer
    assert value(before, "ml_fallback_level") is not None
    for i, archetype in enumerate(ARCHETYPES):
        game.decide(pg, [0.1 * i, 0.5] + [0.3] * 62, timeout_ms=5000, archetype=archetype)
    game.decide(pg, [0.1] * 63, timeout_ms=5000)  # invalid
    game.decide(pg, [0.1 * 0, 0.5] + [0.3] * 62, timeout_ms=5000)  # the same state again

    def moved() -> dict[Any, float] | None:
        after = scrape(worker_url)
        model = value(after, "ml_requests_total", outcome="model") or 0
        return (
            after
            if model - (value(before, "ml_requests_total", outcome="model") or 0) >= 6
            else None
        )

    after = wait_until(moved, 20, "the worker's counters to move")
    assert (value(after, "ml_requests_total", outcome="cache") or 0) >= 1
    assert value(after, "ml_models_loaded_total") == 18  # the level-3 fusion: 3 types x 6
    assert value(after, "ml_models_loaded_by_type", model_type="skill_dqn") == 6
    assert (value(after, "ml_fusion_answers_total", kind="fused") or 0) >= 6
    assert (value(after, "ml_batch_size_count") or 0) > (value(before, "ml_batch_size_count") or 0)
    # Model calls of batches only: the worker's warm-up (mltasks.serving.warm) is not one.
    assert (value(after, "ml_inference_latency_seconds_count") or 0) > (
        value(before, "ml_inference_latency_seconds_count") or 0
    )
    assert (value(after, "ml_request_latency_seconds_count") or 0) >= 8
    bridge = scrape(bridge_url)
    # a state not 64 long is answered invalid by the bridge's claim itself (issue 11)
    assert (value(bridge, "ml_requests_total", outcome="invalid") or 0) >= 1
    assert value(bridge, "ml_fallback_level") == 1
    assert value(bridge, "ml_queue_depth") == 0
    assert value(bridge, "ml_service_up") == 1
