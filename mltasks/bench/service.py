"""The real service for one benchmark run: one bridge and one Celery worker, as subprocesses.

They run exactly as deployed (``python -m bridge``; ``python -m celery -A mltasks worker``)
with a configuration file of their own that points them at the benchmark's database,
Redis databases and models, so a run never touches anyone else's queues.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil
import redis
import yaml

from mltasks.bench import BenchError
from mltasks.bench.procs import ManagedProcess, stop_all, wait_until_answering
from mltasks.config import RedisConfig, load_config

BROKER_DB = 9
CACHE_DB = 10
MB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    database_url: str = field(repr=False)
    redis_url: str
    models_dir: Path
    work_dir: Path  # the run's config file; the children's working directory
    log_dir: Path
    timeout_ms: int = 100
    concurrency: int = 2


def bench_config(s: ServiceSettings) -> dict[str, Any]:
    """The service's configuration for a run (keys of config/mltasks.yaml).

    The deadline is the game's timeout: a request older than that is wasted work.
    """
    return {
        "models": {"dir": str(s.models_dir), "preload": "all"},
        "inference": {"max_latency_ms": max(5, s.timeout_ms)},
        "database": {"url": s.database_url},
        "redis": {"url": s.redis_url, "broker_db": BROKER_DB, "cache_db": CACHE_DB},
        "worker": {"concurrency": s.concurrency},
        "logging": {"level": "WARNING"},
    }


class Service:
    """Bridge + worker, started together, stopped together (also on errors and Ctrl-C)."""

    def __init__(self, settings: ServiceSettings, *, label: str = "service") -> None:
        self.settings = settings
        self.label = label
        self.procs: list[ManagedProcess] = []
        self.worker: ManagedProcess | None = None
        self.exit_codes: dict[str, int | None] = {}

    def _env(self, config_path: Path) -> dict[str, str]:
        s = self.settings
        env = dict(os.environ)
        env.update(
            MLTASKS_CONFIG=str(config_path),
            MLTASKS_DATABASE_URL=s.database_url,
            MLTASKS_REDIS_URL=s.redis_url,
            MLTASKS_MODELS_DIR=str(s.models_dir),
            PYTHONUNBUFFERED="1",
        )
        return env

    def _flush_redis(self) -> None:
        """A fresh broker and cache: no batch or cached action left over from another run."""
        cfg = RedisConfig(url=self.settings.redis_url)
        for db in (BROKER_DB, CACHE_DB):
            client = redis.Redis.from_url(cfg.db_url(db), socket_timeout=5)
            try:
                client.flushdb()
            except redis.RedisError as exc:
                raise BenchError(f"cannot flush Redis db {db}: {exc}") from exc
            finally:
                client.close()

    def start(self) -> None:
        s = self.settings
        s.work_dir.mkdir(parents=True, exist_ok=True)
        config_path = s.work_dir / "mltasks-bench.yaml"
        config_path.write_text(yaml.safe_dump(bench_config(s), sort_keys=False))
        load_config(config_path, environ={})  # a bad key stops here, not in a child
        self._flush_redis()
        env = self._env(config_path)
        logs = s.log_dir
        self.worker = ManagedProcess(
            f"{self.label}-worker",
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "mltasks",
                "worker",
                "-Q",
                "cpu",
                "--concurrency",
                str(s.concurrency),
                "--pool",
                os.environ.get("MLTASKS_BENCH_POOL", "prefork"),
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-l",
                "WARNING",
            ],
            log_path=logs / f"{self.label}-worker.log",
            env=env,
            cwd=s.work_dir,
        )
        bridge = ManagedProcess(
            f"{self.label}-bridge",
            [sys.executable, "-m", "bridge"],
            log_path=logs / f"{self.label}-bridge.log",
            env=env,
            cwd=s.work_dir,
        )
        # The worker first: loading 54 models per child is the slow part.
        for p in (self.worker, bridge):
            self.procs.append(p)
            p.start()

    def wait_ready(self, timeout_s: float = 180.0) -> float:
        """Seconds until a warm-up request came back from a worker (not a bridge 255)."""
        return wait_until_answering(self.settings.database_url, self.procs, timeout_s=timeout_s)

    def worker_memory(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """RSS and USS of the worker and of each pool child, once every child is idle.

        Idle means no CPU used for a while: with ``preload: all`` a child loads its 54
        models after the fork, so an idle child (and no traffic) has all of them loaded.
        """
        if self.worker is None:
            raise BenchError("the service was not started")
        main = psutil.Process(self.worker.pid)
        deadline = time.monotonic() + timeout_s
        children: list[psutil.Process] = []
        while time.monotonic() < deadline:
            self.worker.check()
            children = main.children()
            if len(children) >= self.settings.concurrency and _idle(children, 0.3):
                break
        else:
            raise BenchError(f"worker children were not idle within {timeout_s:.0f}s")
        return {
            "worker_main_rss_mb": round(main.memory_info().rss / MB, 1),
            "children": [_memory(c) for c in children],
        }

    def stop(self) -> dict[str, int | None]:
        self.exit_codes = stop_all(self.procs)
        self.procs.clear()
        return self.exit_codes

    def __enter__(self) -> Service:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        tp: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _idle(procs: list[psutil.Process], window_s: float) -> bool:
    """True when none of ``procs`` used more than 1% of a core over ``window_s``."""
    try:
        before = [sum(p.cpu_times()[:2]) for p in procs]
        time.sleep(window_s)  # the measuring window itself, not a wait for a condition
        after = [sum(p.cpu_times()[:2]) for p in procs]
    except psutil.NoSuchProcess:
        return False
    return all(a - b <= 0.01 * window_s for a, b in zip(after, before, strict=True))


def _memory(p: psutil.Process) -> dict[str, Any]:
    info: dict[str, Any] = {"pid": p.pid, "rss_mb": round(p.memory_info().rss / MB, 1)}
    with contextlib.suppress(psutil.Error):
        info["uss_mb"] = round(p.memory_full_info().uss / MB, 1)
    return info
