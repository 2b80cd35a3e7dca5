"""The real service for one benchmark run: a bridge and (below level 5) a Celery worker.

They run exactly as deployed (``python -m bridge``; ``python -m celery -A mltasks worker``)
with a configuration file of their own that points them at the benchmark's database,
Redis databases and models, so a run never touches anyone else's queues or ports.

The configurations compared (`ServiceSettings`):

| level      | what runs                                  | who answers              |
| ---------- | ------------------------------------------ | ------------------------ |
| (deployed) | bridge + ``-Q cpu`` worker, service config | models; the ladder moves |
| 3          | bridge + ``-Q cpu`` worker, level 3 set    | the worker's models      |
| 4          | bridge + ``-Q rules`` worker, level 4 set  | the rule policy          |
| 5          | the bridge alone, level 5 set              | the bridge: 255          |

with the worker pool (prefork, threads, solo), its concurrency and the cache
(``caching.enabled``) as chosen. Without a level the service runs as deployed: its own
fallback settings, nothing written into Redis, so its probes (CPU load, queue lag) may
move it down during a run, which the report shows. With a level, the level is written
into Redis before the bridge starts (``LevelStore.set``) and, unless ``hold_level`` is
off, the probes and failure counters get thresholds they cannot reach, so the level
measured is the level asked for (on a 2-core machine shared with other work the
CPU-load probe would otherwise trip and measure level 5 instead).
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import psutil
import redis

from mltasks.bench import BenchError
from mltasks.bench.procs import ManagedProcess, stop_all, wait_until_answering
from mltasks.config import Config, FallbackConfig, RedisConfig
from mltasks.fallback.ladder import LEVEL_QUEUE
from mltasks.ops import launcher
from mltasks.ops.launcher import bridge_argv, experience_argv, service_env, write_config
from mltasks.ops.processes import free_port

BROKER_DB = 9
CACHE_DB = 10
MB = 1024 * 1024

Pool = Literal["prefork", "threads", "solo"]
POOLS: tuple[Pool, ...] = ("prefork", "threads", "solo")
LEVELS = (3, 4, 5)
LEVEL5_REASON = "fallback_level_5"

# Thresholds the probes and failure counters cannot reach while the level is held.
_HELD_FALLBACK: dict[str, Any] = {
    "failure_threshold": 1000,
    "cpu_load_per_core": 1.0e6,
    "queue_lag_ms": 24 * 3600 * 1000,
}


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    database_url: str = field(repr=False)
    redis_url: str
    models_dir: Path
    work_dir: Path  # the run's config file; the children's working directory
    log_dir: Path
    timeout_ms: int = 100
    concurrency: int = 2  # solo: this many worker processes; prefork/threads: pool size
    pool: Pool = "solo"
    caching: bool = True
    level: int | None = None  # None: as deployed, nothing forced
    hold_level: bool = True
    layout: str = "encoder"
    bridges: int = 1  # `python -m bridge` processes (they never double-claim)
    workers: int | None = None  # worker processes; None: solo `concurrency`, else one
    # More config keys (bench --set): (section, key, value), applied last.
    overrides: tuple[tuple[str, str, Any], ...] = ()
    # The Celery app the workers run (`celery -A`): the plumbing floor's is
    # mltasks.bench.plumbingapp, the service with a fixed answering path.
    app: str = "mltasks"

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise BenchError(f"pool {self.pool!r} is not one of {POOLS}")
        if self.level is not None and self.level not in LEVELS:
            raise BenchError(f"level {self.level} is not one of {LEVELS}")
        if self.concurrency < 1:
            raise BenchError("concurrency must be at least 1")
        if self.bridges < 1 or (self.workers is not None and self.workers < 1):
            raise BenchError("bridges and workers must be at least 1")

    @property
    def worker_processes(self) -> int:
        if self.workers is not None:
            return self.workers
        return self.concurrency if self.pool == "solo" else 1

    @property
    def worker_concurrency(self) -> int:
        return 1 if self.pool == "solo" else self.concurrency

    @property
    def queue(self) -> str | None:
        """The queue the worker consumes; None at level 5 (no worker)."""
        return "cpu" if self.level is None else LEVEL_QUEUE.get(self.level)

    def describe(self) -> dict[str, Any]:
        """The settings that tell runs apart, JSON-ready."""
        d: dict[str, Any] = {"level": self.level, "caching": self.caching}
        if self.queue is not None:
            d.update(pool=self.pool, concurrency=self.concurrency, queue=self.queue)
            d["workers"] = self.worker_processes
        d["bridges"] = self.bridges
        if self.level is not None:
            d["level_held"] = self.hold_level
        if self.overrides:
            d["set"] = {f"{sec}.{key}": value for sec, key, value in self.overrides}
        return d

    def label(self) -> str:
        """A short name for tables: ``service L3 prefork x2``, ``service L5``."""
        parts = ["service" if self.level is None else f"service L{self.level}"]
        if self.queue is not None:
            parts.append(f"{self.pool} x{self.concurrency}")  # solo: worker processes
            if self.workers is not None:
                parts.append(f"{self.workers} workers")
        if self.bridges > 1:
            parts.append(f"{self.bridges} bridges")
        if not self.caching:
            parts.append("no cache")
        return " ".join(parts)


def default_pool() -> Pool:
    """The deployed shape of the CPU tier: one solo worker per core (README, deploy.md).

    Measured on this 2-core machine (docs/PERFORMANCE.md): two solo workers answered
    1.2-1.5x the decisions/s of one prefork worker with two children, which pays a pipe
    round trip to its child for every batch.
    """
    return "solo"


def _worker(s: ServiceSettings) -> dict[str, Any]:
    """The worker section. The pool goes into the config too where the config has it:
    Celery then takes ``worker_pool`` from the config over a ``--pool prefork`` on the
    command line (it cannot tell that value from its own default)."""
    return {"concurrency": s.worker_concurrency, "pool": s.pool}


def _monitoring() -> dict[str, Any]:
    """Metrics stay on (they are part of what the service costs), on free ports."""
    return {
        "metrics_host": "127.0.0.1",
        "metrics_port": free_port(),
        "bridge_metrics_port": free_port(),
    }


def bench_config(s: ServiceSettings) -> dict[str, Any]:
    """The service's configuration for a run (keys of config/mltasks.yaml).

    The deadline is the game's timeout: a request older than that is wasted work.
    """
    fallback: dict[str, Any] = {}
    if s.level is not None:
        fallback["start_level"] = s.level
        if s.hold_level:
            fallback.update(_HELD_FALLBACK)
    doc: dict[str, Any] = {
        "models": {"dir": str(s.models_dir), "preload": "all"},
        "state": {"layout": s.layout},
        "inference": {"max_latency_ms": max(5, s.timeout_ms)},
        "database": {"url": s.database_url},
        "redis": {"url": s.redis_url, "broker_db": BROKER_DB, "cache_db": CACHE_DB},
        "caching": {"enabled": s.caching},
        **({"fallback": fallback} if fallback else {}),
        "worker": _worker(s),
        "monitoring": _monitoring(),
        # Off unless --set experience.enabled=true; its /metrics on a free port either way.
        "experience": {"metrics_port": free_port()},
        "logging": {"level": "WARNING"},
    }
    for section, key, value in s.overrides:
        doc.setdefault(section, {})[key] = value
    return doc


def flush_bench_dbs(redis_url: str) -> None:
    """A fresh broker and cache: no batch, cached action or level left from another run
    (the benchmark's dbs 9 and 10 of ``redis_url``, never another)."""
    cfg = RedisConfig(url=redis_url)
    for db in (BROKER_DB, CACHE_DB):
        client = redis.Redis.from_url(cfg.db_url(db), socket_timeout=5)
        try:
            client.flushdb()
        except redis.RedisError as exc:
            raise BenchError(f"cannot flush Redis db {db}: {exc}") from exc
        finally:
            client.close()


# Keys the benchmark sets when the service's code has them; one it does not know (an older
# or newer checkout, or a colleague's change landing mid-run) is left out, not fatal.
OPTIONAL_KEYS = {
    ("worker", "pool"),
    ("monitoring", "metrics_port"),
    ("monitoring", "bridge_metrics_port"),
    ("monitoring", "metrics_host"),
    ("experience", "metrics_port"),
}
_CHECK = "import sys; from mltasks.config import load_config; load_config(sys.argv[1], environ={})"
_UNKNOWN = re.compile(r"(\w+)\.(\w+): unknown key")


def write_checked_config(path: Path, doc: dict[str, Any]) -> dict[str, Any]:
    """Write the run's YAML and load it the way the children will: in a fresh interpreter
    with the service's code as it is on disk now (it may have changed since this process
    started). Optional keys the code does not know are dropped; anything else it rejects
    raises BenchError with the service's own message."""
    for _ in range(len(OPTIONAL_KEYS) + 1):
        write_config(path, doc)
        done = subprocess.run(
            [sys.executable, "-c", _CHECK, str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode == 0:
            return doc
        unknown = _UNKNOWN.search(done.stderr)
        if unknown and (unknown[1], unknown[2]) in OPTIONAL_KEYS:
            del doc[unknown[1]][unknown[2]]
            continue
        last = done.stderr.strip().splitlines()[-1:] or ["no message"]
        raise BenchError(f"the service rejects the benchmark's configuration: {last[0]}")
    raise BenchError("the service rejects the benchmark's configuration")


def experience_enabled(s: ServiceSettings) -> bool:
    """``--set experience.enabled=true``: the run has the experience recorder, as a
    deployment that records runs it beside the service (off by default, as built in). The
    last setting counts, as in the config (``--vary`` sets its value after ``--set``'s)."""
    values = [v for sec, key, v in s.overrides if (sec, key) == ("experience", "enabled")]
    return bool(values) and values[-1] in (True, "true", "1", "yes")


def worker_argv(s: ServiceSettings, node: str) -> list[str]:
    """One worker's command line. The pool is chosen here, never in the config: the
    config has no pool key, and Celery cannot tell a configured ``--pool prefork`` from
    its default."""
    assert s.queue is not None
    pool = ["--concurrency", str(s.worker_concurrency), "--pool", s.pool]
    quiet = ["--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "WARNING"]
    return launcher.worker_argv(s.queue, "-n", node, *pool, *quiet, app=s.app)


def cache_redis(redis_url: str) -> redis.Redis:
    """A client on the benchmark's cache db (hit counters, the fallback level)."""
    return redis.Redis.from_url(RedisConfig(url=redis_url).db_url(CACHE_DB), socket_timeout=5)


class Service:
    """Bridge (+ worker), started together, stopped together (also on errors and Ctrl-C)."""

    def __init__(self, settings: ServiceSettings, *, label: str = "service") -> None:
        self.settings = settings
        self.label = label
        self.procs: list[ManagedProcess] = []
        self.worker: ManagedProcess | None = None  # the first of ``workers``
        self.workers: list[ManagedProcess] = []
        self.config: Config | None = None
        self.config_path: Path | None = None  # the run's config file, once started
        self.exit_codes: dict[str, int | None] = {}

    def command_env(self) -> dict[str, str]:
        """The environment of the service's processes: an operator's command (``mltasks
        models deploy``) run with it acts on this service, its Redis and its models."""
        if self.config_path is None:
            raise BenchError("the service was not started")
        return self._env(self.config_path)

    def _env(self, config_path: Path) -> dict[str, str]:
        s = self.settings
        return service_env(
            config=config_path,
            database_url=s.database_url,
            redis_url=s.redis_url,
            models_dir=s.models_dir,
            # a multi-process metrics directory left over from someone else's shell
            drop=("PROMETHEUS_MULTIPROC_DIR",),
            PYTHONUNBUFFERED="1",
        )

    def _flush_redis(self) -> None:
        flush_bench_dbs(self.settings.redis_url)

    def force_level(self) -> None:
        """Write the level asked for into Redis (the bridge routes on it)."""
        from mltasks.fallback.levels import LevelStore

        if self.config is None:
            raise BenchError("the service was not started")
        if self.settings.level is None:
            return
        store = LevelStore(self.config)
        try:
            store.set(self.settings.level, "bench")
        except redis.RedisError as exc:
            raise BenchError(f"cannot set the fallback level in Redis: {exc}") from exc
        finally:
            store.redis.close()

    def level_now(self) -> int | None:
        """The level Redis holds now (None when unreadable)."""
        from mltasks.fallback.levels import LevelStore

        if self.config is None:
            return None
        store = LevelStore(self.config)
        try:
            return int(store.read().level)
        finally:
            store.redis.close()

    def start(self) -> None:
        s = self.settings
        s.work_dir.mkdir(parents=True, exist_ok=True)
        config_path = s.work_dir / f"mltasks-bench-{self.label}.yaml"
        write_checked_config(config_path, bench_config(s))  # a bad key stops here
        self.config_path = config_path
        # What this process needs of it: where the level lives.
        self.config = Config(
            redis=RedisConfig(url=s.redis_url, broker_db=BROKER_DB, cache_db=CACHE_DB),
            fallback=FallbackConfig(start_level=s.level or 1),
        )
        self._flush_redis()
        self.force_level()
        env = self._env(config_path)

        def spawn(name: str, argv: list[str]) -> ManagedProcess:
            proc = ManagedProcess(
                name, argv, log_path=s.log_dir / f"{name}.log", env=env, cwd=s.work_dir
            )
            self.procs.append(proc)
            proc.start()
            return proc

        if s.queue is not None:
            # solo runs one process per worker: `concurrency` solo workers, one per core.
            # The workers first: loading 54 models per process is the slow part.
            count = s.worker_processes
            for i in range(count):
                name = f"{self.label}-worker" + (f"{i + 1}" if count > 1 else "")
                self.workers.append(spawn(name, worker_argv(s, f"{name}-{i + 1}@%h")))
            self.worker = self.workers[0]
        for i in range(s.bridges):
            name = f"{self.label}-bridge" + (f"{i + 1}" if s.bridges > 1 else "")
            spawn(name, bridge_argv())
        if experience_enabled(s):
            spawn(f"{self.label}-experience", experience_argv())

    def wait_ready(self, timeout_s: float = 180.0) -> float:
        """Seconds until the configuration answers a warm-up request itself, workers idle.

        Levels 3 and 4: answered by the worker (model, cache or rules), not by a bridge
        255, and then every pool process idle, so all of them have their models loaded.
        Level 5: answered 255 by the bridge for the fallback level.
        """
        t0 = time.monotonic()
        url = self.settings.database_url
        if self.settings.level == 5:
            wait_until_answering(
                url, self.procs, timeout_s=timeout_s, accept_reasons=(LEVEL5_REASON,)
            )
        else:
            wait_until_answering(url, self.procs, timeout_s=timeout_s)
            self.wait_idle(max(10.0, timeout_s - (time.monotonic() - t0)))
        return time.monotonic() - t0

    def _pool_processes(self) -> list[tuple[psutil.Process, list[psutil.Process]]]:
        """Each worker's main process with its prefork children (none for solo, threads)."""
        if not self.workers:
            raise BenchError("no worker in this configuration")
        out = []
        for w in self.workers:
            main = psutil.Process(w.pid)
            out.append((main, main.children() if self.settings.pool == "prefork" else []))
        return out

    def task_processes(self) -> list[psutil.Process]:
        """The processes that run tasks: prefork children, else the workers themselves."""
        return [p for main, kids in self._pool_processes() for p in (kids or [main])]

    def wait_idle(self, timeout_s: float = 60.0) -> None:
        """Until every process that runs tasks used no CPU for a while.

        Prefork: the pool children (each loads its models after the fork), all of them
        forked. Threads and solo: the workers' main processes, where the tasks run.
        """
        if not self.workers:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for w in self.workers:
                w.check()
            pools = self._pool_processes()
            if self.settings.pool == "prefork":
                kids = [k for _, ks in pools for k in ks]
                if len(kids) >= self.settings.worker_concurrency and _idle(kids, 0.3, 0.01):
                    return
            # The main process beats heartbeats and probes: allow it a little.
            elif _idle([main for main, _ in pools], 0.5, 0.05):
                return
        raise BenchError(f"the worker's pool was not idle within {timeout_s:.0f}s")

    def worker_memory(self) -> dict[str, Any] | None:
        """RSS and USS of the worker and of each pool child (None without a worker).

        Read when the pool is idle (`wait_ready` or after a run): with ``preload: all``
        every process that runs tasks holds the 54 models then. With several solo
        workers, the first is the "main" and the others are listed as children.
        """
        if not self.workers:
            return None
        pools = self._pool_processes()
        main, kids = pools[0]
        kids = kids + [m for m, _ in pools[1:]]
        main_info = _memory(main)
        return {
            "pool": self.settings.pool,
            "workers": len(pools),
            "worker_main_rss_mb": main_info["rss_mb"],
            "worker_main_uss_mb": main_info.get("uss_mb"),
            "children": [_memory(c) for c in kids],
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


def _idle(procs: list[psutil.Process], window_s: float, max_share: float) -> bool:
    """True when none of ``procs`` used more than ``max_share`` of a core over ``window_s``."""
    try:
        before = [sum(p.cpu_times()[:2]) for p in procs]
        time.sleep(window_s)  # the measuring window itself, not a wait for a condition
        after = [sum(p.cpu_times()[:2]) for p in procs]
    except psutil.NoSuchProcess:
        return False
    return all(a - b <= max_share * window_s for a, b in zip(after, before, strict=True))


def _memory(p: psutil.Process) -> dict[str, Any]:
    info: dict[str, Any] = {"pid": p.pid, "rss_mb": round(p.memory_info().rss / MB, 1)}
    with contextlib.suppress(psutil.Error):
        info["uss_mb"] = round(p.memory_full_info().uss / MB, 1)
    return info
