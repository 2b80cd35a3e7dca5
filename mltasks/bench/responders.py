"""What answers during a run: the floor or the service, started fresh for each run.

A run starts its responder, waits until it answers a warm-up request itself, runs the
load and stops it, so runs share nothing (tables, queues, caches, levels) but the models
on disk. Starting costs a second or two; it buys runs that can be compared.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mltasks.bench.procs import ManagedProcess, stop_all, wait_until_answering
from mltasks.bench.service import LEVEL5_REASON, Service, ServiceSettings


@dataclass(slots=True)
class Running:
    """A responder that answers: its processes (for their CPU time) and what it reported."""

    procs: list[ManagedProcess]
    info: dict[str, Any] = field(default_factory=dict)
    service: Service | None = None

    def cpu_seconds(self) -> float:
        return sum(p.cpu_seconds() for p in self.procs)


@contextmanager
def floor(url: str, log_dir: Path) -> Iterator[Running]:
    """The floor responder as a subprocess, answering before the run starts."""
    proc = ManagedProcess(
        "floor",
        [sys.executable, "-m", "mltasks.bench.floor", "--database-url", url],
        log_path=log_dir / "floor.log",
    )
    try:
        proc.start()
        wait_until_answering(url, [proc], timeout_s=60)
        yield Running([proc])
    finally:
        stop_all([proc])


@contextmanager
def service(settings: ServiceSettings, label: str) -> Iterator[Running]:
    """The service as subprocesses; the worker's memory is read once it is ready."""
    with Service(settings, label=label) as svc:
        ready_s = svc.wait_ready()
        running = Running(list(svc.procs), {"ready_s": round(ready_s, 1)}, svc)
        memory = svc.worker_memory()
        if memory is not None:
            running.info["worker_memory"] = {"after warm-up": memory}
        yield running
        if memory is not None:
            running.info["worker_memory"]["after the run"] = svc.worker_memory()


@dataclass(frozen=True, slots=True)
class Responder:
    """A responder of a benchmark: its name in tables, how to start it, what it is."""

    name: str
    start: Callable[[], AbstractContextManager[Running]]
    config: dict[str, Any]
    # 255 answers that are this responder's own answer, not a failure (level 5).
    accept_255_reasons: tuple[str, ...] = ()

    @property
    def is_floor(self) -> bool:
        return self.name == "floor"


def floor_responder(url: str, log_dir: Path) -> Responder:
    return Responder("floor", lambda: floor(url, log_dir), {"responder": "floor"})


@contextmanager
def model_floor(settings: ServiceSettings, log_dir: Path) -> Iterator[Running]:
    """The model floor as a subprocess, on the service's own configuration file."""
    import os

    from mltasks.bench.service import bench_config, write_checked_config

    config_path = settings.work_dir / "mltasks-bench-model-floor.yaml"
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    write_checked_config(config_path, bench_config(settings))
    env = dict(
        os.environ,
        MLTASKS_CONFIG=str(config_path),
        MLTASKS_DATABASE_URL=settings.database_url,
        MLTASKS_MODELS_DIR=str(settings.models_dir),
    )
    level = settings.level if settings.level in (1, 2, 3) else 3
    argv = [sys.executable, "-m", "mltasks.bench.floor", "--database-url", settings.database_url]
    proc = ManagedProcess(
        "model floor",
        [*argv, "--model", "--level", str(level)],
        log_path=log_dir / "model-floor.log",
        env=env,
    )
    try:
        proc.start()
        wait_until_answering(settings.database_url, [proc], timeout_s=300)
        yield Running([proc])
    finally:
        stop_all([proc])


def model_floor_responder(settings: ServiceSettings, log_dir: Path) -> Responder:
    return Responder(
        "model floor", lambda: model_floor(settings, log_dir), {"responder": "model floor"}
    )


BROKER_FLOOR_WORKERS = 2
FLOOR_NAMES = ("floor", "model floor", "broker floor", "plumbing floor")


@contextmanager
def broker_floor(url: str, redis_url: str, log_dir: Path) -> Iterator[Running]:
    """The broker floor: its bridge and two solo workers on the run's Redis, whose broker
    db is flushed first (as for the service: no batch left from another run)."""
    import os

    import redis

    from mltasks.bench.brokerfloor import DATABASE_ENV, QUEUE
    from mltasks.bench.service import BROKER_DB
    from mltasks.config import RedisConfig

    broker = RedisConfig(url=redis_url).db_url(BROKER_DB)
    client = redis.Redis.from_url(broker, socket_timeout=5)
    try:
        client.flushdb()
    finally:
        client.close()
    env = dict(os.environ, **{DATABASE_ENV: url})
    app = ["-m", "celery", "-A", "mltasks.bench.brokerfloor", "-b", broker, "worker"]
    quiet = ["--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "WARNING"]
    procs = [
        ManagedProcess(
            f"broker floor-worker{i + 1}",
            [sys.executable, *app, "-Q", QUEUE, "--pool", "solo", "-n", f"bf{i + 1}@%h", *quiet],
            log_path=log_dir / f"broker-floor-worker{i + 1}.log",
            env=env,
        )
        for i in range(BROKER_FLOOR_WORKERS)
    ]
    bridge = [sys.executable, "-m", "mltasks.bench.brokerfloor", "--database-url", url]
    procs.append(
        ManagedProcess(
            "broker floor-bridge",
            [*bridge, "--broker-url", broker],
            log_path=log_dir / "broker-floor-bridge.log",
        )
    )
    try:
        for p in procs:
            p.start()
        wait_until_answering(url, procs, timeout_s=120)
        yield Running(procs)
    finally:
        stop_all(procs)


def broker_floor_responder(url: str, redis_url: str, log_dir: Path) -> Responder:
    return Responder(
        "broker floor",
        lambda: broker_floor(url, redis_url, log_dir),
        {"responder": "broker floor", "workers": BROKER_FLOOR_WORKERS, "pool": "solo"},
    )


PLUMBING_APP = "mltasks.bench.plumbingapp"


def plumbing_floor_responder(settings: ServiceSettings) -> Responder:
    """The service as ``settings`` deploy it, its workers answering with the broker
    floor's tiny model (mltasks/bench/plumbingfloor.py)."""
    plumbing = dataclasses.replace(settings, app=PLUMBING_APP)
    return Responder(
        "plumbing floor",
        lambda: service(plumbing, "plumbing-floor"),
        {"responder": "plumbing floor", **plumbing.describe()},
    )


def service_responder(settings: ServiceSettings, name: str | None = None) -> Responder:
    """The service as ``settings`` deploy it, called ``name`` (default: its label); the
    name, made a file name, also names its config file and logs."""
    label = name or settings.label()
    slug = re.sub(r"[^\w.=+-]+", "-", label)
    return Responder(
        label,
        lambda: service(settings, slug),
        {"responder": "service", **settings.describe()},
        (LEVEL5_REASON,) if settings.level == 5 else (),
    )
