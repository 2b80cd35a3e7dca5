"""kill -9 a prefork Celery worker in the middle of a batch, under the game's load.

The batch is caught in the worker's hands: the worker is frozen (SIGSTOP) while rows claimed
a while ago are unanswered, the freeze is kept only if some of them are in no queue and
still unanswered once its statements have finished, and then the worker is killed (SIGKILL).
A `rules` worker stays up, so the service has a tier to move to.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import time
from collections.abc import Callable
from typing import Any

import psutil
import psycopg
import pytest
import redis

from mltasks.config import Config
from tests.conftest import wait_for
from tests.faults.support import (
    BROKER_DB,
    GameLoad,
    Outcome,
    RedisServer,
    Service,
    Settings,
    audit,
    claimed_unanswered,
    db_now,
    queued,
    report,
    settle,
    warm_up,
)
from tests.waiting import WaitTimeout, wait_until

pytestmark = pytest.mark.faults


def freeze_with_a_batch_in_hand(
    broker: redis.Redis,
    pg: psycopg.Connection[Any],
    victims: Callable[[], list[psutil.Process]],
    timeout: float = 20.0,
) -> tuple[list[int], list[psutil.Process]]:
    """SIGSTOP `victims` while they hold a batch not yet answered; its request ids.

    A worker that took an `infer_batch` message leaves no trace of it in Redis (the
    transport keeps no unacked entry for it), so the batch is found by elimination. Rows
    claimed a while before the freeze (the bridge publishes a batch as soon as it has claimed
    it) that are still unanswered once the frozen worker's statements in PostgreSQL have
    finished, and are in no batch waiting on a queue, are in the worker's hands: it is the
    only consumer of their queue. Otherwise: thaw, and try again with a later batch.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            claimed = wait_until(
                lambda: claimed_unanswered(pg),
                max(0.0, deadline - time.monotonic()),
                "rows claimed for a while and not answered",
                interval=0.0005,
            )
        except WaitTimeout:
            break
        procs = victims()
        for p in procs:
            p.send_signal(signal.SIGSTOP)
        # An answer the worker sent before the freeze lands once PostgreSQL has run it.
        wait_until(
            functools.partial(statements_finished, pg, procs),
            10,
            "the frozen worker's statements in PostgreSQL to finish",
        )
        waiting = queued(broker)
        held = [rid for rid in claimed if rid not in waiting]
        if held and unanswered(pg, held) == len(held):
            return held, procs
        for p in procs:
            p.send_signal(signal.SIGCONT)
    raise AssertionError(f"no unanswered batch caught in the worker's hands within {timeout}s")


def statements_finished(pg: psycopg.Connection[Any], procs: list[psutil.Process]) -> bool:
    """Whether no session of `procs` (frozen: they send nothing new) still has a statement
    running in PostgreSQL: an answer written before the freeze has landed by then."""
    port = pg.info.port
    ports = [
        c.laddr.port
        for p in procs
        for c in p.net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port
    ]
    if not ports:
        return True
    row = pg.execute(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE client_port = ANY(%s) AND state = 'active' AND pid <> pg_backend_pid()",
        (ports,),
    ).fetchone()
    return not (row and row[0])


def unanswered(pg: psycopg.Connection[Any], rids: list[int]) -> int:
    row = pg.execute(
        "SELECT count(*) FROM unnest(%s::integer[]) AS t(request_id)"
        " WHERE NOT EXISTS (SELECT 1 FROM ai_responses s WHERE s.request_id = t.request_id)",
        (rids,),
    ).fetchone()
    return int(row[0]) if row else 0


def answered_by(pg: psycopg.Connection[Any], source: str, since: float) -> bool:
    row = pg.execute(
        "SELECT count(*) FROM ai_requests r JOIN ai_responses s USING (request_id)"
        " WHERE s.source = %s AND r.created_at > to_timestamp(%s)",
        (source, since),
    ).fetchone()
    return bool(row and row[0])


def describe(caught: list[int], rows: dict[int, Outcome]) -> str:
    """What became of the requests of the killed batch."""
    return ", ".join(
        f"{rid}: {o.status}/{o.source}/{o.reason} after {o.latency_s}"
        for rid in caught
        if (o := rows.get(rid)) is not None
    )


def start(svc: Service) -> None:
    svc.start_worker("cpu-1", "cpu")
    svc.start_worker("rules", "rules")
    svc.start_bridge()
    svc.wait_worker("cpu-1", "cpu")
    svc.wait_worker("rules", "rules")


