"""The recorder's Prometheus metrics: a registry of its own, served on
``experience.metrics_port`` by the recorder process (one process, no multi-process mode).

Kept apart from `mltasks.metrics` (the bridge's and the workers'): the recorder is a third
kind of process, and nothing on the answer path imports this.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge

EXPERIENCE_METRIC_NAMES: Final = frozenset(
    {
        "ml_experience_recorded_total",
        "ml_experience_rejected_total",
        "ml_experience_dropped_total",
        "ml_experience_rounds_total",
        "ml_experience_rows",
        "ml_experience_waiting_monsters",
        "ml_experience_lag_seconds",
    }
)
# Why a transition left ai_experience (or never got there though its state was good).
DROP_REASONS: Final = ("retention", "cap", "unpaired")
ROUND_OUTCOMES: Final = ("recorded", "failed", "locked")


class ExperienceMetrics:
    """The recorder's metrics, on ``registry`` (a fresh one by default: tests make many)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.recorded: Counter = Counter(
            "ml_experience_recorded",
            "Transitions recorded, by the answer's source",
            ["source"],
            registry=r,
        )
        self.rejected: Counter = Counter(
            "ml_experience_rejected",
            "Answered requests not recorded because of their input, by reason",
            ["reason"],
            registry=r,
        )
        self.dropped: Counter = Counter(
            "ml_experience_dropped",
            "Transitions dropped: retention, cap (oldest first), unpaired (no next state)",
            ["reason"],
            registry=r,
        )
        self.rounds: Counter = Counter(
            "ml_experience_rounds", "Recorder rounds, by outcome", ["outcome"], registry=r
        )
        self.rows: Gauge = Gauge(
            "ml_experience_rows", "Transitions kept in ai_experience (upper bound)", registry=r
        )
        self.waiting: Gauge = Gauge(
            "ml_experience_waiting_monsters",
            "Monsters whose last decision waits for its next state",
            registry=r,
        )
        self.lag: Gauge = Gauge(
            "ml_experience_lag_seconds",
            "Age of the newest request the recorder has read",
            registry=r,
        )
        for reason in DROP_REASONS:
            self.dropped.labels(reason=reason)
        for outcome in ROUND_OUTCOMES:
            self.rounds.labels(outcome=outcome)

    def count(self, counter: Counter, by_label: Mapping[str, int], label: str) -> None:
        for value, n in by_label.items():
            if n:
                counter.labels(**{label: value}).inc(n)
