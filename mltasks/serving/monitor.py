"""The worker's monitor: heartbeats per queue, health probes, the database check.

A bootstep starts one monitor thread in the worker's main process. It refreshes a
heartbeat key per consumed queue (the bridge skips a tier whose key lapsed) and, every
``fallback.probe_interval_s``, reads the host's probes and moves the level down when
the tier this worker serves is unhealthy (VRAM, GPU gone, CPU overload).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mltasks import metrics
from mltasks.config import Config, get_config
from mltasks.fallback.ladder import QUEUE_LEVELS, RUNGS, Level
from mltasks.fallback.levels import LevelStore
from mltasks.fallback.probes import Readings, Thresholds, Verdict, assess, read_probes
from mltasks.fallback.registry import WorkerRegistry, worker_member
from mltasks.models import served

log = logging.getLogger(__name__)

# Fire drills and tests: probe readings come from this JSON file instead of the host.
PROBE_FILE_ENV = "MLTASKS_PROBE_READINGS"


def file_probe(path: Path) -> Callable[[], Readings]:
    """Readings from a JSON file of Readings fields, re-read at every probe."""

    def probe() -> Readings:
        doc = json.loads(path.read_text())
        doc["taken_at"] = time.time()
        return Readings(**doc)

    return probe


def host_probe(config: Config) -> Callable[[], Readings]:
    drill = os.environ.get(PROBE_FILE_ENV)
    if drill:
        log.warning(
            "probe readings come from %s, not from this host",
            drill,
            extra={"event": "probe_drill"},
        )
        return file_probe(Path(drill))
    device = config.hardware.gpu_device_id
    return lambda: read_probes(device_id=device)


def tier_health(verdict: Verdict, level: int) -> tuple[bool, str]:
    """(healthy, reason) of a level; the rule tier has no probe, only its own failures."""
    rung = RUNGS.get(level)
    if rung is None or rung.probe is None:
        return True, ""
    th = verdict[rung.probe]
    return th.healthy, th.reason or ""


def _own_processes() -> set[int]:
    """This process and its children: the pool processes whose model counts are current.

    Linux lists a thread's children in /proc/self/task/<tid>/children: a few reads, where
    psutil reads the /proc entry of every process on the host (3% of a busy worker's CPU,
    twice a second, on a host running 200 processes).
    """
    pids = {os.getpid()}
    try:
        listings = list(Path("/proc/self/task").glob("*/children"))
        for listing in listings:
            pids.update(int(pid) for pid in listing.read_text().split())
        if listings:
            return pids
    except (OSError, ValueError):  # a thread that ended meanwhile: ask psutil
        pass
    import psutil

    with contextlib.suppress(psutil.Error):
        pids.update(c.pid for c in psutil.Process().children())
    return pids


def database_problem(exc: BaseException) -> str:
    """The cause of a failed connection or check, in one line an operator can act on."""
    text = " ".join(str(exc).split())
    for needle, cause in (
        ("password authentication failed", "authentication failed"),
        ("no password supplied", "authentication failed (no password)"),
        ("does not exist", "does not exist"),
        ("Connection refused", "connection refused"),
        ("timeout expired", "host unreachable (timeout)"),
        ("could not translate host name", "host name unknown"),
        ("No route to host", "host unreachable"),
        ("permission denied", "permission denied"),
    ):
        if needle in text:
            return f"{cause}: {text[:300]}"
    return text[:300]


class DatabaseCheck:
    """Can this worker write answers? One connection of its own, checked at every beat.

    A failed check names its cause (authentication failed, host unreachable, the schema
    or a privilege missing); the monitor stops heartbeating until it passes again, so the
    bridge sends this worker nothing it could not answer.
    """

    CONNECT_TIMEOUT_S = 2

    def __init__(self, config: Callable[[], Config] = get_config) -> None:
        # The process's config at each check (tests switch databases under a live worker).
        self.config = config
        self.conn: Any = None
        self.conninfo = ""

    def __call__(self) -> str | None:
        import psycopg

        db = self.config().database
        if db.conninfo != self.conninfo:
            self.close()
        try:
            if self.conn is None or self.conn.closed:
                self.conninfo = db.conninfo
                self.conn = psycopg.connect(
                    db.conninfo,
                    autocommit=True,
                    connect_timeout=self.CONNECT_TIMEOUT_S,
                )
                row = self.conn.execute(
                    "SELECT has_table_privilege('ai_responses', 'INSERT')"
                    " AND has_table_privilege('ai_requests', 'UPDATE')"
                ).fetchone()
                if not (row and row[0]):
                    self.close()
                    return (
                        "permission denied: cannot answer"
                        " (INSERT on ai_responses, UPDATE on ai_requests)"
                    )
            else:
                self.conn.execute("SELECT 1")
        except Exception as exc:
            self.close()
            return f"PostgreSQL at {db.safe_dsn}: {database_problem(exc)}"
        return None

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None


class Monitor:
    """Heartbeats and probes of one worker; `evaluate` is pure enough to test with readings."""

    def __init__(
        self,
        config: Config,
        queues: Sequence[str],
        store: LevelStore | None = None,
        probe: Callable[[], Readings] | None = None,
        connected: Callable[[], bool] = lambda: True,
        database: Callable[[], str | None] | None = None,
        check_models: bool = False,
    ) -> None:
        self.config = config
        self.queues = [q for q in queues if q in QUEUE_LEVELS]
        self.store = store or LevelStore(config)
        self.registry = WorkerRegistry(self.store.redis)
        self.probe = probe
        # No heartbeat while the worker is not consuming (off the broker, or not yet
        # reading its queues): the bridge would send it batches nobody reads.
        self.connected = connected
        # No heartbeat either while it cannot write answers (None: not checked), nor while
        # it has no model at all (check_models: the models directory, the models loaded).
        self.database = database
        self.check_models = check_models
        self._next_probe = 0.0
        self.member = worker_member()
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        # Why this worker does not serve (None: it does), logged once per change.
        self.problem: str | None = None

    @property
    def model_queues(self) -> list[str]:
        return [q for q in self.queues if QUEUE_LEVELS[q][0] != Level.RULES]

    def models_problem(self) -> str | None:
        """Why this worker has no model to serve with, naming the directory (None: it has)."""
        if not self.check_models or not self.model_queues:
            return None
        d = get_config().models.dir  # the process's config now (tests switch it)
        if not d.is_dir():
            return f"models directory {d} does not exist"
        alive = _own_processes()
        for q in self.model_queues:
            if self.registry.models_loaded(q, alive) == 0:
                return f"no usable model in {d}"
        return None

    def check(self) -> str | None:
        """Why this worker cannot answer now, or None."""
        problem = self.database() if self.database is not None else None
        return problem or self.models_problem()

    def _set_problem(self, problem: str | None) -> None:
        if problem == self.problem:
            return
        if problem is not None:
            log.error(
                "not serving %s: %s",
                ",".join(self.queues),
                problem,
                extra={"event": "worker_not_serving", "reason": problem},
            )
        else:
            log.warning(
                "serving %s again", ",".join(self.queues), extra={"event": "worker_serving"}
            )
        self.problem = problem
        self.registry.publish_problem(self.queues, self.member, problem)

    def tick(self) -> None:
        fb = self.config.fallback
        self._set_problem(self.check())
        # Probes first: a heartbeat means this worker's health is on record too.
        now = time.monotonic()
        if self.probe is not None and now >= self._next_probe:
            self._next_probe = now + fb.probe_interval_s
            readings = self.probe()
            if readings.vram_used_bytes is not None:
                metrics.set_vram_usage(self.config.hardware.gpu_device_id, readings.vram_used_bytes)
            self.evaluate(readings)
        if self.problem is None and self.connected():
            self.registry.beat(self.queues, fb.heartbeat_ttl_ms, self.member)
        elif self.problem is not None:
            self.registry.publish_problem(self.queues, self.member, self.problem)

    def evaluate(self, readings: Readings) -> int | None:
        """Record the probe; move the level down if this worker's tier is unhealthy.

        Returns the level moved to, or None.
        """
        fb = self.config.fallback
        verdict = assess(
            readings,
            Thresholds(cpu_load_per_core=fb.cpu_load_per_core, queue_lag_s=fb.queue_lag_ms / 1000),
        )
        tiers = {
            level: tier_health(verdict, level) for q in self.queues for level in QUEUE_LEVELS[q]
        }
        alive = _own_processes()
        for queue in self.queues:
            doc = dataclasses.asdict(readings)
            if QUEUE_LEVELS[queue][0] != Level.RULES:
                loaded = self.registry.models_loaded(queue, alive)
                if loaded is not None:
                    doc["models_loaded"] = loaded
            self.store.publish_health(queue, {lv: tiers[lv] for lv in QUEUE_LEVELS[queue]}, doc)
        if any(QUEUE_LEVELS[q][0] != Level.RULES for q in self.queues):
            served.prune(self.store.redis, alive)  # the versions each process serves
        # The level this worker's tier is judged at is the one that serves: the shared
        # level, or a lower one when the tiers above it have no consumer (no GPU worker).
        state, current = self.store.served(self.queues)
        metrics.set_fallback_level(state.level)
        healthy, reason = tiers.get(current, (True, ""))
        no_models = self.models_problem()
        if no_models is not None and current in tiers:
            # README: no usable model at all is level 5.
            moved = self.store.degrade(
                Level.TRADITIONAL, f"no usable model: {no_models}", from_level=current
            )
            return int(Level.TRADITIONAL) if moved else None
        if healthy:
            return None
        target = current + 1
        # Without a GPU neither GPU level can serve: go straight to the CPU.
        if current < Level.CPU and not verdict.healthy("gpu_int8"):
            target = Level.CPU
        return target if self.store.degrade(target, reason, from_level=current) else None

    def run(self) -> None:
        interval = self.config.fallback.heartbeat_interval_ms / 1000
        while not self.stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # Redis away: keep beating when it returns
                log.warning("heartbeat failed: %s", exc, extra={"event": "heartbeat_failed"})
            self.stop.wait(interval)

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="mltasks-monitor", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(5)
        if isinstance(self.database, DatabaseCheck):
            self.database.close()
