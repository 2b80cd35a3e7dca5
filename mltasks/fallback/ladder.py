"""The fallback ladder as one table: every other module reads its levels from here.

| level | mode                | label (status)       | queue   | tier  | default profile |
| ----- | ------------------- | -------------------- | ------- | ----- | --------------- |
| 1     | GPU FP16            | GPU FP16             | ``gpu`` | gpu   | cuda:fp16       |
| 2     | GPU INT8            | GPU INT8             | ``gpu`` | gpu   | tensorrt:int8   |
| 3     | CPU (INT8)          | CPU                  | ``cpu`` | cpu   | cpu:int8        |
| 4     | rule-based policy   | rules                | rules   | rules | -               |
| 5     | traditional AI: 255 | traditional AI (255) | -       | none  | -               |

A model level's (provider, precision) is the configuration's (``fallback.levelN``; the
defaults above are `mltasks.config.FallbackConfig`'s, taken from this table), and the types
it fuses ``models.fusion.levelN``'s. Level 3 serves each model's INT8 variant where its
argmax agrees with the master's on 99% of held-out states, else the master itself
(`mltasks.models.variants.resolve`). Level 5 has no queue: the bridge answers 255 itself.

Pure data, no imports of the service: the Celery app, the bridge, the workers, the
configuration, beat, the metrics and the status command all read it without pulling in each
other. Nothing else spells a level's queue, tier, precision or label (tests/unit/test_ladder.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Final, Literal, get_args


class Level(IntEnum):
    """A rung of the ladder; a larger number is a lower (cheaper, coarser) level."""

    GPU_FP16 = 1
    GPU_INT8 = 2
    CPU = 3
    RULES = 4
    TRADITIONAL = 5


Tier = Literal["gpu", "cpu", "rules", "none"]
"""What runs a level: ONNX Runtime on a GPU or the CPU, the rule policy, or nothing (255)."""

TIER_NAMES: Final[dict[Tier, str]] = {"gpu": "GPU", "cpu": "CPU", "rules": "rules", "none": "255"}
"""How `mltasks status` names a tier in its rows (``levels 1-2 GPU``)."""

Provider = Literal["cuda", "tensorrt", "cpu"]
"""An execution provider a model level may be configured with (``fallback.levelN``)."""
PROVIDERS: Final[tuple[Provider, ...]] = get_args(Provider)

Precision = Literal["fp32", "fp16", "int8"]
"""A precision a model level may be configured with: the master's own, or a variant."""
PRECISIONS: Final[tuple[Precision, ...]] = get_args(Precision)

ProbeTier = Literal["gpu_fp16", "gpu_int8", "cpu"]
"""The probe verdict (`mltasks.fallback.probes.Verdict`) that judges a model level."""


@dataclass(frozen=True, slots=True)
class Rung:
    """One level of the ladder: who serves it and which configuration keys shape it."""

    level: Level
    mode: str
    label: str
    """Its short name: `mltasks status` and the level gauge's help."""
    queue: str | None
    """The Celery queue its batches travel on; None: answered by the bridge itself."""
    tier: Tier
    provider: Provider | None
    """The default execution provider (``fallback.levelN``'s part before the colon)."""
    precision: Precision | None
    """The default precision (``fallback.levelN``'s part after the colon)."""
    probe: ProbeTier | None
    """Its verdict in a worker's probes; None: judged by its own failures alone."""

    @property
    def field(self) -> str | None:
        """Its field in the configuration's ``fallback`` and ``models.fusion``: ``levelN``."""
        return f"level{int(self.level)}" if self.provider is not None else None

    @property
    def profile_key(self) -> str | None:
        """The configuration key of its (provider, precision): ``fallback.levelN``."""
        return None if self.field is None else f"fallback.{self.field}"

    @property
    def fusion_key(self) -> str | None:
        """The configuration key of the types it fuses: ``models.fusion.levelN``."""
        return None if self.field is None else f"models.fusion.{self.field}"

    @property
    def default_profile(self) -> str | None:
        """``provider:precision`` as the configuration spells it, for a model level."""
        return None if self.provider is None else f"{self.provider}:{self.precision}"

    @property
    def models(self) -> bool:
        """Served by ONNX models (levels 1-3): it has an engine, a fusion and a cache."""
        return self.provider is not None


LADDER: Final[tuple[Rung, ...]] = (
    Rung(Level.GPU_FP16, "GPU FP16", "GPU FP16", "gpu", "gpu", "cuda", "fp16", "gpu_fp16"),
    Rung(Level.GPU_INT8, "GPU INT8", "GPU INT8", "gpu", "gpu", "tensorrt", "int8", "gpu_int8"),
    Rung(Level.CPU, "CPU (INT8)", "CPU", "cpu", "cpu", "cpu", "int8", "cpu"),
    Rung(Level.RULES, "rule-based policy", "rules", "rules", "rules", None, None, None),
    Rung(Level.TRADITIONAL, "traditional AI: 255", "traditional AI (255)",
         None, "none", None, None, None),
)  # fmt: skip
RUNGS: Final[dict[int, Rung]] = {r.level: r for r in LADDER}

BEST: Final = Level.GPU_FP16
WORST: Final = Level.TRADITIONAL
MODEL_LEVELS: Final[tuple[Level, ...]] = tuple(r.level for r in LADDER if r.models)
"""The levels an ONNX engine serves (1-3)."""
LEVEL_QUEUE: Final[dict[int, str]] = {r.level: r.queue for r in LADDER if r.queue is not None}
QUEUE_LEVELS: Final[dict[str, tuple[int, ...]]] = {
    q: tuple(r.level for r in LADDER if r.queue == q) for q in LEVEL_QUEUE.values()
}
QUEUES: Final[tuple[str, ...]] = tuple(QUEUE_LEVELS)
"""One Celery queue per tier, best first: ``("gpu", "cpu", "rules")``."""
QUEUE_TIER: Final[dict[str, Tier]] = {r.queue: r.tier for r in LADDER if r.queue is not None}
MODEL_QUEUES: Final[tuple[str, ...]] = tuple(dict.fromkeys(LEVEL_QUEUE[lv] for lv in MODEL_LEVELS))
"""The queues whose workers load models: ``("gpu", "cpu")``."""
JOBS_QUEUE: Final = LEVEL_QUEUE[Level.CPU]
"""Where beat's jobs (cleanup, recovery) and a worker started without ``-Q`` go: every
deployment has a CPU."""


def rung(level: int) -> Rung:
    """The ladder's entry for ``level`` (KeyError outside 1-5)."""
    return RUNGS[level]


def model_field(level: int) -> str:
    """A model level's configuration field, ``levelN`` (KeyError outside 1-3)."""
    name = rung(level).field
    if name is None:
        raise KeyError(level)
    return name


def default_profile(level: int) -> str:
    """A model level's default ``provider:precision`` (KeyError outside 1-3)."""
    profile = rung(level).default_profile
    if profile is None:
        raise KeyError(level)
    return profile


def spell_levels(levels: tuple[int, ...]) -> str:
    """``level 3`` or ``levels 1-2``, as help texts and `mltasks status` name a tier's."""
    if len(levels) == 1:
        return f"level {levels[0]}"
    return f"levels {levels[0]}-{levels[-1]}"


def route(level: int, live: Mapping[str, bool]) -> int:
    """The level a batch is served at: ``level`` or the next lower one with a live consumer."""
    for candidate in range(max(int(level), BEST), WORST):
        if live.get(LEVEL_QUEUE[candidate], False):
            return candidate
    return WORST
