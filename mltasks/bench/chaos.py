"""``mltasks bench chaos``: the whole service under faults, for a bounded time.

Emulated map servers (the game's exact statements, one decision in flight each) run
against two bridges, two solo ``cpu`` workers, a ``rules`` worker and beat, all started
as the README starts them, on a private ``redis-server`` (so that killing it costs nobody
else anything) and a fresh database whose name says ``bench``. Every ``--fault-every``
seconds one fault, in turn: kill -9 of Redis (started again, empty, after a second), of
a bridge, of a ``cpu`` worker, of the ``rules`` worker (each started again), or SIGSTOP
of a ``cpu`` worker for ``--stop-s`` seconds.

The report: requests unanswered, answered twice, stuck and malformed (all must be 0:
the exit status is 1 otherwise), the share answered within the game's timeout, the
255s and their reasons, rows a bridge claimed later than their deadline, and per fault
the timeouts that followed it and their longest run (decisions in insert order).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

from mltasks.bench import BenchError
from mltasks.bench.database import drop_database, recreate_database
from mltasks.bench.procs import ManagedProcess, stop_all, wait_until_answering
from mltasks.bench.queries import bench_query
from mltasks.contract import ARCHETYPES, TRADITIONAL_AI
from mltasks.game import (
    connect_as_game,
    give_up_sql,
    insert_sql,
    poll_sql,
    state_sql,
    stof,
    stoi,
)
from mltasks.ops.launcher import beat_argv, bridge_argv, service_env, worker_argv, write_config
from mltasks.ops.processes import RedisServer

FAULTS = ("redis", "bridge", "cpu", "rules", "stop")
REDIS_DOWN_S = 1.0
PROCESS_DOWN_S = 0.5


@dataclasses.dataclass(frozen=True)
class ChaosOptions:
    database_url: str
    models_dir: Path
    duration_s: float = 120.0
    clients: int = 4
    timeout_ms: int = 100
    fault_every_s: float = 5.0
    stop_s: float = 3.0
    faults: tuple[str, ...] = FAULTS
    seed: int = 0
    keep_database: bool = False
    # fallback.cpu_load_per_core of the service (None: the configured default). A shared
    # test host's load says little about the service: raise it to keep level 3.
    cpu_load_per_core: float | None = None


@dataclasses.dataclass
class Decision:
    rid: int
    at: float  # monotonic, when inserted
    outcome: str  # answered | timeout | crash
    answer: tuple[int, float] | None = None


@dataclasses.dataclass
class Fault:
    at: float  # monotonic
    kind: str
    target: str


class _Game:
    """Map servers as threads: insert, poll every 2 ms, mark `timeout` at the timeout."""

    def __init__(self, conninfo: str, clients: int, timeout_ms: int, seed: int) -> None:
        self.conninfo = conninfo
        self.clients = clients
        self.timeout_s = timeout_ms / 1000
        self.seed = seed
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.decisions: list[Decision] = []
        self.errors: list[str] = []
        self.threads: list[threading.Thread] = []

    def _run(self, index: int) -> None:
        from mltasks.state import sample_states

        rng = np.random.default_rng(self.seed * 1000 + index)
        pool = [state_sql(s) for s in sample_states(rng, 512).tolist()]
        conn: psycopg.Connection[Any] | None = None
        n = 0
        while not self.stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = connect_as_game(self.conninfo)
                array, hp, sp = pool[n % len(pool)]
                n += 1
                archetype = ARCHETYPES[int(rng.integers(len(ARCHETYPES)))]
                mob = 1002 + index
                row = conn.execute(
                    insert_sql(
                        monster_id=mob, mob_id=mob, archetype=archetype, array=array, hp=hp, sp=sp
                    )
                ).fetchone()
                assert row is not None
                rid, at = int(row[0]), time.monotonic()
                decision = self._wait(conn, rid, at)
            except psycopg.Error as exc:
                with self.lock:
                    self.errors.append(f"{type(exc).__name__}: {str(exc).strip()[:200]}")
                if conn is not None:
                    conn.close()
                conn = None
                self.stop.wait(0.05)
                continue
            if decision is not None:
                with self.lock:
                    self.decisions.append(decision)
        if conn is not None:
            conn.close()

    def _wait(self, conn: psycopg.Connection[Any], rid: int, at: float) -> Decision | None:
        poll = poll_sql(rid)
        deadline = at + self.timeout_s
        while time.monotonic() < deadline:
            got = conn.execute(poll).fetchone()
            if got is not None:
                try:
                    return Decision(rid, at, "answered", (stoi(got[0]), stof(got[1])))
                except ValueError:
                    return Decision(rid, at, "crash")
            if self.stop.is_set():
                return None  # the map server shuts down: nothing marked
            time.sleep(0.002)
        conn.execute(give_up_sql(rid))
        return Decision(rid, at, "timeout")

    def start(self) -> None:
        for i in range(self.clients):
            t = threading.Thread(target=self._run, args=(i,), name=f"map-server-{i}", daemon=True)
            t.start()
            self.threads.append(t)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


def _redis(work: Path) -> RedisServer:
    """A private redis-server, no persistence: killed, it comes back empty."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise BenchError("redis-server is not installed (the chaos run kills its own)")
    return RedisServer(work / "logs", exe)


