"""The fallback ladder as one table: every other module reads its levels from here.

| level | mode                | queue   | tier    | default profile | fusion set             |
| ----- | ------------------- | ------- | ------- | --------------- | ---------------------- |
| 1     | GPU FP16            | ``gpu`` | gpu     | cuda:fp16       | models.fusion.level1   |
| 2     | GPU INT8            | ``gpu`` | gpu     | tensorrt:int8   | models.fusion.level2   |
| 3     | CPU (INT8)          | ``cpu`` | cpu     | cpu:int8        | models.fusion.level3   |
| 4     | rule-based policy   | rules   | rules   | -               | -                      |
| 5     | traditional AI: 255 | -       | none    | -               | -                      |

A model level's (provider, precision) is the configuration's (``fallback.level1..3``; the
defaults above are `mltasks.config.FallbackConfig`'s, which tests hold to this table). Level
3 serves each model's INT8 variant where its argmax agrees with the master's on 99% of
held-out states, else the master itself (`mltasks.models.variants.resolve`). Level 5 has no
queue: the bridge answers 255 itself.

Pure data, no imports of the service: the Celery app, the bridge, the workers and the
status command all read it without pulling in each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Final, Literal


class Level(IntEnum):
    """A rung of the ladder; a larger number is a lower (cheaper, coarser) level."""

    GPU_FP16 = 1
    GPU_INT8 = 2
    CPU = 3
    RULES = 4
    TRADITIONAL = 5


Tier = Literal["gpu", "cpu", "rules", "none"]
"""What runs a level: ONNX Runtime on a GPU or the CPU, the rule policy, or nothing (255)."""

ProbeTier = Literal["gpu_fp16", "gpu_int8", "cpu"]
"""The probe verdict (`mltasks.fallback.probes.Verdict`) that judges a model level."""


@dataclass(frozen=True, slots=True)
class Rung:
    """One level of the ladder: who serves it and which configuration keys shape it."""

    level: Level
    mode: str
    queue: str | None
    """The Celery queue its batches travel on; None: answered by the bridge itself."""
    tier: Tier
    provider: str | None
    """The default execution provider (``fallback.levelN``'s part before the colon)."""
    precision: str | None
    """The default precision (``fallback.levelN``'s part after the colon)."""
    probe: ProbeTier | None
    """Its verdict in a worker's probes; None: judged by its own failures alone."""

    @property
    def profile_key(self) -> str | None:
        """The configuration key of its (provider, precision): ``fallback.levelN``."""
        return f"fallback.level{int(self.level)}" if self.provider is not None else None

    @property
    def fusion_key(self) -> str | None:
        """The configuration key of the types it fuses: ``models.fusion.levelN``."""
        return f"models.fusion.level{int(self.level)}" if self.provider is not None else None

    @property
    def default_profile(self) -> str | None:
        """``provider:precision`` as the configuration spells it, for a model level."""
        return None if self.provider is None else f"{self.provider}:{self.precision}"

    @property
    def models(self) -> bool:
        """Served by ONNX models (levels 1-3): it has an engine, a fusion and a cache."""
        return self.provider is not None


LADDER: Final[tuple[Rung, ...]] = (
    Rung(Level.GPU_FP16, "GPU FP16", "gpu", "gpu", "cuda", "fp16", "gpu_fp16"),
    Rung(Level.GPU_INT8, "GPU INT8", "gpu", "gpu", "tensorrt", "int8", "gpu_int8"),
    Rung(Level.CPU, "CPU (INT8)", "cpu", "cpu", "cpu", "int8", "cpu"),
    Rung(Level.RULES, "rule-based policy", "rules", "rules", None, None, None),
    Rung(Level.TRADITIONAL, "traditional AI: 255", None, "none", None, None, None),
)
RUNGS: Final[dict[int, Rung]] = {r.level: r for r in LADDER}

BEST: Final = Level.GPU_FP16
MODEL_LEVELS: Final[tuple[Level, ...]] = tuple(r.level for r in LADDER if r.models)
"""The levels an ONNX engine serves (1-3)."""
LEVEL_QUEUE: Final[dict[int, str]] = {r.level: r.queue for r in LADDER if r.queue is not None}
QUEUE_LEVELS: Final[dict[str, tuple[int, ...]]] = {
    q: tuple(r.level for r in LADDER if r.queue == q) for q in LEVEL_QUEUE.values()
}
QUEUES: Final[tuple[str, ...]] = tuple(QUEUE_LEVELS)
"""One Celery queue per tier, best first: ``("gpu", "cpu", "rules")``."""


def rung(level: int) -> Rung:
    """The ladder's entry for ``level`` (KeyError outside 1-5)."""
    return RUNGS[level]


def route(level: int, live: Mapping[str, bool]) -> int:
    """The level a batch is served at: ``level`` or the next lower one with a live consumer."""
    for candidate in range(max(int(level), BEST), Level.TRADITIONAL):
        if live.get(LEVEL_QUEUE[candidate], False):
            return candidate
    return Level.TRADITIONAL
