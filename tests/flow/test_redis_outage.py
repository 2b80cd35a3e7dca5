"""Redis dies under load and comes back empty, on the same port (issue 4's outage test).

A private redis-server (no persistence) is the broker and the cache of a real bridge
(`python -m bridge`) and a real prefork worker (`celery -A mltasks worker -Q cpu`). The
game's statements run from several threads throughout. Redis is killed (SIGKILL), the
load runs on for a few seconds, Redis is started again: nothing else is restarted.

What must hold: no request is lost (every row gets exactly one answer, none is left
pending or processing, each within its deadline plus the lease); while Redis is away the
answers come from the bridge's rule policy (`broker_unavailable`) or are 255; after the
restart the worker answers again by itself. The time from the restart to the first
worker answer is measured and printed (`pytest -s`).
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from mltasks.config import Config
from tests.conftest import wait_for
from tests.faults.support import (
    GameLoad,
    RedisServer,
    Service,
    Settings,
    audit,
    db_now,
    first_worker_answer,
    redis_server,
    report,
    settle,
    summary,
    warm_up,
)

__all__ = ["redis_server"]  # the private Redis fixture, from tests/faults/support.py

# Redis back, the worker must answer again within this (its reconnect back-off included).
RECOVERY_LIMIT_S = 30.0
OUTAGE_S = 3.0


@pytest.fixture
def service(
    config: Config, redis_server: RedisServer, models_dir: Path, tmp_path: Path
) -> Iterator[Service]:
    svc = Service(
        tmp_path / "service",
        database_url=config.database.conninfo,
        redis_url=redis_server.url,
        models_dir=models_dir,
    )
    try:
        yield svc
    finally:
        svc.close()


def test_redis_restart_under_load_loses_nothing_and_the_worker_comes_back_by_itself(
    config: Config, redis_server: RedisServer, service: Service
) -> None:
    s: Settings = service.settings
    service.start_worker("cpu-1", "cpu")
    service.start_bridge()
    service.wait_worker("cpu-1", "cpu")
    conninfo = config.database.conninfo
    with psycopg.connect(conninfo, autocommit=True) as pg:
        warm_up(pg)
        # Map servers patient enough to see every answer the service promises.
        patience = int(s.bound_s * 1000) + 2000
        with GameLoad(conninfo, patient=3, patient_timeout_ms=patience, seed=4) as load:
            load.wait_decisions(30)
            redis_server.stop(signal.SIGKILL)
            down_at = db_now(pg)
            during = load.count()
            load.keep_going(OUTAGE_S)
            during = load.count() - during
            redis_server.start()
            up_at = db_now(pg)
            wait_for(
                lambda: first_worker_answer(pg, up_at) is not None,
                RECOVERY_LIMIT_S + 30,
                "a worker answer after the restart",
            )
            back = first_worker_answer(pg, up_at)
            assert back is not None
            recovery_s = back - up_at
            load.keep_going(2.0)  # the recovered service under load
            load_end = db_now(pg)
        settle(pg, s.bound_s + 2)
        problems, rows = audit(
            pg, bound_s=s.bound_s, decisions=load.decisions, inserted=load.inserted
        )
    # Made and answered while Redis was away: only the bridge could answer them.
    outage = [
        o
        for o in rows.values()
        if o.created > down_at and o.answered is not None and o.answered < up_at
    ]
    wrong = [
        (o.rid, o.action, o.source, o.reason)
        for o in outage
        if not ((o.source, o.reason) == ("rules", "broker_unavailable") or o.action == "255")
    ]
    # Once the worker is back, it answers (allow a second for batches sent before).
    after = [o for o in rows.values() if back + 1.0 < o.created < load_end]
    not_worker = [(o.rid, o.source, o.reason) for o in after if o.source not in ("model", "cache")]
    # Between the restart and the worker's return: what the game got meanwhile.
    gap = Counter(
        (o.source, o.reason)
        for o in rows.values()
        if o.answered is not None and up_at <= o.answered < back
    )
    print(
        f"\nredis outage: {during} decisions during {OUTAGE_S:.0f}s down, {len(outage)} answered "
        f"by the bridge; first worker answer {recovery_s:.2f}s after the restart, answers "
        f"in between {dict(gap)}; {summary(rows)}"
    )
    assert service.crashed() == {}, service.tails()
    assert not load.crashes, load.crashes
    assert not problems, report(problems, rows, service)
    assert outage, "no request was answered while Redis was down: the outage was not under load"
    assert not wrong, f"answers during the outage not from the bridge: {wrong[:10]}"
    assert recovery_s <= RECOVERY_LIMIT_S, f"the worker took {recovery_s:.1f}s to answer again"
    assert after, "no request after the recovery"
    assert not not_worker, f"after the recovery, answers not from the worker: {not_worker[:10]}"
    # Nothing had to be restarted, and both stop cleanly.
    started = time.monotonic()
    codes = service.stop()
    assert codes == {"cpu-1": 0, "bridge": 0}, f"{codes}\n{service.tails()}"
    assert time.monotonic() - started < 15
