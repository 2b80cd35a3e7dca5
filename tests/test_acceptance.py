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

from mltasks.config import Config
from mltasks.contract import ARCHETYPES
from mltasks.dev import stop_all
from tests import game
from tests.conftest import wait_for


@pytest.fixture
def service_env(config: Config, models_dir: Path, tmp_path: Path) -> dict[str, str]:
    # Its own broker db: the in-process test worker must not take these batches.
    cfg = tmp_path / "acceptance.yaml"
    cfg.write_text(
        "inference:\n  max_latency_ms: 5000\n  poll_interval_ms: 20\n"
        "redis:\n  broker_db: 13\n  cache_db: 14\n  visibility_timeout_s: 10\n"
        "worker:\n  concurrency: 2\n"
        "monitoring:\n  metrics_port: 0\n  bridge_metrics_port: 0\n"
    )
    return dict(
        os.environ,
        MLTASKS_CONFIG=str(cfg),
        MLTASKS_DATABASE_URL=config.database.conninfo,
        MLTASKS_MODELS_DIR=str(models_dir),
    )


@pytest.fixture
def service(service_env: dict[str, str]) -> Iterator[list[subprocess.Popen[bytes]]]:
    py = sys.executable
    subprocess.run([py, "-m", "mltasks.cli", "db", "init"], env=service_env, check=True)
    procs = [
        subprocess.Popen([py, "-m", "bridge"], env=service_env),
        subprocess.Popen(
            [
                py,
                "-m",
                "celery",
                "-A",
                "mltasks",
                "worker",
                "-Q",
                "cpu",
                "--pool",
                "prefork",
                "--concurrency",
                "2",
                "--without-gossip",
                "--without-mingle",
                "-l",
                "WARNING",
            ],
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

    wait_for(model_answers, 60, "the worker to come up")
    pg.execute("TRUNCATE ai_requests CASCADE")
    good = {a: game.insert(pg, [0.8, 0.5] + [0.0] * 62, archetype=a) for a in ARCHETYPES}
    bad = game.insert(pg, [0.1] * 63, archetype="tank")

    def all_answered() -> bool:
        row = pg.execute("SELECT count(*) FROM ai_responses").fetchone()
        assert all(p.poll() is None for p in service), "a service process died"
        return row is not None and row[0] == len(good) + 1

    wait_for(all_answered, 60, "answers from the subprocess service")
    for archetype, rid in good.items():
        answer = game.poll(pg, rid)
        assert answer is not None and 0 <= answer[0] <= 9, archetype
    assert game.poll(pg, bad) == (255, 0.0)
    assert pg.execute(
        "SELECT count(*) FROM ai_requests WHERE status IN ('pending', 'processing')"
    ).fetchone() == (0,)
