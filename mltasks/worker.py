"""What runs beside the tasks in a worker: heartbeats per queue and health probes.

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

from celery import bootsteps
from celery.worker.consumer import Consumer

from mltasks import metrics
from mltasks.config import Config, get_config
from mltasks.fallback import QUEUE_LEVELS, Level, LevelStore, worker_member
from mltasks.health import Readings, Thresholds, Verdict, assess, read_probes

log = logging.getLogger(__name__)

QUEUES_ENV = "MLTASKS_WORKER_QUEUES"
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


def worker_queues() -> list[str]:
    """The queues this worker consumes (children learn them from the environment)."""
    return [q for q in os.environ.get(QUEUES_ENV, "").split(",") if q]


_TIER_OF_LEVEL = {1: "gpu_fp16", 2: "gpu_int8", 3: "cpu"}


def tier_health(verdict: Verdict, level: int) -> tuple[bool, str]:
    """(healthy, reason) of a level; the rule tier has no probe, only its own failures."""
    tier = _TIER_OF_LEVEL.get(level)
    if tier is None:
        return True, ""
    th = verdict[tier]  # type: ignore[index]
    return th.healthy, th.reason or ""


def _own_processes() -> set[int]:
    """This process and its children: the pool processes whose model counts are current."""
    import psutil

    pids = {os.getpid()}
    with contextlib.suppress(psutil.Error):
        pids.update(c.pid for c in psutil.Process().children())
    return pids


class Monitor:
    """Heartbeats and probes of one worker; `evaluate` is pure enough to test with readings."""

    def __init__(
        self,
        config: Config,
        queues: Sequence[str],
        store: LevelStore | None = None,
        probe: Callable[[], Readings] | None = None,
        connected: Callable[[], bool] = lambda: True,
    ) -> None:
        self.config = config
        self.queues = [q for q in queues if q in QUEUE_LEVELS]
        self.store = store or LevelStore(config)
        self.probe = probe
        # No heartbeat while the worker is off the broker: the bridge would send it batches
        # nobody reads.
        self.connected = connected
        self._next_probe = 0.0
        self.member = worker_member()
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def tick(self) -> None:
        fb = self.config.fallback
        if self.connected():
            self.store.beat(self.queues, fb.heartbeat_ttl_ms, self.member)
        now = time.monotonic()
        if self.probe is not None and now >= self._next_probe:
            self._next_probe = now + fb.probe_interval_s
            readings = self.probe()
            if readings.vram_used_bytes is not None:
                metrics.set_vram_usage(self.config.hardware.gpu_device_id, readings.vram_used_bytes)
            self.evaluate(readings)

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
                loaded = self.store.models_loaded(queue, alive)
                if loaded is not None:
                    doc["models_loaded"] = loaded
            self.store.publish_health(queue, {lv: tiers[lv] for lv in QUEUE_LEVELS[queue]}, doc)
        # The level this worker's tier is judged at is the one that serves: the shared
        # level, or a lower one when the tiers above it have no consumer (no GPU worker).
        state, current = self.store.served(self.queues)
        metrics.set_fallback_level(state.level)
        healthy, reason = tiers.get(current, (True, ""))
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


class MonitorStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Starts the monitor with the worker, stops it on shutdown."""

    requires = {"celery.worker.components:Pool"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        queues = sorted(worker.app.amqp.queues.consume_from or ["cpu"])
        os.environ[QUEUES_ENV] = ",".join(queues)
        self.queues = queues
        self.monitor: Monitor | None = None

    def start(self, worker: Any) -> None:
        cfg = get_config()

        def connected() -> bool:
            conn = getattr(getattr(worker, "consumer", None), "connection", None)
            return bool(conn is not None and conn.connected)

        self.monitor = Monitor(cfg, self.queues, probe=host_probe(cfg), connected=connected)
        self.monitor.start()

    def stop(self, worker: Any) -> None:
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None


class QuickReconnectConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, retrying a lost broker every 0.2-1 s instead of 2 s doubling to 30 s.

    While it is away the bridge answers with the rules; every second of reconnect delay
    after the broker is back is a second of batches sent to a queue nobody reads yet.
    """

    def ensure_connected(self, conn: Any) -> Any:
        original = conn.ensure_connection

        def quick(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("interval_start", 0.2)
            kwargs.setdefault("interval_step", 0.2)
            kwargs.setdefault("interval_max", 1.0)
            return original(*args, **kwargs)

        conn.ensure_connection = quick
        try:
            return super().ensure_connected(conn)
        finally:
            conn.ensure_connection = original
