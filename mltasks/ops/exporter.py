"""The ``/metrics`` endpoint of the bridge and of a worker: the HTTP server, multi-process
collection, and the gauges read from PostgreSQL and Redis at each scrape.

Two shapes of process:

- **A bridge** is one process: its metrics live in the default registry and
  `start_bridge_metrics` serves them, refreshing the service-wide gauges (queue depth and
  lag from PostgreSQL, cache hit rates from Redis) at each scrape.
- **A worker** is a Celery prefork pool: the main process forks children that run the
  tasks. prometheus-client's multi-process mode keeps each process's values in mmap files
  under ``PROMETHEUS_MULTIPROC_DIR``; the main process serves the sum of them
  (`start_worker_metrics`, called from Celery's ``celeryd_init``, before the pool forks).
  A child removes its live gauges when it exits (`mark_process_dead`, from
  ``worker_process_shutdown``); a child killed outright is found at the next scrape
  (`reap_dead_processes`).

The metrics themselves, and what records them, are `mltasks.metrics`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mltasks import metrics
from mltasks.metrics import (
    MULTIPROC_ENV,
    get_metrics,
    multiprocess_dir,
    multiprocess_enabled,
    set_cache_hit_rates,
    set_queue_stats,
)

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from mltasks.config import Config

# The metrics module's logger, as before the endpoint moved here: log filters know it.
log = logging.getLogger("mltasks.metrics")


def setup_multiprocess(
    directory: str | Path | None = None, *, service: str = "worker", clean: bool = True
) -> Path:
    """Switch this process (and the children it forks) to multi-process metrics.

    The directory: ``directory``, else ``$PROMETHEUS_MULTIPROC_DIR``, else a new temporary
    one per service (removed when this process exits). ``clean`` deletes the files a
    previous run left there: call this once, in the parent, before any child exists and
    before any metric is created.
    """
    chosen = directory if directory is not None else multiprocess_dir()
    created = chosen is None
    if chosen is None:
        path = Path(tempfile.mkdtemp(prefix=f"mltasks-{service}-metrics-"))
    else:
        path = Path(chosen)
        path.mkdir(parents=True, exist_ok=True)
    if clean and not created:
        for stale in path.glob("*.db"):
            stale.unlink(missing_ok=True)
    os.environ[MULTIPROC_ENV] = str(path)
    if created:
        owner = os.getpid()
        atexit.register(_remove_own_dir, path, owner)

    values: Any = sys.modules.get("prometheus_client.values")
    if values is not None and values.ValueClass is values.MutexValue:
        # Imported before the variable was set: make it choose its value class again.
        # (Never twice: two value classes would map the same files independently.)
        values.ValueClass = values.get_value_class()
        if metrics.created():
            log.warning(
                "metrics were created before multi-process mode: they are not shared",
                extra={"event": "metrics_mode_late"},
            )
    return path


def _remove_own_dir(path: Path, owner: int) -> None:
    if os.getpid() == owner:  # never from a forked child that inherited the handler
        shutil.rmtree(path, ignore_errors=True)


_LIVE_FILE = re.compile(r"^gauge_live[a-z]+_(\d+)\.db$")


def mark_process_dead(pid: int, directory: str | Path | None = None) -> None:
    """Drop the live gauges of process ``pid`` (a worker child that exits)."""
    path = directory if directory is not None else multiprocess_dir()
    if path is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    """The process exists and is no zombie (a killed child its parent has not reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, belongs to someone else
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no procfs (not Linux), or gone meanwhile: os.kill said it exists
        return True
    # "pid (comm) state ...": comm may hold spaces or parentheses, the state follows the last ")".
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def reap_dead_processes(directory: str | Path) -> list[int]:
    """Drop the live gauges of every process that is gone (killed without its hook)."""
    pids = {
        int(m.group(1)) for f in os.listdir(directory) if (m := _LIVE_FILE.match(f)) is not None
    }
    dead = sorted(pid for pid in pids if not _alive(pid))
    for pid in dead:
        mark_process_dead(pid, directory)
    return dead


class _MultiProcessFiles:
    """Collects the files of every process; reaps dead processes' live gauges first."""

    def __init__(self, directory: Path) -> None:
        from prometheus_client.multiprocess import MultiProcessCollector

        self.directory = directory
        self._inner = MultiProcessCollector(None, str(directory))  # type: ignore[no-untyped-call]

    def collect(self) -> Iterable[Metric]:
        reap_dead_processes(self.directory)
        metrics: Iterable[Metric] = self._inner.collect()  # type: ignore[no-untyped-call]
        return metrics


def multiprocess_registry(directory: str | Path | None = None) -> CollectorRegistry:
    """A registry that reads the metrics of all processes from the multi-process files."""
    from prometheus_client import CollectorRegistry

    path = Path(directory) if directory is not None else multiprocess_dir()
    if path is None:
        raise ValueError(f"{MULTIPROC_ENV} is not set: call setup_multiprocess() first")
    registry = CollectorRegistry()
    registry.register(_MultiProcessFiles(path))
    return registry


# --- the endpoint -----------------------------------------------------------------------------


Refresh = Callable[[], None]


class _Refreshing:
    """Runs the refresh callables, then yields what the source registry holds.

    A failing refresh is logged as a warning when it starts failing and at debug level
    while it goes on (scrapes come every few seconds), then once when it recovers.
    """

    def __init__(self, source: CollectorRegistry, refresh: Sequence[Refresh]) -> None:
        self.source = source
        self.refresh = refresh
        self._failing: set[int] = set()

    def collect(self) -> Iterable[Metric]:
        for i, fn in enumerate(self.refresh):
            name = getattr(fn, "__name__", type(fn).__name__)
            try:
                fn()
            except Exception as exc:  # a scrape must still answer with what it has
                level = logging.DEBUG if i in self._failing else logging.WARNING
                self._failing.add(i)
                log.log(
                    level,
                    "metrics refresh %s failed: %s",
                    name,
                    exc,
                    extra={"event": "metrics_refresh_failed", "refresh": name},
                )
            else:
                if i in self._failing:
                    self._failing.discard(i)
                    log.info(
                        "metrics refresh %s works again",
                        name,
                        extra={"event": "metrics_refresh_recovered", "refresh": name},
                    )
        return self.source.collect()


@dataclass(slots=True)
class MetricsServer:
    """A running ``/metrics`` endpoint (a daemon thread)."""

    host: str
    port: int
    server: WSGIServer
    thread: threading.Thread

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def start_metrics_server(
    host: str,
    port: int,
    registry: CollectorRegistry | None = None,
    *,
    refresh: Sequence[Refresh] = (),
) -> MetricsServer:
    """Serve ``registry`` on ``http://host:port/metrics`` from a daemon thread.

    ``registry``: by default the multi-process files when that mode is on, else the
    default registry. ``port`` 0 picks a free port (see the returned ``port``).
    ``refresh`` callables run before each scrape; one that raises is logged and skipped.
    Raises OSError when the address cannot be bound.
    """
    from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

    if registry is None:
        registry = multiprocess_registry() if multiprocess_enabled() else REGISTRY
    served = registry
    if refresh:
        served = CollectorRegistry()
        served.register(_Refreshing(registry, list(refresh)))
    server, thread = start_http_server(port, addr=host, registry=served)
    bound = MetricsServer(host, int(server.server_port), server, thread)
    log.info(
        "metrics on %s",
        bound.url,
        extra={"event": "metrics_listening", "port": bound.port},
    )
    return bound


def start_or_log(start: Callable[[], MetricsServer], host: str, port: int) -> MetricsServer | None:
    try:
        return start()
    except OSError as exc:  # metrics are never worth a service that does not start
        log.error(
            "cannot serve metrics on %s:%d: %s",
            host,
            port,
            exc,
            extra={"event": "metrics_unavailable", "port": port},
        )
        return None


def start_worker_metrics(
    host: str, port: int, directory: str | Path | None = None
) -> MetricsServer | None:
    """In a worker's main process, before the pool forks: multi-process mode and /metrics.

    None (and an error logged) when the port cannot be bound: the worker runs on.
    """
    path = setup_multiprocess(directory, service="worker")
    registry = multiprocess_registry(path)
    return start_or_log(lambda: start_metrics_server(host, port, registry), host, port)


def start_bridge_metrics(config: Config, host: str, port: int) -> MetricsServer | None:
    """A bridge's /metrics: its own registry, plus queue and cache gauges read at scrape."""
    from mltasks.cache.stats import stats_scope
    from mltasks.redisurl import cache_client

    refresh: list[Refresh] = [
        queue_stats_refresher(config.database.conninfo),
        cache_hit_rate_refresher(cache_client(config), scope=stats_scope(config)),
    ]
    get_metrics()
    return start_or_log(lambda: start_metrics_server(host, port, refresh=refresh), host, port)


# --- refreshed at scrape ----------------------------------------------------------------------


class QueueStatsRefresher:
    """Reads ``ai_requests``' pending depth and lag (``queue_stats``) into the gauges.

    Holds one connection of its own (scrapes run in the server's threads, never on the
    bridge's connection), reopened after an error; statements time out after 2 s.
    """

    def __init__(self, conninfo: str, statement_timeout_ms: int = 2000) -> None:
        self.conninfo = conninfo
        self.statement_timeout_ms = statement_timeout_ms
        self._conn: Any = None
        self._lock = threading.Lock()

    def read(self) -> tuple[int, float]:
        import psycopg

        from mltasks.sql import query

        with self._lock:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = psycopg.connect(
                        self.conninfo,
                        autocommit=True,
                        options=f"-c statement_timeout={self.statement_timeout_ms}",
                    )
                row = self._conn.execute(query("queue_stats")).fetchone()
            except psycopg.Error:
                self.close_locked()
                raise
        depth, lag = (row[0], row[1]) if row else (0, 0.0)
        return int(depth), float(lag or 0.0)

    def __call__(self) -> None:
        depth, lag = self.read()
        set_queue_stats(depth, lag)

    def close_locked(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self.close_locked()


def queue_stats_refresher(conninfo: str) -> QueueStatsRefresher:
    return QueueStatsRefresher(conninfo)


def cache_hit_rate_refresher(client: Any, window_s: int = 60, *, scope: str) -> Refresh:
    """Sets ``ml_cache_hit_rate`` from the hit counters this deployment's workers keep."""

    def cache_hit_rates() -> None:
        from mltasks.cache.stats import hit_rates

        rates = hit_rates(client, window_s, scope=scope)
        set_cache_hit_rates({str(layer): r for layer, r in rates.items()})

    return cache_hit_rates
