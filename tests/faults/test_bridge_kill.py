"""kill -9 one of two bridges while it holds claimed rows, under the game's load.

To kill the bridge at the one moment that matters (rows claimed, batch not yet in the
broker) for certain, the broker's writes are paused for under a second (`CLIENT PAUSE
WRITE`: a slow Redis): the bridge's publish blocks, the test sees that very LPUSH waiting
in `CLIENT LIST`, kills the bridge, and lifts the pause. Redis drops the dead client's
waiting command, so that batch never reaches a worker: only the lease can save its rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import psutil
import psycopg
import pytest
import redis

from mltasks.config import Config
from tests.conftest import wait_for
from tests.faults.support import (
    BROKER_DB,
    GameLoad,
    RedisServer,
    Service,
    Settings,
    audit,
    report,
    settle,
    summary,
    warm_up,
)
from tests.waiting import WaitTimeout, wait_until

pytestmark = pytest.mark.faults


def broker_ports(pid: int, port: int) -> set[int]:
    """The local ports of process `pid`'s connections to the broker on `port`."""
    return {
        c.laddr.port
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port
    }


def blocked_publishers(r: redis.Redis, pid: int, port: int) -> list[dict[str, str]]:
    """Redis clients of process `pid` waiting in an LPUSH (a publish)."""
    ports = broker_ports(pid, port)
    # flag b: blocked (postponed by the pause); cmd: the command it is blocked in
    return [
        c
        for c in r.client_list()
        if int(c["addr"].rsplit(":", 1)[1]) in ports
        and "b" in c.get("flags", "")
        and c.get("cmd") == "lpush"
    ]


PAUSE_MS = 900  # under the broker's 1 s socket timeout: the publish waits, never fails
# A kill that ends later than this after the pause began may have come after the pause
# lapsed by itself (a descheduled test on a loaded two-core host): the publish may have
# gone through, and the rows with it.
KILL_BY_S = PAUSE_MS / 1000 - 0.1


def broker_connected(pid: int, port: int) -> bool:
    try:
        return bool(broker_ports(pid, port))
    except psutil.Error:  # not started yet
        return False


def kill_while_publishing(
    svc: Service, name: str, server: RedisServer, tries: int = 10
) -> tuple[str, dict[str, str]]:
    """Pause the broker's writes, kill bridge `name` once its publish is stuck, unpause.

    Returns the bridge killed and its stuck client. A kill that came too late to be sure
    the pause still held the publish counts for nothing: a new bridge takes the dead
    one's place and the next try pauses again."""
    r = server.client(BROKER_DB)
    try:
        for attempt in range(tries):
            pid = svc.procs[name].pid
            paused_at = time.monotonic()
            r.client_pause(PAUSE_MS, all=False)
            try:
                stuck = wait_until(
                    lambda pid=pid: blocked_publishers(r, pid, server.port),  # type: ignore[misc]
                    KILL_BY_S - 0.1,
                    f"{name} to publish into the paused broker",
                    interval=0.003,
                )
            except WaitTimeout:
                stuck = []
            else:
                svc.kill(name)
                killed_in_time = time.monotonic() - paused_at < KILL_BY_S
            finally:
                r.client_unpause()
            if not stuck:
                # Before the next pause: the bridge's writes flow again (none left blocked).
                wait_until(
                    lambda pid=pid: not blocked_publishers(r, pid, server.port),  # type: ignore[misc]
                    5,
                    f"{name}'s publishes to go through after the pause",
                )
                continue
            if killed_in_time:
                return name, stuck[0]
            name = f"{name.split('~')[0]}~{attempt + 1}"
            pid = svc.start_bridge(name).pid
            wait_until(
                lambda pid=pid: broker_connected(pid, server.port),  # type: ignore[misc]
                30,
                f"{name} to connect to the broker",
            )
    finally:
        r.close()
    raise AssertionError(f"{name} never published while the broker was paused ({tries} tries)")


def test_a_bridge_killed_holding_claimed_rows_leaves_none_behind(
    config: Config, redis_server: RedisServer, make_service: Callable[..., Service]
) -> None:
    # Heartbeats outlive the pause, so the pause itself moves no traffic between tiers.
    s = Settings(heartbeat_ttl_ms=3000)
    svc = make_service(config.database.conninfo, redis_server.url, s)
    svc.start_worker("cpu-1", "cpu")
    svc.start_bridge("bridge-a")
    svc.start_bridge("bridge-b")
    svc.wait_worker("cpu-1", "cpu")
    with psycopg.connect(config.database.conninfo, autocommit=True) as pg:
        warm_up(pg)
        # Map servers patient enough to see every answer the service promises: here
        # the rows of the dead bridge must come back through the lease.
        patience = int(s.bound_s * 1000) + 2000
        with GameLoad(config.database.conninfo, patient=4, patient_timeout_ms=patience) as load:
            load.wait_decisions(40)
            killed, stuck = kill_while_publishing(svc, "bridge-a", redis_server)
            killed_at = time.monotonic()
            # The rows claimed when the bridge died: its own among them (the others are the
            # surviving bridge's, answered as usual). What comes after them is the service's
            # ordinary latency, which the audit bounds: a host that slows the service to
            # 100 ms a decision must not read as rows left behind.
            held = [
                rid
                for (rid,) in pg.execute(
                    "SELECT request_id FROM ai_requests WHERE status = 'processing'"
                ).fetchall()
            ]

            seen: list[tuple[int, int]] = []

            def released_and_expired() -> bool:
                row = pg.execute(
                    "SELECT count(*) FILTER (WHERE attempts > 1),"
                    " count(*) FILTER (WHERE request_id = ANY(%s)"
                    "   AND status IN ('pending', 'processing'))"
                    " FROM ai_requests",
                    (held,),
                ).fetchone()
                assert row is not None
                seen.append((row[0], row[1]))
                return bool(row[0] and not row[1])

            try:
                wait_for(released_and_expired, s.bound_s + 5, "the dead bridge's rows")
            except AssertionError as e:
                late = pg.execute(
                    "SELECT request_id, status, attempts, clock_timestamp() - claimed_at"
                    " FROM ai_requests WHERE status IN ('pending', 'processing')"
                    " ORDER BY claimed_at LIMIT 10"
                ).fetchall()
                raise AssertionError(
                    f"{e}: (released, held at the kill and unanswered) last seen {seen[-3:]};"
                    f" oldest unanswered {late}; {killed} died in {stuck}\n{svc.tails()}"
                ) from None
            load.keep_going(max(0.0, 1.0 - (time.monotonic() - killed_at)))
        settle(pg, s.bound_s + 2)
        problems, rows = audit(
            pg, bound_s=s.bound_s, decisions=load.decisions, inserted=load.inserted
        )
        released = pg.execute(
            "SELECT r.request_id, r.status, s.action_id, s.reason FROM ai_requests r"
            " JOIN ai_responses s USING (request_id) WHERE r.attempts > 1"
        ).fetchall()
    assert svc.crashed() == {}, svc.tails()
    assert not load.crashes, load.crashes
    assert not problems, f"{killed} died in {stuck}\n" + report(problems, rows, svc)
    # The dead bridge's rows came back through the lease, past their deadline: 255.
    assert released, "no row was released by the lease: the kill caught nothing"
    assert {(st, a, why) for _, st, a, why in released} == {("expired", 255, "deadline")}, released
    codes = svc.stop()
    assert all(c == 0 for c in codes.values()), f"unclean stop {codes}\n{svc.tails()}"
    print(f"bridge kill: {len(released)} rows released by the lease; {summary(rows)}")
