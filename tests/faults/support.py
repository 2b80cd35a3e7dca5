"""What the fault tests are made of, all real: a private redis-server, a throwaway
PostgreSQL cluster, bridges and prefork Celery workers started as the operator starts
them, map servers emulated with the game's exact statements, and an audit of every row
read from the database (its clocks, not ours).

Nothing here patches the product: faults are signals, stopped servers and paused
clients. Every process and server a helper starts, it also stops.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import psutil
import psycopg
import pytest
import redis

from bridge.housekeeping import HOUSEKEEPING_EVERY_S
from mltasks import keys
from mltasks.contract import ARCHETYPES, TRADITIONAL_AI
from mltasks.ops.launcher import (
    Child,
    bridge_argv,
    config_text,
    exited,
    service_env,
    stop_children,
    worker_argv,
    write_config,
)
from mltasks.ops.processes import free_port
from mltasks.redisurl import client_from_url, with_db
from mltasks.state import sample_states
from tests import game
from tests.conftest import HEALTHY_HOST, wait_for
from tests.faults.audit import (
    Decision,
    Outcome,
    audit,
    db_now,
    first_worker_answer,
    outcomes,
    report,
    settle,
    summary,
    unsettled,
)
from tests.servers import CACHE_DB, PostgresServer, RedisServer, missing, pg_bindir

# What the fault and scale tests import from here: the servers (tests/servers.py) and the
# audit (tests/faults/audit.py) live in modules of their own.
__all__ = [
    "BROKER_DB",
    "CACHE_DB",
    "HEALTHY_HOST",
    "REPO",
    "Decision",
    "GameLoad",
    "Outcome",
    "PostgresServer",
    "RedisServer",
    "Service",
    "Settings",
    "audit",
    "batch_request_ids",
    "claimed_unanswered",
    "db_now",
    "first_worker_answer",
    "free_port",
    "missing",
    "outcomes",
    "pg_bindir",
    "queued",
    "redis_server",
    "report",
    "settle",
    "summary",
    "unsettled",
    "warm_up",
]  # fmt: skip

REPO = Path(__file__).resolve().parents[2]
BROKER_DB = 1  # the product's default (CACHE_DB: 0): the Redis server is ours alone
HOUSEKEEPING_S = HOUSEKEEPING_EVERY_S  # how late a bridge sees a lease run out
# Celery's start banner and its warning about root: noise in a failure message.
_BANNER = re.compile(
    r"^\s*(-|\*|\.>|\[queues\])|SecurityWarning|absolutely not recommended|--uid option"
    r"|User information: uid=|_warn_or_raise_security_error"
)


# -- the service's processes ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the fault tests change in the service's YAML (everything else: the defaults)."""

    max_latency_ms: int = 1000
    lease_ms: int = 1500
    poll_interval_ms: int = 20
    batch_size: int = 32
    visibility_timeout_s: int = 2
    heartbeat_interval_ms: int = 200
    heartbeat_ttl_ms: int = 800
    write_actions: bool = False  # caching.write_actions: the game's L2 keys from the workers

    @property
    def bound_s(self) -> float:
        """The longest a request may wait for its one answer: its deadline plus the lease,
        plus one housekeeping round and a second of slack for a loaded two-core host."""
        return (self.max_latency_ms + self.lease_ms) / 1000 + HOUSEKEEPING_S + 1.0

    def doc(self) -> dict[str, dict[str, Any]]:
        """The service's config file, as sections of config/mltasks.yaml's keys."""
        return {
            "models": {"preload": "serving"},
            "inference": {
                "batch_size": self.batch_size,
                "poll_interval_ms": self.poll_interval_ms,
                "max_latency_ms": self.max_latency_ms,
                "lease_ms": self.lease_ms,
            },
            "redis": {
                "broker_db": BROKER_DB,
                "cache_db": CACHE_DB,
                "visibility_timeout_s": self.visibility_timeout_s,
            },
            "fallback": {
                "heartbeat_interval_ms": self.heartbeat_interval_ms,
                "heartbeat_ttl_ms": self.heartbeat_ttl_ms,
                "probe_interval_s": 0.5,
                # real probes of a busy two-core host must not move the level in these tests
                "cpu_load_per_core": 1000,
                "queue_lag_ms": 60000,
            },
            "caching": {"write_actions": self.write_actions},
            "worker": {"concurrency": 1},
            "monitoring": {"metrics_port": 0, "bridge_metrics_port": 0},
            "logging": {"level": "WARNING"},
        }

    def yaml(self) -> str:
        return config_text(self.doc())


