"""The service on six hosts (network namespaces on one machine), and partitions under load.

Hosts: `db` (a throwaway PostgreSQL cluster and a private redis-server, both listening on
the host's address only), `bridges` (two `python -m bridge`), `worker1` and `worker2`
(one `celery -A mltasks worker -Q cpu --pool solo` each), and `game` (the emulated map
servers, with the game's exact statements, and the audit). No process of the service is
given a loopback address: each reaches PostgreSQL and Redis at 10.77.0.1.

1. A worker host's cable is pulled for 5 s under load, then plugged back.
2. The bridge host's cable is pulled for 5 s at the moment one of its bridges holds
   claimed rows whose batch is on its way to the broker (the broker's writes are paused
   for under a second so that the publish is caught in flight), then plugged back.

After each: every request the game made has exactly one answer that the map server can
parse, nothing is left pending or processing, an answer later than the deadline plus the
lease is 255, and the time the service took to come back is measured and printed
(`pytest -s`): for the worker, from the plug-in to its first heartbeat and to its first
statement on PostgreSQL; for the bridges, from the plug-in to the first model answer to
a request made after it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from mltasks import keys
from mltasks.broker.celery_app import worker_command
from tests.conftest import wait_for
from tests.faults.support import (
    BROKER_DB,
    REPO,
    GameLoad,
    Outcome,
    Service,
    Settings,
    audit,
    claimed_unanswered,
    db_now,
    first_worker_answer,
    queued,
    report,
    settle,
    summary,
    warm_up,
)
from tests.scale.netns import NOTES, Host, Network
from tests.scale.servers import NetnsPostgres, RedisProc

pytestmark = [pytest.mark.scale, pytest.mark.timeout(420)]

CUT_S = 5.0
RECOVERY_LIMIT_S = 30.0
SETTINGS = Settings()


@dataclasses.dataclass
class Cluster:
    net: Network
    db: Host
    bridges: Host
    workers: tuple[Host, Host]
    game: Host
    pg: NetnsPostgres
    redis: RedisProc
    svc: Service
    url: str
    conn: psycopg.Connection[Any]
    recoveries: dict[str, float] = dataclasses.field(default_factory=dict)

    def member(self, name: str) -> str:
        """The worker's name among the live ones: its host's name and its pid."""
        host = self.workers[0] if name == "worker1" else self.workers[1]
        return (
            f"{host.hostname if shutil.which('unshare') else socket.gethostname()}:{self.pid(name)}"
        )

    def pid(self, name: str) -> int:
        """The worker's own pid (under `unshare`, the process `ip netns exec` started
        becomes it by exec)."""
        return self.svc.procs[name].pid

    def last_beat(self, name: str) -> float:
        try:
            score = self.svc.cache.zscore(keys.workers("cpu"), self.member(name))
        except (redis.RedisError, OSError):
            return 0.0
        return float(score or 0.0)

    def last_statement(self, host: Host) -> float:
        """When (database clock) a backend of `host` last finished a statement."""
        row = self.conn.execute(
            "SELECT extract(epoch FROM max(state_change))::float8 FROM pg_stat_activity"
            " WHERE client_addr = %s::inet",
            (host.ip,),
        ).fetchone()
        return float(row[0]) if row and row[0] is not None else 0.0


def note(line: str) -> None:
    """Printed (`-s`) and in the terminal summary."""
    print(f"\n[scale] {line}")
    NOTES.append(line)


def start_worker(c: Cluster, name: str, host: Host) -> None:
    cmd = worker_command(
        "cpu", "--pool", "solo", "--without-gossip", "--without-mingle", "--without-heartbeat",
        "-n", f"{name}@%h", "-l", "WARNING",
    )  # fmt: skip
    c.svc._spawn(name, [*host.prefix, *cmd])


@pytest.fixture(scope="module")
def cluster(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("scale")
    net = Network()
    try:
        db = net.add("db")
        bridges = net.add("bridges")
        workers = (net.add("worker1"), net.add("worker2"))
        game = net.add("game")
        if net.latency_note:
            print(f"\n[scale] {net.latency_note}")
        with net.entered(game):
            yield from _cluster(root, net, db, bridges, workers, game, models_dir)
    finally:
        net.close()


def _cluster(
    root: Path,
    net: Network,
    db: Host,
    bridges: Host,
    workers: tuple[Host, Host],
    game: Host,
    models_dir: Path,
) -> Iterator[Cluster]:
    pg = NetnsPostgres(host=db.ip, prefix=db.prefix)
    rs = RedisProc(root / "redis", host=db.ip, prefix=db.prefix)
    svc: Service | None = None
    conn: psycopg.Connection[Any] | None = None
    try:
        pg.init()
        pg.start()
        rs.start()
        url = pg.url("ragnarok_ml")
        svc = Service(
            root / "service",
            database_url=url,
            redis_url=rs.url,
            models_dir=models_dir,
            settings=SETTINGS,
        )
        # The metrics listen on every address of their host, not on its loopback.
        config_file = root / "service" / "service.yaml"
        config_file.write_text(
            config_file.read_text().replace(
                "monitoring:\n", "monitoring:\n  metrics_host: 0.0.0.0\n", 1
            )
        )
        init = subprocess.run(
            [*game.prefix, sys.executable, "-m", "mltasks.cli", "db", "init", "--create"],
            env=svc.env, cwd=REPO, capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip
        assert init.returncode == 0, init.stdout + init.stderr
        conn = psycopg.connect(url, autocommit=True)
        c = Cluster(net, db, bridges, workers, game, pg, rs, svc, url, conn)
        start_worker(c, "worker1", workers[0])
        start_worker(c, "worker2", workers[1])
        svc._spawn("bridge-a", [*bridges.prefix, sys.executable, "-m", "bridge"])
        svc._spawn("bridge-b", [*bridges.prefix, sys.executable, "-m", "bridge"])
        for name in ("worker1", "worker2"):
            proc = svc.procs[name]
            wait_for(
                lambda n=name, p=proc: c.last_beat(n) or p.poll() is not None,  # type: ignore[misc]
                90,
                f"{name}'s heartbeat",
            )
            assert proc.poll() is None, f"{name} died at start:\n{svc.tail(name)}"
        warm_up(conn, timeout=90)
        yield c
        assert svc.crashed() == {}, svc.tails()
        if c.recoveries:
            line = "recovery: " + ", ".join(f"{k} {v:.2f}s" for k, v in c.recoveries.items())
            print(f"\n[scale] {line}")
    finally:
        if svc is not None:
            svc.close()
        if conn is not None:
            conn.close()
        rs.stop()
        pg.close()


def late_but_not_255(rows: dict[int, Outcome], bound_s: float) -> list[str]:
    """Answers later than the deadline plus the lease must be 255 (the game has moved on)."""
    return [
        f"request {o.rid}: {o.action} ({o.source}/{o.reason}) {o.latency_s:.2f}s after insert"
        for o in rows.values()
        if o.latency_s is not None and o.latency_s > bound_s and o.action != "255"
    ]


def game_load(c: Cluster, seed: int) -> GameLoad:
    s = SETTINGS
    # Realistic map servers give up at the deadline and mark the row; patient ones wait
    # long enough to read every answer the service promises.
    return GameLoad(
        c.url,
        realistic=2,
        patient=2,
        timeout_ms=s.max_latency_ms,
        patient_timeout_ms=int(s.bound_s * 1000) + 2000,
        seed=seed,
    )


def check(c: Cluster, load: GameLoad, *, strict_bound: bool) -> dict[int, Outcome]:
    assert settle(c.conn, SETTINGS.bound_s + 10), "rows left unanswered:\n" + c.svc.tails()
    problems, rows = audit(
        c.conn,
        bound_s=SETTINGS.bound_s if strict_bound else None,
        decisions=load.decisions,
        inserted=load.inserted,
    )
    problems += late_but_not_255(rows, SETTINGS.bound_s)
    assert not load.crashes, load.crashes
    assert not problems, report(problems, rows, c.svc)
    assert c.svc.crashed() == {}, c.svc.tails()
    return rows


def worker_busy(c: Cluster, r: redis.Redis, ip: str) -> bool:
    """The solo worker at `ip` is not waiting in a BRPOP (it runs a batch in its consumer),
    and a batch is in a worker's hands: rows claimed a while ago, unanswered, in no queue.
    (An `infer_batch` message leaves no unacked entry to look at: mltasks.broker.transport.)"""
    mine = [cl for cl in r.client_list() if str(cl["addr"]).rsplit(":", 1)[0] == ip]
    if not mine or any(cl.get("cmd") == "brpop" and "b" in str(cl.get("flags", "")) for cl in mine):
        return False
    return bool(set(claimed_unanswered(c.conn)) - queued(r))


def cut_while_busy(c: Cluster, host: Host, timeout: float = 10.0) -> bool:
    """Pull the worker host's cable while it holds a batch (else, after `timeout`, anyway);
    whether it held one."""
    r = c.redis.client(BROKER_DB)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if worker_busy(c, r, host.ip):
                c.net.cut(host)
                return True
            time.sleep(0.001)
    finally:
        r.close()
    c.net.cut(host)
    return False


@dataclasses.dataclass
class Partition:
    """A cable pulled for CUT_S under load: what the cut returned, and when (wall, database
    and monotonic clocks) the cable came back; `rows`, the audited table, once it is over."""

    load: GameLoad
    cut: Any
    wall: float = 0.0
    db: float = 0.0
    at: float = 0.0
    rows: dict[int, Outcome] = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def partition(
    c: Cluster, host: Host, seed: int, cut: Callable[[], Any], *, strict_bound: bool
) -> Iterator[Partition]:
    """Under the game's load: `cut()` pulls `host`'s cable, CUT_S later it is plugged back;
    the body measures the recovery, then 20 more decisions and the audit (`check`)."""
    with game_load(c, seed=seed) as load:
        load.wait_decisions(30)
        p = Partition(load, cut())
        load.keep_going(CUT_S)
        c.net.restore(host)
        p.wall, p.db, p.at = time.time(), db_now(c.conn), time.monotonic()
        yield p
        load.wait_decisions(20)
    p.rows = check(c, load, strict_bound=strict_bound)


def test_a_worker_host_cut_off_for_5s_under_load(cluster: Cluster) -> None:
    c = cluster
    w1 = c.workers[0]
    with partition(c, w1, 21, lambda: cut_while_busy(c, w1), strict_bound=True) as cut:
        wait_for(
            lambda: c.last_beat("worker1") > cut.wall,
            RECOVERY_LIMIT_S,
            "worker1's heartbeat after the cable is back",
        )
        beat_s = time.monotonic() - cut.at
        # Its first statement may be the answer of the batch it held, delivered late by
        # TCP (and ignored: answered already); a second one is a batch taken after.
        first = wait_for(
            lambda: (t := c.last_statement(w1)) > cut.db and t,
            RECOVERY_LIMIT_S,
            "worker1's first statement after the cable is back",
        )
        wait_for(
            lambda: c.last_statement(w1) > first,
            RECOVERY_LIMIT_S,
            "worker1 to answer a new batch",
        )
        serving_s = time.monotonic() - cut.at
    c.recoveries["worker cut: heartbeat"] = beat_s
    c.recoveries["worker cut: answering"] = serving_s
    note(
        f"worker host cut {CUT_S:.0f}s {'holding' if cut.cut else 'maybe not holding'}"
        f" a batch: heartbeat back {beat_s:.2f}s and answers"
        f" written again {serving_s:.2f}s after the cable; {summary(cut.rows)}"
    )


def blocked_publishers(r: redis.Redis, ip: str) -> list[dict[str, Any]]:
    """Clients from `ip` waiting in an LPUSH (a bridge's publish, held by the pause)."""
    return [
        cl
        for cl in r.client_list()
        if str(cl["addr"]).rsplit(":", 1)[0] == ip
        and "b" in str(cl.get("flags", ""))
        and cl.get("cmd") == "lpush"
    ]


def cut_while_publishing(c: Cluster, tries: int = 15) -> dict[str, Any]:
    """Pause the broker's writes, pull the bridge host's cable once one of its publishes is
    held (rows claimed, batch not yet in the broker), lift the pause."""
    r = c.redis.client(BROKER_DB)
    try:
        for _ in range(tries):
            r.client_pause(900, all=False)
            try:
                deadline = time.monotonic() + 0.7  # under the bridges' 1 s socket timeout
                while time.monotonic() < deadline:
                    held = blocked_publishers(r, c.bridges.ip)
                    if held:
                        c.net.cut(c.bridges)
                        return held[0]
                    time.sleep(0.003)
            finally:
                r.client_unpause()
            time.sleep(0.3)
    finally:
        r.close()
    raise AssertionError(f"no bridge published while the broker was paused ({tries} tries)")


def test_the_bridge_host_cut_off_while_holding_claimed_rows(cluster: Cluster) -> None:
    c = cluster

    def cut_and_count() -> tuple[dict[str, Any], Any]:
        held = cut_while_publishing(c)
        processing = c.conn.execute(
            "SELECT count(*) FROM ai_requests WHERE status = 'processing'"
        ).fetchone()
        return held, processing

    with partition(c, c.bridges, 22, cut_and_count, strict_bound=False) as cut:

        def model_answer() -> float | None:
            return first_worker_answer(c.conn, cut.db)

        wait_for(model_answer, RECOVERY_LIMIT_S, "a model answer after the cable is back")
        first = model_answer()
        assert first is not None
        serving_s = first - cut.db
        wait_for(
            lambda: (
                not c.conn.execute(
                    "SELECT 1 FROM ai_requests WHERE status IN ('pending', 'processing')"
                    " AND created_at < to_timestamp(%s)",
                    (cut.db,),
                ).fetchone()
            ),
            RECOVERY_LIMIT_S,
            "every row of the cut to be answered",
        )
        settled_s = time.monotonic() - cut.at
    held, processing = cut.cut
    c.recoveries["bridge cut: answering"] = serving_s
    c.recoveries["bridge cut: backlog settled"] = settled_s
    note(
        f"bridge host cut {CUT_S:.0f}s holding a publish ({held.get('addr')},"
        f" {processing[0] if processing else '?'} rows processing): model answers again"
        f" {serving_s:.2f}s and every earlier row answered {settled_s:.2f}s after the cable;"
        f" {summary(cut.rows)}"
    )
