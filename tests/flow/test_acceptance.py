"""The real commands, as an operator runs them: `mltasks db init`, `python -m bridge` and
`celery -A mltasks worker -Q cpu` (prefork) as separate processes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from mltasks.broker.celery_app import worker_command
from mltasks.config import Config
from mltasks.contract import ARCHETYPES
from mltasks.ops.dev import stop_all
from mltasks.ops.processes import free_port
from tests import game
from tests.waiting import wait_until


@pytest.fixture
def service_env(config: Config, models_dir: Path, tmp_path: Path) -> dict[str, str]:
    # Its own broker db: the in-process test worker must not take these batches.
    cfg = tmp_path / "acceptance.yaml"
    cfg.write_text(
        "inference:\n  max_latency_ms: 5000\n  poll_interval_ms: 20\n"
        "redis:\n  url: ${MLTASKS_TEST_REDIS_URL:-redis://127.0.0.1:6379}\n"
        "  broker_db: 13\n  cache_db: 14\n  visibility_timeout_s: 10\n"
        # this busy test host's own load must not move the level (issue 11: it does now)
        "fallback:\n  cpu_load_per_core: 1000\n"
        # level 3 looks the cache up here too: this test follows a hit through the service
        "caching:\n  lookup_levels: [1, 2, 3]\n"
        "worker:\n  concurrency: 2\n"
        "monitoring:\n  metrics_port: ${MLTASKS_METRICS_PORT:-0}\n"
        "  bridge_metrics_port: ${MLTASKS_BRIDGE_METRICS_PORT:-0}\n"
    )
    return dict(
        os.environ,
        MLTASKS_CONFIG=str(cfg),
        MLTASKS_DATABASE_URL=config.database.conninfo,
        MLTASKS_REDIS_URL=config.redis.url,
        MLTASKS_MODELS_DIR=str(models_dir),
    )


@pytest.fixture
def ports(service_env: dict[str, str]) -> dict[str, int]:
    """Metrics endpoints on free ports for this run's bridge and worker."""
    chosen = {"worker": free_port(), "bridge": free_port()}
    service_env["MLTASKS_METRICS_PORT"] = str(chosen["worker"])
    service_env["MLTASKS_BRIDGE_METRICS_PORT"] = str(chosen["bridge"])
    return chosen


@pytest.fixture
def service(
    service_env: dict[str, str], ports: dict[str, int]
) -> Iterator[list[subprocess.Popen[bytes]]]:
    py = sys.executable
    subprocess.run([py, "-m", "mltasks.cli", "db", "init"], env=service_env, check=True)
    procs = [
        subprocess.Popen([py, "-m", "bridge"], env=service_env),
        subprocess.Popen(
            worker_command(
                "cpu",
                "--pool",
                "prefork",
                "--concurrency",
                "2",
                "--without-gossip",
                "--without-mingle",
                "-l",
                "WARNING",
            ),
            env=service_env,
        ),
    ]
    try:
        yield procs
    finally:
        stop_all(procs)
    # A graceful stop: both exit on SIGTERM without being killed.
    assert [p.returncode for p in procs] == [0, 0]


def test_operator_commands_answer_the_game(
    pg: psycopg.Connection[Any], service: list[subprocess.Popen[bytes]]
) -> None:
    # Until the worker beats, the bridge rightly answers 255 (no consumer: level 5).
    def model_answers() -> bool:
        _, answer = game.decide(pg, [0.8, 0.5] + [0.0] * 62, timeout_ms=5000)
        return answer is not None and answer[0] != 255

    wait_until(model_answers, 60, "the worker to come up")
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
    pg: psycopg.Connection[Any], service: list[subprocess.Popen[bytes]], ports: dict[str, int]
) -> None:
    from tests.flow.test_metrics import scrape, value

    def model_answers() -> bool:
        _, answer = game.decide(pg, [0.8, 0.5] + [0.0] * 62, timeout_ms=5000)
        return answer is not None and answer[0] != 255

    wait_until(model_answers, 60, "the worker to come up")
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
    assert (value(after, "ml_inference_latency_seconds_count") or 0) > 0
    assert (value(after, "ml_request_latency_seconds_count") or 0) >= 8
    bridge = scrape(bridge_url)
    # a state not 64 long is answered invalid by the bridge's claim itself (issue 11)
    assert (value(bridge, "ml_requests_total", outcome="invalid") or 0) >= 1
    assert value(bridge, "ml_fallback_level") == 1
    assert value(bridge, "ml_queue_depth") == 0
    assert value(bridge, "ml_service_up") == 1