def _config(opts: ChaosOptions) -> dict[str, dict[str, Any]]:
    """The service's config for the run (keys of config/mltasks.yaml)."""
    load = opts.cpu_load_per_core
    return {
        **({"fallback": {"cpu_load_per_core": load}} if load is not None else {}),
        "models": {"preload": "serving"},
        "inference": {"max_latency_ms": opts.timeout_ms},
        "redis": {"broker_db": 1, "cache_db": 0},
        "monitoring": {"metrics_port": 0, "bridge_metrics_port": 0},
        "logging": {"level": "WARNING"},
    }


class ChaosRun:
    def __init__(self, opts: ChaosOptions, work: Path, say: Callable[[str], None]) -> None:
        self.opts = opts
        self.work = work
        self.say = say
        self.rng = random.Random(opts.seed)
        self.redis = _redis(work)
        config = write_config(work / "chaos.yaml", _config(opts))
        self.env = service_env(
            config=config,
            database_url=opts.database_url,
            redis_url=self.redis.url,
            models_dir=opts.models_dir,
            drop=("MLTASKS_PROBE_READINGS", "MLTASKS_TEST_REDIS_URL"),
        )
        self.argv: dict[str, list[str]] = {
            "bridge-1": bridge_argv(),
            "bridge-2": bridge_argv(),
            "cpu-1": worker_argv("cpu", "--pool", "solo", "-n", "cpu1@chaos", "-l", "WARNING"),
            "cpu-2": worker_argv("cpu", "--pool", "solo", "-n", "cpu2@chaos", "-l", "WARNING"),
            "rules-1": worker_argv(
                "rules", "--pool", "solo", "-n", "rules1@chaos", "-l", "WARNING"
            ),
            "beat": beat_argv(work / "beat-schedule", "-l", "WARNING"),
        }
        self.procs: dict[str, ManagedProcess] = {}
        self.faults: list[Fault] = []

    # -- processes ------------------------------------------------------------------------

    def _start(self, name: str) -> None:
        p = ManagedProcess(
            name, self.argv[name], log_path=self.work / "logs" / f"{name}.log", env=self.env
        )
        p.start()
        self.procs[name] = p

    def _kill(self, name: str) -> None:
        """kill -9 of the process and every process it started."""
        p = self.procs.pop(name)
        if p.started:
            p.kill_tree()

    def start(self) -> None:
        self.redis.start()
        for name in self.argv:
            self._start(name)
        waited = wait_until_answering(
            self.opts.database_url, list(self.procs.values()), reject_sources=("bridge",)
        )
        self.say(f"service answering after {waited:.1f}s")

    def stop(self) -> None:
        stop_all(list(self.procs.values()))
        self.procs.clear()
        with contextlib.suppress(Exception):
            self.redis.stop()

    # -- faults -----------------------------------------------------------------------------

    def fault(self, kind: str) -> None:
        now = time.monotonic()
        if kind == "redis":
            self.faults.append(Fault(now, kind, "redis"))
            self.redis.stop(signal.SIGKILL)
            time.sleep(REDIS_DOWN_S)
            self.redis.start()
            return
        if kind == "stop":
            name = self.rng.choice(["cpu-1", "cpu-2"])
            p = self.procs[name]
            self.faults.append(Fault(now, kind, name))
            p.pause()
            try:
                time.sleep(self.opts.stop_s)
            finally:
                p.resume()
            return
        pick = {"bridge": ["bridge-1", "bridge-2"], "cpu": ["cpu-1", "cpu-2"], "rules": ["rules-1"]}
        name = self.rng.choice(pick[kind])
        self.faults.append(Fault(now, kind, name))
        self._kill(name)
        time.sleep(PROCESS_DOWN_S)
        self._start(name)

    def run(self) -> dict[str, Any]:
        opts = self.opts
        game = _Game(opts.database_url, opts.clients, opts.timeout_ms, opts.seed)
        self.start()
        started = time.monotonic()
        end = started + opts.duration_s
        game.start()
        kinds = list(opts.faults)
        i = 0
        try:
            next_fault = started + min(opts.fault_every_s, opts.duration_s / 4)
            while time.monotonic() < end:
                for name, p in list(self.procs.items()):
                    if p.started and p.poll() is not None:
                        self.say(f"{name} exited by itself ({p.returncode}): restarted")
                        self.procs.pop(name).stop()
                        self._start(name)
                if kinds and time.monotonic() >= next_fault:
                    kind = kinds[i % len(kinds)]
                    i += 1
                    self.fault(kind)
                    jitter = self.rng.uniform(-0.2, 0.2) * opts.fault_every_s
                    next_fault = time.monotonic() + opts.fault_every_s + jitter
                time.sleep(0.05)
        finally:
            game.finish()
        settled = self._settle()
        report = self._report(game, started, settled)
        self.stop()
        return report

    def _settle(self, timeout_s: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout_s
        with psycopg.connect(self.opts.database_url, autocommit=True) as conn:
            while True:
                row = conn.execute(bench_query("chaos_unsettled")).fetchone()
                if row is not None and int(row[0]) == 0:
                    return True
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.1)

    # -- the report -------------------------------------------------------------------------

    def _report(self, game: _Game, started: float, settled: bool) -> dict[str, Any]:
        opts = self.opts
        with psycopg.connect(opts.database_url, autocommit=True) as conn:
            row = conn.execute(
                bench_query("chaos_audit"), {"deadline_s": opts.timeout_ms / 1000}
            ).fetchone()
            assert row is not None
            dup = conn.execute(bench_query("chaos_duplicates")).fetchone()
            reasons: dict[str, int] = {
                str(k): int(v) for k, v in conn.execute(bench_query("chaos_reasons")).fetchall()
            }
        requests, unanswered, stuck, malformed, answered_255, held = (int(v) for v in row)
        decisions = sorted(game.decisions, key=lambda d: d.at)
        total = len(decisions)
        timeouts = sum(d.outcome == "timeout" for d in decisions)
        crashes = sum(d.outcome == "crash" for d in decisions)
        in_time = sum(d.outcome == "answered" for d in decisions)
        seen_255 = sum(1 for d in decisions if d.answer and d.answer[0] == TRADITIONAL_AI)
        per_fault: list[dict[str, Any]] = []
        for k, f in enumerate(self.faults):
            until = self.faults[k + 1].at if k + 1 < len(self.faults) else float("inf")
            window = [d for d in decisions if f.at <= d.at < until]
            run = longest = 0
            for d in window:
                run = run + 1 if d.outcome == "timeout" else 0
                longest = max(longest, run)
            per_fault.append(
                {
                    "at_s": round(f.at - started, 1),
                    "fault": f.kind,
                    "target": f.target,
                    "decisions": len(window),
                    "timeouts": sum(d.outcome == "timeout" for d in window),
                    "longest_timeout_run": longest,
                }
            )
        before = [d for d in decisions if not self.faults or d.at < self.faults[0].at]
        by_kind: dict[str, int] = {}
        for p in per_fault:
            by_kind[p["fault"]] = max(by_kind.get(p["fault"], 0), int(p["longest_timeout_run"]))
        return {
            "duration_s": opts.duration_s,
            "clients": opts.clients,
            "timeout_ms": opts.timeout_ms,
            "faults": Counter(f.kind for f in self.faults),
            "requests": requests,
            "decisions": total,
            "unanswered": unanswered,
            "duplicate": int(dup[0]) if dup else 0,
            "stuck": stuck,
            "malformed": malformed + crashes,
            "settled": settled,
            "in_time": in_time,
            "in_time_pct": round(100.0 * in_time / total, 3) if total else 0.0,
            "timeouts": timeouts,
            "timeouts_before_first_fault": sum(d.outcome == "timeout" for d in before),
            "answered_255": answered_255,
            "answered_255_pct": round(100.0 * answered_255 / requests, 2) if requests else 0.0,
            "seen_255": seen_255,
            "reasons_255": reasons,
            "held_past_deadline": held,
            "longest_timeout_run_after_a_fault": max(by_kind.values(), default=0),
            "longest_timeout_run_by_fault": dict(by_kind),
            "per_fault": per_fault,
            "client_errors": game.errors[:20],
        }


