"""Prometheus metrics of the bridge and the workers, and the one ``/metrics`` endpoint each.

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

The mode is chosen by prometheus-client when it builds its first metric, from the
environment. So this module imports prometheus-client only inside functions, creates its
metrics on first use (in the process that uses them, after the fork), and
`setup_multiprocess` sets the variable (and, if some other module imported the library
first, makes it choose again) before any metric exists.

Metric names carry their unit; labels are few (``outcome``, ``layer``, ``device``).
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
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.metrics_core import Metric

    from mltasks.config import Config

log = logging.getLogger(__name__)

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"

# Seconds. The game polls every 2 ms and gives up after 15-100 ms: resolution where it matters.
INFERENCE_BUCKETS_S: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075,
    0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25,
)  # fmt: skip
REQUEST_BUCKETS_S: Final = (
    0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03,
    0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
# Rows per batch: inference.batch_size is 32..128.
BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)

# How a request was answered. ``traditional``: 255 from a worker (no model, model error);
# ``expired``: 255 from the bridge (past the deadline, broker down, game timeout).
OUTCOMES: Final = ("model", "cache", "rules", "traditional", "invalid", "expired")

# Every family this module exposes (what a dashboard or an alert may query; histograms
# add _bucket, _sum and _count).
METRIC_NAMES: Final = frozenset(
    {
        "ml_inference_latency_seconds",
        "ml_request_latency_seconds",
        "ml_requests_total",
        "ml_batch_size",
        "ml_cache_hit_rate",
        "ml_fallback_level",
        "ml_vram_usage_bytes",
        "ml_models_loaded_total",
        "ml_models_loaded_by_type",
        "ml_fusion_answers_total",
        "ml_service_up",
        "ml_queue_depth",
        "ml_queue_lag_seconds",
        "ml_model_version_info",
        "ml_model_swaps_total",
        "ml_canary_rows_total",
        "ml_canary_decisions_total",
        "ml_canary_last_rollback_timestamp_seconds",
    }
)

TRADITIONAL_AI: Final = 255

# A model answer came from one type alone, or from several fused (mltasks/models/fusion.py).
FUSION_KINDS: Final = ("single", "fused")


# --- the metrics ------------------------------------------------------------------------------


Mode = Literal["livemin", "livemax", "livemostrecent"]

# Gauges: (name, help, labels, how the values of several processes combine).
_GAUGES: Final[dict[str, tuple[str, str, tuple[str, ...], Mode]]] = {
    "cache_hit_rate": (
        "ml_cache_hit_rate",
        "Cache hits per lookup, by layer, over all workers (recent window)",
        ("layer",),
        "livemostrecent",
    ),
    "fallback_level": (
        "ml_fallback_level",
        "Shared fallback level: 1 GPU FP16, 2 GPU INT8, 3 CPU, 4 rules, 5 traditional (255)",
        (),
        "livemostrecent",
    ),
    "vram_usage": (
        "ml_vram_usage_bytes",
        "Memory used on a GPU, as NVML reports it",
        ("device",),
        "livemostrecent",
    ),
    "models_loaded": (
        "ml_models_loaded_total",
        "ONNX models loaded per worker process (the lowest live process)",
        (),
        "livemin",
    ),
    "models_by_type": (
        "ml_models_loaded_by_type",
        "ONNX models loaded per worker process, by model type (the lowest live process)",
        ("model_type",),
        "livemin",
    ),
    "service_up": ("ml_service_up", "1 while a process is ready to answer", (), "livemax"),
    "queue_depth": ("ml_queue_depth", "Rows pending in ai_requests", (), "livemostrecent"),
    "queue_lag": (
        "ml_queue_lag_seconds",
        "Age of the oldest pending row in ai_requests (0 when none)",
        (),
        "livemostrecent",
    ),
    "model_version": (
        "ml_model_version_info",
        "1 for the version a worker serves (role active) or shadows (role candidate), 0 for"
        " one it stopped using",
        ("model", "version", "role"),
        "livemostrecent",
    ),
    "canary_last_rollback": (
        "ml_canary_last_rollback_timestamp_seconds",
        "Unix time of a model's last automatic canary rollback",
        ("model",),
        "livemostrecent",
    ),
}


class Metrics:
    """The metric objects of one process.

    Histograms and the counter exist from the start (a zero adds nothing to a sum).
    Gauges are made on first set: in multi-process mode a gauge that exists holds a value
    for its process, and a main process that never loads a model must not show 0 models.
    Their modes: ``livemostrecent`` for shared state every process reads alike (level,
    cache rates, VRAM of a device, queue), ``livemin`` for models loaded (the worst live
    process shows), ``livemax`` for up. ``live`` modes drop a process's value when it dies.
    """

    def __init__(self, registry: CollectorRegistry | None) -> None:
        from prometheus_client import Counter, Histogram

        self.registry = registry
        self._gauges: dict[str, Gauge] = {}
        self._lock = threading.Lock()
        self.inference_latency: Histogram = Histogram(
            "ml_inference_latency_seconds",
            "Duration of one batched model call (one archetype group of a batch)",
            buckets=INFERENCE_BUCKETS_S,
            registry=registry,
        )
        self.request_latency: Histogram = Histogram(
            "ml_request_latency_seconds",
            "From a request's created_at to its answer being written",
            buckets=REQUEST_BUCKETS_S,
            registry=registry,
        )
        self.requests: Counter = Counter(
            "ml_requests",
            "Requests answered, by outcome",
            ["outcome"],
            registry=registry,
        )
        self.batch_size: Histogram = Histogram(
            "ml_batch_size",
            "Rows per batch task a worker processed",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.fusion_answers: Counter = Counter(
            "ml_fusion_answers",
            "Model answers by how many model types had a say: single or fused",
            ["kind"],
            registry=registry,
        )
        self.model_swaps: Counter = Counter(
            "ml_model_swaps",
            "Model versions swapped in between batches, by model",
            ["model"],
            registry=registry,
        )
        self.canary_rows: Counter = Counter(
            "ml_canary_rows",
            "Rows a canary candidate ran on beside the active version, by model",
            ["model"],
            registry=registry,
        )
        self.canary_decisions: Counter = Counter(
            "ml_canary_decisions",
            "Canary verdicts: promoted or rolled_back (limit: the one broken)",
            ["model", "decision", "limit"],
            registry=registry,
        )
        # Every outcome exists from the start, so rate() and ratios work before the first one.
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        for kind in FUSION_KINDS:
            self.fusion_answers.labels(kind)

    def gauge(self, key: str) -> Gauge:
        """The gauge ``key`` of `_GAUGES`, made on first use."""
        with self._lock:
            g = self._gauges.get(key)
            if g is None:
                from prometheus_client import Gauge

                name, doc, labels, mode = _GAUGES[key]
                g = Gauge(name, doc, labels, registry=self.registry, multiprocess_mode=mode)
                self._gauges[key] = g
            return g

    @property
    def cache_hit_rate(self) -> Gauge:
        return self.gauge("cache_hit_rate")

    @property
    def fallback_level(self) -> Gauge:
        return self.gauge("fallback_level")

    @property
    def vram_usage(self) -> Gauge:
        return self.gauge("vram_usage")

    @property
    def models_loaded(self) -> Gauge:
        return self.gauge("models_loaded")

    @property
    def service_up(self) -> Gauge:
        return self.gauge("service_up")

    @property
    def queue_depth(self) -> Gauge:
        return self.gauge("queue_depth")

    @property
    def queue_lag(self) -> Gauge:
        return self.gauge("queue_lag")

    def collectors(self) -> list[Counter | Gauge | Histogram]:
        with self._lock:
            gauges = list(self._gauges.values())
        return [
            self.inference_latency,
            self.request_latency,
            self.requests,
            self.batch_size,
            self.fusion_answers,
            self.model_swaps,
            self.canary_rows,
            self.canary_decisions,
            *gauges,
        ]

    def unregister(self) -> None:
        """Take these metrics out of their registry (so new ones may take the names)."""
        if self.registry is not None:
            for collector in self.collectors():
                with contextlib.suppress(KeyError):
                    self.registry.unregister(collector)


_metrics: Metrics | None = None
_metrics_lock = threading.Lock()


def get_metrics() -> Metrics:
    """This process's metrics, created on first use.

    In multi-process mode they belong to no registry (the files are the registry);
    otherwise to prometheus-client's default one, beside its process collectors.
    """
    global _metrics
    with _metrics_lock:
        if _metrics is None:
            registry: CollectorRegistry | None = None
            if not multiprocess_enabled():
                from prometheus_client import REGISTRY

                registry = REGISTRY
            _metrics = Metrics(registry)
        return _metrics


def reset_metrics() -> None:
    """Forget this process's metrics and unregister them (tests)."""
    global _metrics
    with _metrics_lock:
        if _metrics is not None:
            _metrics.unregister()
        _metrics = None


