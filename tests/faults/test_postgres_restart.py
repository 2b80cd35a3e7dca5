"""PostgreSQL stops under load and starts again: the bridge and the worker reconnect.

The server is a throwaway cluster this test owns (initdb into a temp dir, its own port),
so stopping it touches nothing else. The schema is applied with the operator's command
(`mltasks db init --create`); the bridge and a prefork worker run as subprocesses.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator

import psycopg
import pytest

from tests.conftest import wait_for
from tests.faults.support import (
    REPO,
    GameLoad,
    PostgresServer,
    RedisServer,
    Service,
    Settings,
    audit,
    db_now,
    first_worker_answer,
    report,
    settle,
    summary,
    warm_up,
)

pytestmark = pytest.mark.faults

OUTAGE_S = 3.0


@pytest.fixture
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.close()


def test_postgres_restart_under_load_the_service_reconnects_by_itself(
    postgres: PostgresServer, redis_server: RedisServer, make_service: Callable[..., Service]
) -> None:
    s = Settings()
    url = postgres.url("ragnarok_ml")
    svc = make_service(url, redis_server.url, s)
    init = subprocess.run(
        [sys.executable, "-m", "mltasks.cli", "db", "init", "--create"],
        env=svc.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert init.returncode == 0, init.stdout + init.stderr
    svc.start_worker("cpu-1", "cpu")
    svc.start_bridge()
    svc.wait_worker("cpu-1", "cpu")
    with psycopg.connect(url, autocommit=True) as pg:
        warm_up(pg)
    patience = int(s.bound_s * 1000) + 2000
    with GameLoad(url, realistic=1, patient=2, timeout_ms=s.max_latency_ms,
                  patient_timeout_ms=patience, seed=3) as load:  # fmt: skip
        load.wait_decisions(30)
        postgres.stop("fast")
        errors_before = len(load.db_errors)
        load.keep_going(OUTAGE_S)
        assert len(load.db_errors) > errors_before, "the game never noticed the outage"
        assert svc.crashed() == {}, svc.tails()
        postgres.start()
        with psycopg.connect(url, autocommit=True) as pg:
            up_at = db_now(pg)
            wait_for(
                lambda: first_worker_answer(pg, up_at) is not None,
                60,
                "a model answer to a request made after the restart",
            )
            back = first_worker_answer(pg, up_at)
            assert back is not None
            load.keep_going(2.0)  # the recovered service under load
    with psycopg.connect(url, autocommit=True) as pg:
        settle(pg, s.bound_s + 5)
        # Every row, the outage's included, ends with one answer; the deadline plus the
        # lease holds again for requests made once the service is back.
        problems, rows = audit(
            pg,
            bound_s=s.bound_s,
            bound_from=back + 1.0,
            decisions=load.decisions,
            inserted=load.inserted,
        )
        after = [o for o in rows.values() if o.created > back + 1.0]
    print(
        f"\npostgres restart: first model answer {back - up_at:.2f}s after the restart; "
        f"{len(load.db_errors)} game-side connection errors; {summary(rows)}"
    )
    assert svc.crashed() == {}, svc.tails()
    assert not load.crashes, load.crashes
    assert not problems, report(problems, rows, svc)
    assert after, "no request after the recovery"
    assert {o.source for o in after} <= {"model", "cache"}, summary({o.rid: o for o in after})
    codes = svc.stop()
    assert all(c == 0 for c in codes.values()), f"unclean stop {codes}\n{svc.tails()}"
