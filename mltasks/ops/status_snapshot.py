"""What one ``mltasks status`` snapshot holds (the indicators, as read), and the exit
codes its verdict maps to. Plain data: `mltasks.ops.status` fills it, `status_render`
shows it, ``--json`` dumps it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Final

from mltasks.fallback.ladder import LADDER

HEALTHY: Final = 0
DEGRADED: Final = 1
UNREACHABLE: Final = 2

# How `mltasks status` names each level: the ladder's labels (shorter than its modes).
LEVEL_NAMES: Final[dict[int, str]] = {r.level: r.label for r in LADDER}
# --- what a snapshot holds ----------------------------------------------------------------


@dataclass(slots=True)
class Reach:
    """Whether a server answered, and the error when it did not."""

    target: str
    reachable: bool = False
    error: str | None = None


@dataclass(slots=True)
class LevelInfo:
    level: int
    name: str
    reason: str
    since: float | None  # None: no level recorded, the start level applies
    serving: int  # the level batches are actually served at (the next one with a worker)
    ceiling: int  # the best level this deployment can reach now


@dataclass(slots=True)
class ModelsInfo:
    loaded: int | None
    expected: int
    # "workers" (their reports), "files" (loaded here: live workers that do not report),
    # "no live model worker", "unknown" (the files could not be checked here)
    source: str
    level: int = 3  # the model level whose fusion the counts are for (1 with a GPU worker)
    # Archetypes loaded per model type of that fusion (from the files; {} when not counted).
    by_type: dict[str, int] = field(default_factory=dict)
    # Per model level, the fusion in force: type -> weight.
    fusion: dict[int, dict[str, float]] = field(default_factory=dict)


@dataclass(slots=True)
class LatencyInfo:
    window_s: int
    deadline_ms: int
    answered: int = 0
    answered_255: int = 0
    avg_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None


@dataclass(slots=True)
class QueueInfo:
    pending: int | None = None
    processing: int | None = None
    lag_ms: float | None = None
    broker: dict[str, int] = field(default_factory=dict)  # messages waiting per Celery queue


@dataclass(slots=True)
class WorkerInfo:
    live: bool
    count: int | None  # None: the workers do not publish a count (only the heartbeat)
    heartbeat_age_ms: float | None
    processes: list[str] = field(default_factory=list)  # live "<host>:<pid>" on the queue
    # Workers of this queue that do not serve, and why (no database, no model): <host:pid>
    not_serving: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class GpuInfo:
    present: bool | None  # None: no probe report
    status: str
    vram_used_bytes: int | None = None
    vram_total_bytes: int | None = None


@dataclass(slots=True)
class Status:
    checked_at: float
    postgres: Reach
    redis: Reach
    level: LevelInfo | None = None
    models: ModelsInfo | None = None
    cache: dict[str, float] = field(default_factory=dict)
    latency: LatencyInfo | None = None
    queue: QueueInfo | None = None
    workers: dict[str, WorkerInfo] = field(default_factory=dict)
    gpu: GpuInfo | None = None
    # Deployed models (mltasks models deploy): active version, candidate, canary, rollback.
    versions: list[dict[str, Any]] = field(default_factory=list)
    # What each worker process answers with, per level (mltasks.models.served).
    served: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # The indicators the problems are about: level, models, latency, queue.
    failing: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if not (self.postgres.reachable and self.redis.reachable):
            return UNREACHABLE
        return DEGRADED if self.problems else HEALTHY

    @property
    def verdict(self) -> str:
        return {HEALTHY: "healthy", DEGRADED: "degraded", UNREACHABLE: "unreachable"}[
            self.exit_code
        ]

    def to_dict(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["exit_code"] = self.exit_code
        doc["verdict"] = self.verdict
        return doc
