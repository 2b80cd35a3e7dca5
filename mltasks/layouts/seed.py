"""The seed layout: the seed document's table (shared/CONTRACT.md section 2), with the exact
slots inside each of its ranges chosen by this project (the demo models of earlier releases
used it). Slots it does not name hold mild noise in samples.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import numpy as np

from mltasks.layouts.table import (
    AtLeast,
    Below,
    Flag,
    FloatArray,
    Knob,
    Reading,
    Slot,
    Table,
    Uniform,
    Value,
)

# fmt: off
SLOTS: Final = (
    Slot("hp", 0, "HP ratio", calm=1.0, draw=Uniform(), policy=True),
    Slot("sp", 1, "SP ratio", calm=1.0, draw=Uniform(), policy=True),
    Slot("pos_x", 2, "position x, normalised", draw=Uniform()),
    Slot("pos_y", 3, "position y, normalised", draw=Uniform()),
    Slot("pos_z", 4, "position z, normalised", draw=Uniform()),
    Slot("atk", 5, "ATK, normalised", draw=Uniform()),
    Slot("def", 6, "DEF, normalised", draw=Uniform()),
    Slot("matk", 7, "MATK, normalised", draw=Uniform()),
    # 11-20 enemy information
    Slot("target_distance", 11, "nearest enemy, 0 adjacent .. 1 nobody in sight", calm=1.0,
         policy=True),
    Slot("target_hp", 12, "the nearest enemy's HP ratio", engaged=1.0),
    Slot("target_threat", 13, "the nearest enemy's threat", engaged=0.5, policy=True),
    Slot("enemies", 14, "enemies in sight / 5", 5.0, engaged=0.2),
    Slot("other_threat", 15, "the most dangerous enemy that is not the target", policy=True),
    # 21-30 ally information
    Slot("pack", 21, "allies / 5", 5.0, policy=True),
    Slot("pack_hp", 22, "weakest ally's HP ratio, 1.0 when none", calm=1.0, policy=True),
    Slot("ally_under_attack", 23, "an ally is under attack (0/1)", policy=True),
    # 31-40 skills: 1 when ready
    Slot("skill_1_ready", 31, "skill 1 ready (0/1)", draw=Flag(0.6), policy=True),
    Slot("skill_2_ready", 32, "skill 2 ready (0/1)", draw=Flag(0.6), policy=True),
    Slot("skill_3_ready", 33, "skill 3 ready (0/1)", draw=Flag(0.6), policy=True),
    # 41-50 status effects
    Slot("stunned", 41, "stunned (0/1); 42-50 other status effects", policy=True),
    # 61-63 temporal features
    Slot("idle_time", 61, "time since the last action, normalised", draw=Uniform(),
         policy=True),
)
# fmt: on
AT: Final = {slot.name: slot.index for slot in SLOTS}
SCALE: Final = {slot.name: slot.scale for slot in SLOTS}

READS: Final[Mapping[str, Reading]] = {
    "hp": Value("hp"),
    "sp": Value("sp"),
    "has_target": Below("target_distance"),
    "target_distance": Value("target_distance"),
    "target_hp": Value("target_hp"),
    "target_threat": Value("target_threat"),
    "enemies": Value("enemies"),
    "other_threat": Value("other_threat"),
    "pack": Value("pack"),
    "pack_hp": Value("pack_hp"),
    "ally_under_attack": AtLeast("ally_under_attack"),
    "skill_ready": (AtLeast("skill_1_ready"), AtLeast("skill_2_ready"), AtLeast("skill_3_ready")),
    "stunned": AtLeast("stunned"),
    "idle_time": Value("idle_time"),
    "explores": None,  # no random-walk flag: a monster wanders once idle long enough
}

_YES_NO: Final = (1.0, 0.0)

KNOBS: Final = {
    "hp": Knob(("hp",)),
    "sp": Knob(("sp",)),
    "target_distance": Knob(("target_distance",)),
    "target_hp": Knob(("target_hp",), needs_target=True),
    "target_threat": Knob(("target_threat",), needs_target=True),
    "enemies": Knob(("enemies",)),
    "other_threat": Knob(("other_threat",)),
    "pack": Knob(("pack",)),
    "pack_hp": Knob(("pack_hp",)),
    "ally_under_attack": Knob(("ally_under_attack",), flag=_YES_NO),
    "skills_ready": Knob(
        ("skill_1_ready", "skill_2_ready", "skill_3_ready"), flag=_YES_NO, each=True
    ),
    "stunned": Knob(("stunned",), flag=_YES_NO),
    "idle_time": Knob(("idle_time",)),
}


def draw_company(rng: np.random.Generator, x: FloatArray) -> None:
    """Enemies (none in sight in 25% of rows) and allies (none in 30%; pack HP 1.0 then),
    drawn together: an ally is under attack only with an enemy in sight."""
    n = len(x)

    def uniform(lo: float = 0.0, hi: float = 1.0) -> FloatArray:
        return rng.uniform(lo, hi, n).astype(np.float32)

    seen = rng.random(n) >= 0.25
    count = rng.integers(1, 6, n).astype(np.float32)  # 1..5 enemies when any
    x[:, AT["target_distance"]] = np.where(seen, uniform(0.0, 0.95), 1.0)
    x[:, AT["target_hp"]] = np.where(seen, uniform(0.05, 1.0), 0.0)
    x[:, AT["target_threat"]] = np.where(seen, uniform(), 0.0)
    x[:, AT["enemies"]] = np.where(seen, count / SCALE["enemies"], 0.0)
    x[:, AT["other_threat"]] = np.where(seen & (count > 1), uniform(), 0.0)

    allies = rng.random(n) >= 0.3
    x[:, AT["pack"]] = np.where(allies, rng.integers(1, 6, n) / SCALE["pack"], 0.0)
    x[:, AT["pack_hp"]] = np.where(allies, uniform(0.02, 1.0), 1.0)
    under_attack = (rng.random(n) < 0.4).astype(np.float32)
    x[:, AT["ally_under_attack"]] = np.where(allies & seen, under_attack, 0.0)


def draw_status(rng: np.random.Generator, x: FloatArray) -> None:
    """Stunned in 8% of rows; the other status effects (42-50) sparse 0/1."""
    n = len(x)
    stunned = AT["stunned"]
    some = (rng.random(n) < 0.05).astype(np.float32)
    x[:, stunned + 1 : stunned + 10] = some[:, None] * (rng.random((n, 9)) < 0.5)
    x[:, stunned] = (rng.random(n) < 0.08).astype(np.float32)


TABLE: Final = Table(
    slots=SLOTS,
    reads=READS,
    knobs=KNOBS,
    draw_order=(range(0, 11), draw_company, range(31, 41), draw_status, range(51, 64)),
    noise=0.5,
)