class Service:
    """Bridges and workers as subprocesses on one config file; logs go to files."""

    def __init__(
        self,
        workdir: Path,
        *,
        database_url: str,
        redis_url: str,
        models_dir: Path,
        settings: Settings = Settings(),
    ) -> None:
        self.dir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.database_url = database_url
        config_file = write_config(workdir / "service.yaml", settings.doc())
        probes = workdir / "probes.json"
        probes.write_text(json.dumps(HEALTHY_HOST))
        self.env = service_env(
            config=config_file,
            database_url=database_url,
            redis_url=redis_url,
            models_dir=models_dir,
            drop=("MLTASKS_TEST_REDIS_URL",),
            MLTASKS_PROBE_READINGS=str(probes),
        )
        self.procs: dict[str, Child] = {}
        self.killed: set[str] = set()
        # redis:// or a sentinel:// list (tests/scale), as the service reads it
        self.cache = client_from_url(
            with_db(redis_url, CACHE_DB), socket_timeout=1.0, socket_connect_timeout=0.5
        )

    def _spawn(self, name: str, cmd: list[str]) -> Child:
        """In the test's process group, its output in ``<workdir>/<name>.log``."""
        assert name not in self.procs, f"{name} already started"
        child = Child(name, cmd, env=self.env, log_path=self.dir / f"{name}.log", cwd=REPO,
                      own_session=False)  # fmt: skip
        self.procs[name] = child.start()
        return child

    def start_worker(self, name: str, queues: str = "cpu", *, as_documented: bool = False) -> Child:
        """`celery -A mltasks worker -Q <queues>`, prefork, one pool process
        (``as_documented``: the README's command line, mingle and gossip left on)."""
        quiet = (
            () if as_documented else ("--without-gossip", "--without-mingle", "--without-heartbeat")
        )
        return self._spawn(
            name,
            worker_argv(
                queues, "--pool", "prefork", "--concurrency", "1", *quiet,
                "-n", f"{name}@faults", "-l", "WARNING",
            ),
        )  # fmt: skip

    def start_bridge(self, name: str = "bridge") -> Child:
        """`python -m bridge`."""
        return self._spawn(name, bridge_argv())

    def beating(self, queue: str) -> bool:
        try:
            return bool(self.cache.exists(keys.heartbeat(queue)))
        except (redis.RedisError, OSError):
            return False

    def wait_worker(self, name: str, queues: str = "cpu", timeout: float = 60.0) -> None:
        """Until the worker beats for each queue, with its one prefork pool process."""
        proc = self.procs[name]
        for q in queues.split(","):
            wait_for(
                lambda q=q: self.beating(q) or proc.poll() is not None,  # type: ignore[misc]
                timeout,
                f"{name}'s {q} heartbeat",
            )
            assert proc.poll() is None, f"{name} died at start:\n{self.tail(name)}"
        wait_for(lambda: self.pool_processes(name), 20, f"{name}'s prefork pool process")

    def pool_processes(self, name: str) -> list[psutil.Process]:
        return psutil.Process(self.procs[name].pid).children(recursive=True)

    def kill(self, name: str) -> None:
        """kill -9 the process and every process it started, as a crashed host would."""
        self.killed.add(name)
        self.procs[name].kill_tree()

    def crashed(self) -> dict[str, int]:
        """Processes that exited although no test killed them, with their exit codes."""
        return {n: rc for n, rc in exited(self.procs).items() if n not in self.killed}

    def stop(self, timeout: float = 15.0) -> dict[str, int]:
        """SIGTERM every live process, SIGKILL what is left after `timeout`; exit codes
        (-9999: it had to be killed, not a graceful stop)."""
        live = {n: p for n, p in self.procs.items() if p.poll() is None}
        ends = stop_children(live.values(), timeout)
        return {n: -9999 if e.killed else e.code for n, e in zip(live, ends, strict=True)}

    def tail(self, name: str, lines: int = 25) -> str:
        """The last log lines of a process, without Celery's start banner."""
        path = self.dir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        kept = [ln for ln in text.splitlines() if ln.strip() and not _BANNER.search(ln)]
        return "\n".join(kept[-lines:])

    def tails(self, lines: int = 25) -> str:
        return "\n".join(f"--- {n} ---\n{self.tail(n, lines)}" for n in self.procs)

    def log_text(self, name: str) -> str:
        return (self.dir / f"{name}.log").read_text(errors="replace")

    def close(self) -> None:
        self.stop()
        self.cache.close()