# --- recording --------------------------------------------------------------------------------


class AnswerLike(Protocol):
    """What `count_outcomes` reads of an answer (mltasks.serving.inference.Answer fits)."""

    @property
    def action_id(self) -> int: ...

    @property
    def source(self) -> str: ...

    @property
    def status(self) -> str: ...


def outcome_of(answer: AnswerLike) -> str:
    """The ``outcome`` label of one answer."""
    if answer.status == "invalid":
        return "invalid"
    if answer.status == "expired":
        return "expired"
    if answer.action_id == TRADITIONAL_AI:
        return "traditional"
    if answer.source in ("model", "cache", "rules"):
        return answer.source
    return "traditional"


def count_outcomes(answers: Iterable[AnswerLike]) -> dict[str, int]:
    """``{outcome: n}`` for a batch of answers, ready for `observe_answers`."""
    counts: dict[str, int] = {}
    for answer in answers:
        outcome = outcome_of(answer)
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def seconds_since(created_epochs: Iterable[float | None], now: float | None = None) -> list[float]:
    """End-to-end latencies from ``created_at`` epochs (None skipped, never negative).

    The epochs come from the database's clock and ``now`` from this host's: keep the
    hosts on NTP, or the skew shows up here.
    """
    t = time.time() if now is None else now
    return [max(0.0, t - float(c)) for c in created_epochs if c is not None]


