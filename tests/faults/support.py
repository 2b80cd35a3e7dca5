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
import glob
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import msgpack
import numpy as np
import psutil
import psycopg
import pytest
import redis

from mltasks import keys
from mltasks.broker.celery_app import worker_command
from mltasks.contract import ARCHETYPES, N_ACTIONS, TRADITIONAL_AI
from mltasks.redisurl import client_from_url, with_db
from mltasks.state import sample_states
from tests import game
from tests.conftest import wait_for

REPO = Path(__file__).resolve().parents[2]
BROKER_DB, CACHE_DB = 1, 0  # the product's defaults: the Redis server is ours alone
HOUSEKEEPING_S = 0.25  # bridge/loop.py HOUSEKEEPING_EVERY_S: how late a lease can be seen
# Celery's start banner and its warning about root: noise in a failure message.
_BANNER = re.compile(
    r"^\s*(-|\*|\.>|\[queues\])|SecurityWarning|absolutely not recommended|--uid option"
    r"|User information: uid=|_warn_or_raise_security_error"
)


def missing(what: str) -> NoReturn:
    """Skip, or fail where CI promised the server binaries (MLTASKS_TEST_REQUIRE_SERVERS=1)."""
    if os.environ.get("MLTASKS_TEST_REQUIRE_SERVERS") == "1":
        pytest.fail(f"{what} (MLTASKS_TEST_REQUIRE_SERVERS=1)")
    pytest.skip(what)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- servers --------------------------------------------------------------------------------