# -- the game ---------------------------------------------------------------------------------


class _ShutDown(Exception):
    """The load stopped while a map server waited for an answer."""


class GameLoad:
    """Map servers: threads with one connection each, one decision at a time, with the
    game's exact statements (tests/game.py): insert, poll every 2 ms, mark `timeout` when
    the game's own timeout passes. A connection error (PostgreSQL away) drops the decision
    and the client reconnects, as the gateway does.

    `realistic` clients give up after `timeout_ms` (the game's ml_max_latency_ms);
    `patient` ones after `patient_timeout_ms`, long enough to see every answer the
    service promises.
    """

    def __init__(
        self,
        conninfo: str,
        *,
        realistic: int = 0,
        patient: int = 0,
        timeout_ms: int = 1000,
        patient_timeout_ms: int = 6000,
        seed: int = 0,
    ) -> None:
        self.conninfo = conninfo
        self.clients = [(f"game-{i}", timeout_ms) for i in range(realistic)] + [
            (f"patient-{i}", patient_timeout_ms) for i in range(patient)
        ]
        self.seed = seed
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.decisions: list[Decision] = []
        self.inserted: list[int] = []
        self.client_of: dict[int, str] = {}
        self.db_errors: list[str] = []
        self.crashes: list[str] = []  # answers std::stoi / std::stof would throw on
        self.threads: list[threading.Thread] = []

    # -- one map server ---------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any] | None:
        try:
            return psycopg.connect(self.conninfo, autocommit=True, connect_timeout=2)
        except psycopg.Error as exc:
            self._db_error(exc)
            return None

    def _db_error(self, exc: BaseException) -> None:
        with self.lock:
            self.db_errors.append(f"{type(exc).__name__}: {str(exc).strip()[:200]}")

    def _run(self, index: int, client: str, timeout_ms: int) -> None:
        rng = np.random.default_rng(self.seed * 1000 + index)
        conn: psycopg.Connection[Any] | None = None
        try:
            while not self.stop_event.is_set():
                if conn is None or conn.closed:
                    conn = self._connect()
                    if conn is None:
                        self.stop_event.wait(0.05)
                        continue
                state = sample_states(rng, 1)[0].tolist()
                archetype = ARCHETYPES[int(rng.integers(len(ARCHETYPES)))]
                try:
                    rid = game.insert(conn, state, archetype=archetype, mob_id=1002)
                    with self.lock:
                        self.inserted.append(rid)
                        self.client_of[rid] = client
                    answer = self._wait_answer(conn, rid, timeout_ms)
                except psycopg.Error as exc:
                    self._db_error(exc)
                    conn.close()
                    conn = None
                    self.stop_event.wait(0.05)
                    continue
                except ValueError as exc:  # the map server would have crashed here
                    with self.lock:
                        self.crashes.append(f"{client}: {exc}")
                    continue
                except _ShutDown:
                    break
                with self.lock:
                    self.decisions.append(Decision(rid, client, answer))
        finally:
            if conn is not None:
                conn.close()

    def _wait_answer(
        self, conn: psycopg.Connection[Any], rid: int, timeout_ms: int
    ) -> tuple[int, float] | None:
        """The answer; None when the game gave up (and marked the row). _ShutDown when the
        load stops first (the map server shuts down: nothing marked)."""
        deadline = time.monotonic() + timeout_ms / 1000
        while time.monotonic() < deadline:
            answer = game.poll(conn, rid)
            if answer is not None:
                return answer
            if self.stop_event.is_set():
                raise _ShutDown
            time.sleep(0.002)
        game.mark_timeout(conn, rid)
        return None

    # -- control ------------------------------------------------------------------------------

    def start(self) -> GameLoad:
        for i, (client, timeout_ms) in enumerate(self.clients):
            t = threading.Thread(target=self._run, args=(i, client, timeout_ms), name=client)
            t.start()
            self.threads.append(t)
        return self

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(15)
        alive = [t.name for t in self.threads if t.is_alive()]
        assert not alive, f"load clients did not stop: {alive}"

    def __enter__(self) -> GameLoad:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def count(self) -> int:
        with self.lock:
            return len(self.decisions)

    def wait_decisions(self, more: int, timeout: float = 30.0) -> None:
        """Until `more` further decisions have completed (answered or given up)."""
        target = self.count() + more
        wait_for(lambda: self.count() >= target, timeout, f"{more} more game decisions")

    def keep_going(self, seconds: float) -> None:
        """The scenario's own duration: the load runs on while we wait."""
        self.stop_event.wait(seconds)