def observe_answers(outcomes: Mapping[str, int], e2e_seconds: Sequence[float]) -> None:
    """Count answered requests by outcome and record their end-to-end latencies.

    Raises ValueError for an outcome not in `OUTCOMES` (a programming error: the label
    set must stay small and known).
    """
    unknown = sorted(set(outcomes) - set(OUTCOMES))
    if unknown:
        raise ValueError(f"unknown outcome(s) {unknown}: expected one of {OUTCOMES}")
    m = get_metrics()
    for outcome, n in outcomes.items():
        if n > 0:
            m.requests.labels(outcome).inc(n)
    for seconds in e2e_seconds:
        m.request_latency.observe(max(0.0, seconds))


def observe_inference(seconds: float) -> None:
    """One batched model call took ``seconds``."""
    get_metrics().inference_latency.observe(seconds)


@contextlib.contextmanager
def time_inference() -> Iterator[None]:
    """``with time_inference(): model.logits(states)``: `observe_inference` around a call."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        observe_inference(time.perf_counter() - t0)


def observe_batch(size: int) -> None:
    """A worker took a batch of ``size`` rows."""
    get_metrics().batch_size.observe(size)


def set_cache_hit_rates(rates: Mapping[str, float]) -> None:
    """Hit rate per cache layer (``l1``, ``l2``, ``l3``), 0..1."""
    m = get_metrics()
    for layer, rate in rates.items():
        m.cache_hit_rate.labels(layer).set(rate)


def set_fallback_level(level: int) -> None:
    """The shared fallback level (mltasks.fallback.levels.Level, 1..5)."""
    get_metrics().fallback_level.set(level)


def set_vram_usage(device: int | str, used_bytes: int) -> None:
    """Bytes used on GPU ``device``."""
    get_metrics().vram_usage.labels(str(device)).set(used_bytes)


def set_models_loaded(count: int) -> None:
    """Models this process has loaded."""
    get_metrics().models_loaded.set(count)


def set_models_by_type(counts: Mapping[str, int]) -> None:
    """Models this process has loaded, per model type."""
    gauge = get_metrics().gauge("models_by_type")
    for model_type, n in counts.items():
        gauge.labels(model_type).set(n)


def observe_fusion(counts: Mapping[str, int]) -> None:
    """Count model answers by kind (`FUSION_KINDS`)."""
    m = get_metrics()
    for kind, n in counts.items():
        if kind in FUSION_KINDS and n > 0:
            m.fusion_answers.labels(kind).inc(n)


def set_model_version(model: str, version: str, role: str, on: bool = True) -> None:
    """A version this process serves (role ``active``) or shadows (``candidate``); 0 when
    it stopped."""
    get_metrics().gauge("model_version").labels(model, version, role).set(1 if on else 0)


def observe_model_swap(model: str) -> None:
    get_metrics().model_swaps.labels(model).inc()


def observe_canary_rows(model: str, rows: int) -> None:
    get_metrics().canary_rows.labels(model).inc(rows)


def observe_canary_decision(model: str, decision: str, limit: str) -> None:
    m = get_metrics()
    m.canary_decisions.labels(model, decision, limit).inc()
    if decision == "rolled_back":
        m.gauge("canary_last_rollback").labels(model).set(time.time())


def set_service_up(up: bool) -> None:
    """1 when this process can answer, 0 when it cannot (yet, or any more)."""
    get_metrics().service_up.set(1 if up else 0)


def set_queue_stats(depth: int, oldest_age_s: float | None) -> None:
    """Pending rows and the age of the oldest one (None or no rows: 0)."""
    m = get_metrics()
    m.queue_depth.set(depth)
    m.queue_lag.set(max(0.0, oldest_age_s or 0.0) if depth else 0.0)


# --- multi-process mode -----------------------------------------------------------------------


def multiprocess_dir() -> Path | None:
    """``$PROMETHEUS_MULTIPROC_DIR`` when set."""
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


def multiprocess_enabled() -> bool:
    return multiprocess_dir() is not None


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
        if _metrics is not None:
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


def _start_or_log(start: Callable[[], MetricsServer], host: str, port: int) -> MetricsServer | None:
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
    return _start_or_log(lambda: start_metrics_server(host, port, registry), host, port)


def start_bridge_metrics(config: Config, host: str, port: int) -> MetricsServer | None:
    """A bridge's /metrics: its own registry, plus queue and cache gauges read at scrape."""
    from mltasks.cache import stats_scope
    from mltasks.fallback.levels import cache_client

    refresh: list[Refresh] = [
        queue_stats_refresher(config.database.conninfo),
        cache_hit_rate_refresher(cache_client(config), scope=stats_scope(config)),
    ]
    get_metrics()
    return _start_or_log(lambda: start_metrics_server(host, port, refresh=refresh), host, port)


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
        from mltasks.cache import hit_rates

        rates = hit_rates(client, window_s, scope=scope)
        set_cache_hit_rates({str(layer): r for layer, r in rates.items()})

    return cache_hit_rates