class RedisServer:
    """A private redis-server on its own port: no persistence, so a restart comes back
    empty, as a crashed cache-only Redis does. Stop and start again keep the port."""

    def __init__(
        self,
        workdir: Path,
        args: Iterable[str] = (),
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        # args: more redis-server options (ACL users, a password); username and password:
        # what this helper's own clients log in with.
        self.args = list(args)
        self.username = username
        self.password = password
        exe = shutil.which("redis-server")
        if exe is None:
            missing("redis-server is not installed")
        self.exe = exe
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        with (self.workdir / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--daemonize", "no", "--dir", str(self.workdir),
                 *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        probe = self.client(socket_timeout=0.5)
        proc = self.proc

        def up() -> bool:
            assert proc.poll() is None, f"redis-server exited:\n{self.log_tail()}"
            try:
                return bool(probe.ping())
            except (redis.RedisError, OSError):
                return False

        try:
            wait_for(up, timeout, "the private redis-server")
        finally:
            probe.close()

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)

    def client(self, db: int = CACHE_DB, socket_timeout: float = 2.0) -> redis.Redis:
        return redis.Redis(
            port=self.port, db=db, socket_connect_timeout=0.5, socket_timeout=socket_timeout,
            username=self.username, password=self.password,
        )  # fmt: skip

    def log_tail(self, lines: int = 20) -> str:
        path = self.workdir / "redis.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def pg_bindir() -> Path | None:
    """The newest PostgreSQL server binaries on this host (Debian layout, else PATH)."""
    env = os.environ.get("MLTASKS_TEST_PG_BIN")
    if env:
        return Path(env)

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(p) for p in Path(path).parts[-3].split(".") if p.isdigit())

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresServer:
    """A throwaway cluster: initdb into a temp dir, trust auth, a free port, TCP only.

    initdb refuses to run as root, so as root every server command runs as `postgres`
    (runuser, else su) in a directory chowned to it.
    """

    def __init__(self, password: str | None = None) -> None:
        # With a password: scram-sha-256 on TCP (the postgres superuser's), trust otherwise.
        self.password = password
        bindir = pg_bindir()
        if bindir is None or not (bindir / "pg_ctl").exists():
            missing("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
        self.bin = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="mltasks-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.port = free_port()
        self.running = False
        self._su: list[str] | None = None
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.dir, ignore_errors=True)
                missing("running as root and there is no postgres user for initdb")
            os.chown(self.dir, owner.pw_uid, owner.pw_gid)
            self._su = ["postgres"]

    def _run(self, *args: object, timeout: float = 90.0) -> str:
        cmd = [str(a) for a in args]
        if self._su is not None:
            runuser = shutil.which("runuser")
            if runuser:
                cmd = [runuser, "-u", "postgres", "--", *cmd]
            else:
                cmd = ["su", "postgres", "-s", "/bin/sh", "-c", shlex.join(cmd)]
        res = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=self.dir, check=False
        )
        if res.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise AssertionError(f"{shlex.join(cmd)} failed:\n{res.stdout}{res.stderr}\n{log}")
        return res.stdout

    def init(self) -> None:
        auth: list[object] = ["-A", "trust"]
        if self.password is not None:
            pwfile = self.dir / "pwfile"
            pwfile.write_text(self.password + "\n")
            if self._su is not None:
                owner = pwd.getpwnam("postgres")
                os.chown(pwfile, owner.pw_uid, owner.pw_gid)
            auth = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
        self._run(
            self.bin / "initdb", "-D", self.data, "-U", "postgres", *auth,
            "-E", "UTF8", "--no-sync",
        )  # fmt: skip

    def start(self) -> None:
        opts = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.dir}"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._run(
            self.bin / "pg_ctl", "-D", self.data, "-l", self.log, "-o", opts, "-w", "-t", "60",
            "start",
        )  # fmt: skip
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        self._run(self.bin / "pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "60", "stop")
        self.running = False

    def url(self, dbname: str = "postgres", password: str | None = None) -> str:
        secret = self.password if password is None else password
        auth = f"postgres:{secret}" if secret is not None else "postgres"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{dbname}"

    def close(self) -> None:
        if self.running:
            with contextlib.suppress(Exception):
                self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


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

    @property
    def bound_s(self) -> float:
        """The longest a request may wait for its one answer: its deadline plus the lease,
        plus one housekeeping round and a second of slack for a loaded two-core host."""
        return (self.max_latency_ms + self.lease_ms) / 1000 + HOUSEKEEPING_S + 1.0

    def yaml(self) -> str:
        return (
            "models:\n  preload: serving\n"
            f"inference:\n  batch_size: {self.batch_size}\n"
            f"  poll_interval_ms: {self.poll_interval_ms}\n"
            f"  max_latency_ms: {self.max_latency_ms}\n  lease_ms: {self.lease_ms}\n"
            f"redis:\n  broker_db: {BROKER_DB}\n  cache_db: {CACHE_DB}\n"
            f"  visibility_timeout_s: {self.visibility_timeout_s}\n"
            f"fallback:\n  heartbeat_interval_ms: {self.heartbeat_interval_ms}\n"
            f"  heartbeat_ttl_ms: {self.heartbeat_ttl_ms}\n  probe_interval_s: 0.5\n"
            # real probes of a busy two-core host must not move the level in these tests
            "  cpu_load_per_core: 1000\n  queue_lag_ms: 60000\n"
            "worker:\n  concurrency: 1\n"
            "monitoring:\n  metrics_port: 0\n  bridge_metrics_port: 0\n"
            "logging:\n  level: WARNING\n"
        )


HEALTHY_HOST: dict[str, Any] = {
    "gpu_present": False,
    "vram_used_bytes": None,
    "vram_total_bytes": None,
    "cpu_load_per_core": 0.5,
    "ram_used_fraction": 0.3,
    "queue_lag_s": None,
    "gpu_status": "absent",
}


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
        config_file = workdir / "service.yaml"
        config_file.write_text(settings.yaml())
        probes = workdir / "probes.json"
        probes.write_text(json.dumps(HEALTHY_HOST))
        self.env = dict(
            os.environ,
            MLTASKS_CONFIG=str(config_file),
            MLTASKS_DATABASE_URL=database_url,
            MLTASKS_REDIS_URL=redis_url,
            MLTASKS_MODELS_DIR=str(models_dir),
            MLTASKS_PROBE_READINGS=str(probes),
        )
        self.env.pop("MLTASKS_TEST_REDIS_URL", None)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.killed: set[str] = set()
        # redis:// or a sentinel:// list (tests/scale), as the service reads it
        self.cache = client_from_url(
            with_db(redis_url, CACHE_DB), socket_timeout=1.0, socket_connect_timeout=0.5
        )

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        assert name not in self.procs, f"{name} already started"
        with (self.dir / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                cmd, env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT
            )
        self.procs[name] = proc
        return proc

    def start_worker(
        self, name: str, queues: str = "cpu", *, as_documented: bool = False
    ) -> subprocess.Popen[bytes]:
        """`celery -A mltasks worker -Q <queues>`, prefork, one pool process
        (``as_documented``: the README's command line, mingle and gossip left on)."""
        quiet = (
            () if as_documented else ("--without-gossip", "--without-mingle", "--without-heartbeat")
        )
        return self._spawn(
            name,
            worker_command(
                queues, "--pool", "prefork", "--concurrency", "1", *quiet,
                "-n", f"{name}@faults", "-l", "WARNING",
            ),
        )  # fmt: skip

    def start_bridge(self, name: str = "bridge") -> subprocess.Popen[bytes]:
        """`python -m bridge`."""
        return self._spawn(name, [sys.executable, "-m", "bridge"])

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
        proc = self.procs[name]
        victims = [psutil.Process(proc.pid), *self.pool_processes(name)]
        self.killed.add(name)
        for p in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        proc.wait(10)
        psutil.wait_procs(victims, timeout=10)

    def crashed(self) -> dict[str, int]:
        """Processes that exited although no test killed them, with their exit codes."""
        return {
            n: rc
            for n, p in self.procs.items()
            if n not in self.killed and (rc := p.poll()) is not None
        }

    def stop(self, timeout: float = 15.0) -> dict[str, int]:
        """SIGTERM every live process, SIGKILL what is left after `timeout`; exit codes."""
        live = {n: p for n, p in self.procs.items() if p.poll() is None}
        for p in live.values():
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        codes: dict[str, int] = {}
        for n, p in live.items():
            try:
                codes[n] = p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for child in psutil.Process(p.pid).children(recursive=True):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        child.kill()
                p.kill()
                p.wait(10)
                codes[n] = -9999  # had to be killed: not a graceful stop
        return codes

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


@dataclasses.dataclass(frozen=True)
class Decision:
    rid: int
    client: str
    answer: tuple[int, float] | None  # what the map server read; None: it gave up


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


# -- the audit ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One request as the database has it, and its answer (text, as libpq returns it)."""

    rid: int
    status: str
    attempts: int
    claimed: bool
    created: float  # epoch s, database clock
    action: str | None
    confidence: str | None
    source: str | None
    reason: str | None
    answered: float | None  # epoch s, database clock

    @property
    def latency_s(self) -> float | None:
        return None if self.answered is None else self.answered - self.created

    @property
    def parsed(self) -> tuple[int, float] | None:
        if self.action is None or self.confidence is None:
            return None
        return game.stoi(self.action), game.stof(self.confidence)


def outcomes(conn: psycopg.Connection[Any]) -> dict[int, Outcome]:
    rows = conn.execute(
        "SELECT r.request_id, r.status, r.attempts, r.claimed_at IS NOT NULL,"
        " extract(epoch FROM r.created_at)::float8,"
        " s.action_id::text, s.confidence::text, s.source, s.reason,"
        " extract(epoch FROM s.created_at)::float8"
        " FROM ai_requests r LEFT JOIN ai_responses s USING (request_id)"
        " ORDER BY r.request_id"
    ).fetchall()
    return {r[0]: Outcome(*r) for r in rows}


def first_worker_answer(pg: psycopg.Connection[Any], since: float) -> float | None:
    """When (database clock) the first worker answer to a request made after `since` came."""
    row = pg.execute(
        "SELECT min(extract(epoch FROM s.created_at))::float8"
        " FROM ai_requests r JOIN ai_responses s USING (request_id)"
        " WHERE s.source IN ('model', 'cache') AND r.created_at > to_timestamp(%s)",
        (since,),
    ).fetchone()
    return None if row is None or row[0] is None else float(row[0])


def db_now(conn: psycopg.Connection[Any]) -> float:
    row = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
    assert row is not None
    return float(row[0])


def unsettled(conn: psycopg.Connection[Any]) -> int:
    """Rows still pending or processing, or without their one answer."""
    row = conn.execute(
        "SELECT count(*) FROM ai_requests r WHERE r.status IN ('pending', 'processing')"
        " OR NOT EXISTS (SELECT 1 FROM ai_responses s WHERE s.request_id = r.request_id)"
    ).fetchone()
    return int(row[0]) if row else 0


def settle(conn: psycopg.Connection[Any], timeout: float) -> bool:
    """Wait (bounded) until every row is finished and answered; False if some never are
    (the audit then says which)."""
    deadline = time.monotonic() + timeout
    while unsettled(conn):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def audit(
    conn: psycopg.Connection[Any],
    *,
    bound_s: float | None,
    decisions: Iterable[Decision] = (),
    inserted: Iterable[int] = (),
    bound_from: float = 0.0,
) -> tuple[list[str], dict[int, Outcome]]:
    """Everything wrong with the table, one line per problem: rows left pending or
    processing, rows without exactly one answer, answers the map server could not parse
    or that are out of range, answers later than `bound_s` after their request (for
    requests created after `bound_from`), and answers that differ from what the game read.
    """
    rows = outcomes(conn)
    problems: list[str] = []
    dup = conn.execute(
        "SELECT request_id, count(*) FROM ai_responses GROUP BY 1 HAVING count(*) > 1"
    ).fetchall()
    problems += [f"request {rid}: {n} answers" for rid, n in dup]
    for o in rows.values():
        where = f"request {o.rid} ({o.status}, attempts {o.attempts})"
        if o.status in ("pending", "processing"):
            problems.append(f"{where}: left {o.status}")
        if o.action is None:
            claimed = "claimed" if o.claimed else "never claimed"
            problems.append(f"{where}: no answer ({claimed})")
            continue
        try:
            parsed = o.parsed
        except ValueError as exc:
            problems.append(f"{where}: the map server would crash: {exc}")
            continue
        assert parsed is not None
        action, conf = parsed
        if not (0 <= action < N_ACTIONS or action == TRADITIONAL_AI):
            problems.append(f"{where}: action {action}")
        if not 0.0 <= conf <= 1.0:
            problems.append(f"{where}: confidence {conf}")
        lat = o.latency_s
        if bound_s is not None and o.created >= bound_from and lat is not None and lat > bound_s:
            problems.append(
                f"{where}: answered {lat:.2f}s after its insert (> {bound_s:.2f}s), "
                f"{o.source}/{o.reason}"
            )
    for d in decisions:
        got = rows.get(d.rid)
        if got is None:
            problems.append(f"request {d.rid}: the game inserted it, it is gone")
        elif d.answer is not None and got.parsed != d.answer:
            problems.append(f"request {d.rid}: the game read {d.answer}, stored {o.parsed}")
    problems += [f"request {rid}: inserted, now missing" for rid in inserted if rid not in rows]
    return problems, rows


def summary(rows: dict[int, Outcome]) -> str:
    by = Counter((o.status, o.source, o.reason) for o in rows.values())
    lat = [o.latency_s for o in rows.values() if o.latency_s is not None]
    worst = f", slowest answer {max(lat):.3f}s" if lat else ""
    parts = ", ".join(f"{s}/{src}/{r}: {n}" for (s, src, r), n in by.most_common())
    return f"{len(rows)} requests{worst}; {parts}"


def report(problems: list[str], rows: dict[int, Outcome], service: Service | None = None) -> str:
    text = f"{len(problems)} problems; {summary(rows)}\n" + "\n".join(problems[:30])
    if service is not None:
        text += "\n" + service.tails(15)
    return text


# -- what a broker message holds -------------------------------------------------------------


def batch_request_ids(raw: bytes) -> list[int]:
    """The request ids of an `infer_batch` message as kombu keeps it in its `unacked`
    hash: JSON [message, exchange, routing key], the body msgpack, base64-encoded."""
    message = json.loads(raw)[0]
    body = base64.b64decode(message["body"])
    args = msgpack.unpackb(body, raw=False)[0]
    return [int(row[0]) for row in args[0]]


def in_flight(broker: redis.Redis) -> dict[bytes, list[int]]:
    """Batches delivered to a worker and not acknowledged: delivery tag -> request ids."""
    found: dict[bytes, list[int]] = {}
    unacked: dict[bytes, bytes] = broker.hgetall("unacked")  # type: ignore[assignment]
    for tag, raw in unacked.items():
        try:
            found[tag] = batch_request_ids(raw)
        except (ValueError, KeyError, IndexError, TypeError):
            found[tag] = []
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
