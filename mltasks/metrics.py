"""Prometheus metrics of the bridge and the workers: their definitions and the calls that
record them (what the hot path imports: ``from mltasks import metrics``).

The endpoint side (the ``/metrics`` HTTP server, multi-process collection, the gauges read
from PostgreSQL and Redis at each scrape) is `mltasks.ops.exporter`.

A worker is a Celery prefork pool, and prometheus-client's multi-process mode keeps each
process's values in mmap files under ``PROMETHEUS_MULTIPROC_DIR``. The mode is chosen by
prometheus-client when it builds its first metric, from the environment. So this module
imports prometheus-client only inside functions, creates its metrics on first use (in the
process that uses them, after the fork), and `mltasks.ops.exporter.setup_multiprocess` sets
the variable (and, if some other module imported the library first, makes it choose again)
before any metric exists.

Metric names carry their unit; labels are few (``outcome``, ``layer``, ``device``).
"""

from __future__ import annotations

import bisect
import contextlib
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, Protocol

from mltasks.contract import TRADITIONAL_AI
from mltasks.fallback.ladder import LADDER

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
        "Shared fallback level: " + ", ".join(f"{r.level} {r.label}" for r in LADDER),
        (),
        "livemostrecent",
    ),
    "vram_usage": (
        "ml_vram_usage_bytes",
        "Memory used on a GPU, as NVML reports it",
        ("device",),
        "livemostrecent",
    ),
    # A gauge, although ``_total`` is Prometheus's suffix for counters: the name is the seed
    # document's, which dashboards and alerts query; kept as it is.
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
    observe_many(m.request_latency, [max(0.0, s) for s in e2e_seconds])


def observe_many(histogram: Histogram, values: Sequence[float]) -> None:
    """``histogram.observe(v)`` for each value, with one write per bucket touched: in
    multi-process mode each observation is two locked writes to an mmap file, per row of a
    batch (py-spy, docs/PERFORMANCE.md). The same counts, added up first."""
    sum_value = getattr(histogram, "_sum", None)
    buckets = getattr(histogram, "_buckets", None)
    bounds = getattr(histogram, "_upper_bounds", None)
    if sum_value is None or buckets is None or bounds is None or len(values) < 2:
        for v in values:  # a labelled parent, or a prometheus_client that changed inside
            histogram.observe(v)
        return
    counts: dict[int, int] = {}
    for v in values:
        i = bisect.bisect_left(bounds, v)  # the first bound >= v, as observe() picks it
        if i < len(buckets):  # NaN finds no bucket in observe() either
            counts[i] = counts.get(i, 0) + 1
    sum_value.inc(float(sum(values)))
    for i, n in counts.items():
        buckets[i].inc(n)


def observe_inference(seconds: Sequence[float]) -> None:
    """The batched model calls of a batch took ``seconds``, one value a call."""
    observe_many(get_metrics().inference_latency, seconds)


def observe_batch(size: int) -> None:
    """A worker took a batch of ``size`` rows."""
    get_metrics().batch_size.observe(size)


def set_cache_hit_rates(rates: Mapping[str, float]) -> None:
    """Hit rate per cache layer (``l1``, ``l2``, ``l3``), 0..1."""
    m = get_metrics()
    for layer, rate in rates.items():
        m.cache_hit_rate.labels(layer).set(rate)


def set_fallback_level(level: int) -> None:
    """The shared fallback level (mltasks.fallback.ladder.Level, 1..5)."""
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


def created() -> bool:
    """Whether this process has made its metrics yet (multi-process mode must come first)."""
    return _metrics is not None
