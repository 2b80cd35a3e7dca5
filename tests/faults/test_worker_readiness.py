"""A worker that cannot answer must not look healthy (issue 15, items 1 and 2).

Real worker processes, as the operator starts them: one whose database password is
wrong (a private PostgreSQL cluster with password authentication), one whose models
directory does not exist. Neither may heartbeat (so no bridge sends it a batch), each
names its cause once in its log, `mltasks status` says why, and the missing models take
the level to 5 within a probe interval.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from mltasks import keys
from mltasks.config import Config, DatabaseConfig
from mltasks.db import init_schema
from tests import game
from tests.conftest import wait_for
from tests.decode import as_text
from tests.faults.support import REPO, PostgresServer, RedisServer, Service, Settings

pytestmark = pytest.mark.faults

STATE = [0.8, 0.5] + [0.0] * 62


def status_json(env: dict[str, str]) -> dict[str, object]:
    res = subprocess.run(
        [sys.executable, "-m", "mltasks.cli", "status", "--json"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    doc: dict[str, object] = json.loads(res.stdout)
    return doc


def problems_of(svc: Service, queue: str) -> dict[bytes, bytes]:
    raw: dict[bytes, bytes] = svc.cache.hgetall(keys.problems(queue))  # type: ignore[assignment]
    return raw


def test_a_worker_with_a_wrong_database_password_never_gets_a_batch_and_status_says_why(
    redis_server: RedisServer, models_dir: Path, tmp_path: Path
) -> None:
    server = PostgresServer(password="the-right-secret")
    try:
        server.init()
        server.start()
        with psycopg.connect(server.url(), autocommit=True) as admin:
            admin.execute("CREATE DATABASE game")
        init_schema(DatabaseConfig(url=server.url("game")))
        right = Service(
            tmp_path / "right", database_url=server.url("game"),
            redis_url=redis_server.url, models_dir=models_dir,
        )  # fmt: skip
        wrong = Service(
            tmp_path / "wrong", database_url=server.url("game", password="a-wrong-secret"),
            redis_url=redis_server.url, models_dir=models_dir,
        )  # fmt: skip
        try:
            started = time.monotonic()
            wrong.start_worker("cpu-wrong", "cpu")
            wait_for(lambda: problems_of(wrong, "cpu"), 60, "the worker saying why it waits")
            why = next(iter(problems_of(wrong, "cpu").values())).decode()
            assert "authentication failed" in why, why
            right.start_bridge()
            with psycopg.connect(server.url("game"), autocommit=True) as pg:
                # Up and idle (on the sleepers' record) before the game's first decision: a
                # bridge still importing on a busy host would let it time out.
                wait_for(
                    lambda: (
                        pg.execute("SELECT count(*) FROM ai_bridges_waiting").fetchone() != (0,)
                    ),
                    60,
                    "the bridge to wait for work",
                )
                for _ in range(5):  # a batch sent to it would wait for ever: none is
                    rid, answer = game.decide(pg, STATE, timeout_ms=5000)
                    assert answer == (255, 0.0)
                    src = pg.execute(
                        "SELECT source, reason FROM ai_responses WHERE request_id = %s", (rid,)
                    ).fetchone()
                    assert src == ("bridge", "fallback_level_5")
                    assert not wrong.beating("cpu")
            doc = status_json(wrong.env)
            workers = doc["workers"]
            assert isinstance(workers, dict)
            not_serving = workers["cpu"]["not_serving"]
            assert any("authentication failed" in v for v in not_serving.values()), doc
            assert any("authentication failed" in p for p in doc["problems"]), doc  # type: ignore[attr-defined]
            # Named once, not per batch or per check.
            log = wrong.log_text("cpu-wrong")
            assert log.count("event=worker_not_serving") == 1, wrong.tail("cpu-wrong")
            t0 = time.monotonic()
            codes = wrong.stop(timeout=20)
            assert codes == {"cpu-wrong": 0}, wrong.tail("cpu-wrong")
            assert time.monotonic() - t0 < 10, "SIGTERM must not wait on the pool"
            assert time.monotonic() - started < 120
        finally:
            wrong.close()
            right.close()
    finally:
        server.close()


def test_a_missing_models_directory_takes_the_level_to_5_and_names_the_directory(
    config: Config, redis_server: RedisServer, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-models"
    s = Settings()
    svc = Service(
        tmp_path / "svc", database_url=config.database.conninfo,
        redis_url=redis_server.url, models_dir=missing, settings=s,
    )  # fmt: skip
    try:
        svc.start_worker("cpu-1", "cpu")
        wait_for(lambda: problems_of(svc, "cpu"), 60, "the worker saying why it waits")
        seen = time.monotonic()

        def level() -> int:
            raw = svc.cache.hget(keys.LEVEL, "level")
            return int(raw) if raw is not None else 1

        wait_for(lambda: level() == 5, 0.5 + 1.0, "level 5 within a probe interval")
        assert time.monotonic() - seen < 1.5
        reason = as_text(svc.cache.hget(keys.LEVEL, "reason") or b"")
        assert str(missing) in reason, reason
        assert not svc.beating("cpu")
        log = svc.log_text("cpu-1")
        assert any(
            "ERROR" in line and str(missing) in line and "worker_not_serving" in line
            for line in log.splitlines()
        ), svc.tail("cpu-1")
        doc = status_json(svc.env)
        assert str(missing) in json.dumps(doc["workers"]), doc
        assert doc["level"]["level"] == 5  # type: ignore[index]
    finally:
        svc.close()