def warm_up(conn: psycopg.Connection[Any], timeout: float = 60.0) -> None:
    """Until a worker's model answers a decision (the bridge routes on heartbeats)."""
    rng = np.random.default_rng(7)

    def model_answer() -> bool:
        state = sample_states(rng, 1)[0].tolist()
        rid, answer = game.decide(conn, state, timeout_ms=3000, archetype="tank")
        if answer is None or answer[0] == TRADITIONAL_AI:
            return False
        row = conn.execute(
            "SELECT source FROM ai_responses WHERE request_id = %s", (rid,)
        ).fetchone()
        return row is not None and row[0] in ("model", "cache")

    wait_for(model_answer, timeout, "a model answer through the bridge and a worker")


# -- what a broker message holds -------------------------------------------------------------


def batch_request_ids(raw: bytes) -> list[int]:
    """The request ids of an `infer_batch` message as kombu pushes it on a queue: JSON, the
    body msgpack, base64-encoded."""
    message = json.loads(raw)
    body = base64.b64decode(message["body"])
    args = msgpack.unpackb(body, raw=False)[0]
    return [int(row[0]) for row in args[0]]


def claimed_unanswered(pg: psycopg.Connection[Any], age_ms: float = 3.0) -> list[int]:
    """Rows claimed at least `age_ms` ago (long since published) and not answered."""
    rows = pg.execute(
        "SELECT r.request_id FROM ai_requests r"
        " WHERE r.status = 'processing'"
        " AND r.claimed_at < clock_timestamp() - make_interval(secs => %s)"
        " AND NOT EXISTS (SELECT 1 FROM ai_responses s WHERE s.request_id = r.request_id)",
        (age_ms / 1000,),
    ).fetchall()
    return [int(r[0]) for r in rows]


def queued(broker: redis.Redis, queues: tuple[str, ...] = ("gpu", "cpu", "rules")) -> set[int]:
    """Request ids in the batches waiting on the queues (not yet taken by a worker)."""
    found: set[int] = set()
    for queue in queues:
        raws: list[bytes] = broker.lrange(queue, 0, -1)  # type: ignore[assignment]
        for raw in raws:
            with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
                found.update(batch_request_ids(raw))
    return found


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server for one test, stopped at teardown."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()