def test_a_worker_killed_mid_batch_leaves_every_request_one_answer_in_time(
    config: Config, redis_server: RedisServer, make_service: Callable[..., Service]
) -> None:
    """The whole worker (main process and its pool process) dies with a batch in hand.

    The game here is the real one: it gives up after its timeout (= max_latency_ms) and
    marks the row `timeout`, long before the lease (lease_ms > max_latency_ms, as in the
    shipped config) runs out.
    """
    s = Settings()
    svc = make_service(config.database.conninfo, redis_server.url, s)
    start(svc)
    broker = redis_server.client(BROKER_DB)
    problems: list[str] = []
    with (
        contextlib.closing(broker),
        psycopg.connect(config.database.conninfo, autocommit=True) as pg,
    ):
        warm_up(pg)
        with GameLoad(config.database.conninfo, realistic=4, timeout_ms=s.max_latency_ms) as load:
            load.wait_decisions(40)
            caught, _ = freeze_with_a_batch_in_hand(
                broker,
                pg,
                lambda: [psutil.Process(svc.procs["cpu-1"].pid), *svc.pool_processes("cpu-1")],
            )
            svc.kill("cpu-1")
            killed_at, killed_at_mono = db_now(pg), time.monotonic()
            # The cpu heartbeat lapses, the bridge moves the traffic to the rules tier.
            wait_for(lambda: answered_by(pg, "rules", killed_at), 15, "answers from the rules tier")
            load.keep_going(1.0)
        settle(pg, s.bound_s + 2)
        first, rows = audit(pg, bound_s=s.bound_s, decisions=load.decisions, inserted=load.inserted)
        problems += [f"after the kill: {p}" for p in first]
        assert set(caught) <= set(rows), "the killed batch names requests that do not exist"

        # infer_batch leaves no unacked entry (mltasks.broker.transport): the killed
        # worker's batch is never redelivered. Its rows were answered by the bridge (255
        # `lost`, at 80% of the deadline) or by the lease; nothing waits for the visibility
        # timeout.
        assert not broker.hlen("unacked"), "a batch task left unacknowledged"
        del killed_at_mono

        # A new cpu worker: nothing of the killed batch comes back, nothing changes.
        svc.start_worker("cpu-2", "cpu")
        svc.wait_worker("cpu-2", "cpu")
        wait_for(
            lambda: not broker.hlen("unacked") and not broker.llen("cpu"),
            30,
            "the killed worker's batch to be redelivered and consumed",
        )
        warm_up(pg)
        settle(pg, 5)
        second, after = audit(pg, bound_s=s.bound_s)
        problems += [f"after the redelivery: {p}" for p in second if p not in first]
        changed = [
            f"request {rid}: {o.status} {o.parsed} became {after[rid].status} {after[rid].parsed}"
            for rid, o in rows.items()
            if o.action is not None
            and (after[rid].parsed, after[rid].status) != (o.parsed, o.status)
        ]
        problems += [f"after the redelivery: {c}" for c in changed]
    assert svc.crashed() == {}, svc.tails()
    assert not load.crashes, load.crashes
    assert not problems, f"killed batch {describe(caught, rows)}\n" + report(problems, after, svc)
    codes = svc.stop()
    assert all(c == 0 for c in codes.values()), f"unclean stop {codes}\n{svc.tails()}"


def test_a_pool_process_killed_mid_batch_gives_its_batch_back(
    config: Config, redis_server: RedisServer, make_service: Callable[..., Service]
) -> None:
    """Only the pool process dies (the OOM killer's choice): the worker's main process
    stays, forks a new pool process, and the batch is answered all the same: by the
    bridge's rescue (255 `lost`) when the dead process had started it (a batch task is
    acknowledged on receipt and never redelivered), by the new process when it had not."""
    s = Settings()
    svc = make_service(config.database.conninfo, redis_server.url, s)
    start(svc)
    broker = redis_server.client(BROKER_DB)
    with (
        contextlib.closing(broker),
        psycopg.connect(config.database.conninfo, autocommit=True) as pg,
    ):
        warm_up(pg)
        with GameLoad(config.database.conninfo, realistic=4, timeout_ms=s.max_latency_ms) as load:
            load.wait_decisions(40)
            caught, frozen = freeze_with_a_batch_in_hand(
                broker, pg, lambda: svc.pool_processes("cpu-1")
            )
            assert len(frozen) == 1, frozen
            (child,) = frozen
            child.send_signal(signal.SIGKILL)
            child.wait(10)
            killed_at = db_now(pg)
            wait_for(lambda: len(svc.pool_processes("cpu-1")) == 1, 20, "a new pool process")
            wait_for(lambda: answered_by(pg, "model", killed_at), 20, "model answers again")
            load.keep_going(1.0)
        settle(pg, s.bound_s + 2)
        problems, rows = audit(
            pg, bound_s=s.bound_s, decisions=load.decisions, inserted=load.inserted
        )
    assert svc.crashed() == {}, svc.tails()
    assert not load.crashes, load.crashes
    lost_error = "WorkerLostError" in svc.log_text("cpu-1")
    print(f"pool process kill: batch {describe(caught, rows)}; WorkerLostError: {lost_error}")
    assert not problems, f"killed batch {describe(caught, rows)}\n" + report(problems, rows, svc)
    codes = svc.stop()
    assert all(c == 0 for c in codes.values()), f"unclean stop {codes}\n{svc.tails()}"
