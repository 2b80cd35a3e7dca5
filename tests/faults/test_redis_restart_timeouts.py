"""Redis restarted under the game's 100 ms timeout: no decision may time out for it
(issue 11, item 2).

Workers (started with the README's command line, mingle on) heartbeat only once they
consume again, so the bridge never sends to a queue nobody reads; and whatever a bridge
holds back, it holds for less than the rows' deadline. Redis is killed (-9, it comes back
empty) and started again three times while map servers with the game's 100 ms timeout
play; the timeouts are counted, and every row's first claim must come within its
deadline.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

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
    report,
    settle,
    warm_up,
)

pytestmark = pytest.mark.faults

DEADLINE_MS = 100
RESTARTS = 3
# Slack for a claim on a loaded two-core host: one housekeeping round of the bridge.
CLAIM_SLACK_S = 0.05
# Load average per core above which 100 ms cannot be promised by anyone on this host.
OVERSUBSCRIBED = 1.0
TIMEOUTS_WHEN_OVERSUBSCRIBED = 5


def test_redis_restarts_cost_no_timeouts_and_no_row_is_held_past_its_deadline(
    config: Config, redis_server: RedisServer, make_service: Callable[..., Service]
) -> None:
    s = Settings(max_latency_ms=DEADLINE_MS, lease_ms=1500)
    svc = make_service(config.database.conninfo, redis_server.url, s)
    svc.start_worker("cpu-1", "cpu", as_documented=True)
    svc.start_worker("rules-1", "rules", as_documented=True)
    svc.start_bridge()
    svc.wait_worker("cpu-1", "cpu")
    svc.wait_worker("rules-1", "rules")
    conninfo = config.database.conninfo
    per_restart: list[int] = []
    with psycopg.connect(conninfo, autocommit=True) as pg:
        warm_up(pg)
        with GameLoad(conninfo, realistic=3, timeout_ms=DEADLINE_MS, seed=11) as load:
            load.wait_decisions(50)
            for _ in range(RESTARTS):
                before = len(load.decisions)
                redis_server.stop(signal.SIGKILL)
                load.keep_going(1.0)
                redis_server.start()
                wait_for(lambda: svc.beating("cpu"), 30, "the cpu worker back on the broker")
                load.keep_going(1.5)
                with load.lock:
                    window = load.decisions[before:]
                per_restart.append(sum(d.answer is None for d in window))
        assert settle(pg, s.bound_s + 5), "rows left unanswered"
        problems, rows = audit(pg, bound_s=None, decisions=load.decisions)
        held = pg.execute(
            "SELECT count(*) FROM ai_requests WHERE attempts <= 1"
            " AND claimed_at - created_at > make_interval(secs => %s)",
            (DEADLINE_MS / 1000 + CLAIM_SLACK_S,),
        ).fetchone()
    text = report(problems, rows, svc)
    late = held[0] if held else -1
    busy = os.getloadavg()[0] / (os.cpu_count() or 1)
    print(
        f"\ntimeouts per Redis restart: {per_restart}; {late} rows claimed past their"
        f" deadline; {len(load.decisions)} decisions; load {busy:.1f}/core"
    )
    assert not problems, text
    assert not svc.crashed(), svc.tails()
    # The goal is none of either. A host whose cores are oversubscribed (the suite shares
    # two cores with whatever else runs) misses 100 ms now and then with or without a
    # restart: there only a few per restart are allowed.
    allowed = 0 if busy <= OVERSUBSCRIBED else TIMEOUTS_WHEN_OVERSUBSCRIBED * RESTARTS
    assert late <= allowed, f"{late} rows claimed past their deadline\n{text}"
    assert sum(per_restart) <= allowed, f"timeouts after each restart: {per_restart}\n{text}"