def passed(report: dict[str, Any]) -> bool:
    """What must hold whatever the host: every request answered once, well formed."""
    return all(report[k] == 0 for k in ("unanswered", "duplicate", "stuck", "malformed"))


def summary(report: dict[str, Any]) -> str:
    r = report
    lines = [
        f"chaos: {r['duration_s']:.0f}s, {r['clients']} map servers, timeout {r['timeout_ms']} ms,"
        f" faults {dict(r['faults'])}",
        f"  requests {r['requests']}, decisions {r['decisions']}",
        f"  unanswered {r['unanswered']}, duplicate {r['duplicate']}, stuck {r['stuck']},"
        f" malformed {r['malformed']}",
        f"  in time {r['in_time_pct']:.3f}% ({r['timeouts']} timeouts,"
        f" {r['timeouts_before_first_fault']} before the first fault)",
        f"  answered 255: {r['answered_255_pct']:.2f}% {r['reasons_255']}",
        f"  claimed past the deadline: {r['held_past_deadline']}",
        f"  longest run of timeouts after a fault: {r['longest_timeout_run_after_a_fault']}"
        f" (by fault: {r['longest_timeout_run_by_fault']})",
    ]
    return "\n".join(lines)


def run_chaos(opts: ChaosOptions, work: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """Make the database, run, drop the database (unless kept); the report."""
    recreate_database(opts.database_url)
    run = ChaosRun(opts, work, say)
    try:
        return run.run()
    finally:
        run.stop()
        if not opts.keep_database:
            with contextlib.suppress(Exception):
                drop_database(opts.database_url)


def write_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "chaos.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "chaos.txt").write_text(summary(report) + "\n")
