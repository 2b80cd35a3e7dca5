"""The encoder's layout: what the game's map server really sends, written by the fork's
``MobMLEncoder::encode_state`` (shared/CONTRACT.md section 2b). Every value is in [0, 1].

Indices it leaves 0 (7 equipment, 11, 27, 46, 48) are not named. Its derived slots (HP
repeated, complements, the target's slots zero without a target) are kept true by
`couple`, after every sample, `Layout.state` and `Layout.with_hp`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import numpy as np

from mltasks.contract import ARCHETYPES
from mltasks.layouts.table import (
    NO_TARGET,
    AllOf,
    Archetype,
    AtLeast,
    Below,
    Choice,
    Complement,
    Constant,
    Count,
    FloatArray,
    From,
    Knob,
    Missing,
    Positive,
    Reading,
    Slot,
    Table,
    Uniform,
    Value,
    WithTarget,
)

# The skill states the encoder writes at 41 (idle, walk, loot, follow, rush, angry, berserk).
SKILL_STATES: Final = (0.0, 0.2, 0.3, 0.5, 0.6, 0.8, 0.9)

# fmt: off
SLOTS: Final = (
    Slot("hp", 0, "HP ratio", calm=1.0, draw=Uniform(pinned_hi=0.15), policy=True),
    Slot("sp", 1, "SP ratio", calm=1.0, draw=Uniform(), policy=True),
    Slot("level", 2, "level / 150", 150.0, calm=0.2, draw=Uniform(0.01, 0.66)),
    Slot("mobility", 3, "can move x (1 - speed factor)", calm=0.5, draw=Uniform()),
    Slot("atk", 4, "ATK / 10,000", 10_000.0, calm=0.05, draw=Uniform(0.0, 0.2)),
    Slot("skills_ready", 5, "share of the monster's skills off cooldown",
         draw=Choice((0.0, 0.25, 1 / 3, 0.5, 2 / 3, 0.75, 1.0)), policy=True),
    Slot("bad_status", 6, "negative status effects, count / 10", 10.0,
         draw=Choice((0.0, 0.1, 0.2), (0.85, 0.1, 0.05))),
    Slot("archetype_id", 8, "archetype id / 5 (contract.ARCHETYPES' order)", 5.0,
         draw=Archetype(len(ARCHETYPES))),
    Slot("role_confidence", 9, "role confidence (constant)", calm=0.75, draw=Constant()),
    Slot("hp_again", 10, "HP ratio again (derived)"),
    Slot("terrain", 12, "terrain type / 3", 3.0, draw=Choice((0.0, 1 / 3, 2 / 3, 1.0))),
    Slot("unwalkable_near", 13, "unwalkable cells within 3, count / 49", 49.0,
         draw=Uniform(0.0, 0.4)),
    Slot("items_near", 14, "items within 5, count / 10", 10.0,
         draw=Choice((0.0, 0.1, 0.2, 0.3), (0.7, 0.15, 0.1, 0.05))),
    Slot("hazards_near", 15, "skill units (hazards) within 5, count / 10", 10.0,
         draw=Choice((0.0, 0.1, 0.2), (0.85, 0.1, 0.05))),
    Slot("players_in_view", 16, "players in view, count / 20", 20.0),
    Slot("monsters_in_view", 17, "monsters in view, count / 30", 30.0, draw=Count(0, 16)),
    Slot("spawn_distance", 18, "distance to spawn / 50", 50.0, draw=Uniform()),
    Slot("map_danger", 19, "map danger (PvP 0.3, GvG 0.5, ...; clamped)",
         draw=Choice((0.0, 0.3, 0.5), (0.8, 0.1, 0.1))),
    Slot("daytime", 20, "1 day, 0 night", draw=Choice((0.0, 1.0))),
    Slot("area_control", 21, "allies / (allies + players), 0.5 when none", calm=0.5),
    Slot("pack", 22, "pack size / 10 (1 with a master)", 10.0, policy=True),
    Slot("pack_cohesion", 23, "pack cohesion (0.8 with a master, else 0)"),
    Slot("pack_hp", 24, "ally HP: the monster's own HP ratio (derived)", policy=True),
    Slot("leader", 25, "leader present (1/0)"),
    Slot("formation", 26, "formation (0.7 with slaves, else 0)"),
    Slot("ally_skills_ready", 28, "ally skills ready (= skills_ready, derived)"),
    Slot("constant_29", 29, "constant", calm=0.5, draw=Constant()),
    Slot("enemies", 30, "enemies (players) in view, count / 10", 10.0, engaged=0.1,
         policy=True),
    Slot("target_distance", 31, "distance to the target / view range; 1.0 without one",
         calm=1.0, policy=True),
    Slot("target_threat", 32, "threat level of the target", engaged=0.5, policy=True),
    Slot("damage_received", 33, "0.3 when hurt and targeting, else 0 (derived)", policy=True),
    Slot("target_hp", 34, "target HP ratio (0 without a target)", engaged=1.0, policy=True),
    Slot("target_class", 35, "target class: 1 player, 0.5 monster, 0 none", engaged=1.0),
    Slot("target_skill_threat", 36, "player level / 150; 0.3 for a monster", engaged=0.3),
    Slot("positioning", 37, "positioning quality (1 at the spawn centre)", calm=1.0,
         draw=Uniform()),
    Slot("escape_routes", 38, "walkable neighbour cells / 8", 8.0, calm=1.0, draw=Count(2, 9)),
    Slot("advantage", 39, "0.7 own HP above target's, 0.3 below, 0.5 no target (derived)"),
    Slot("initiated", 40, "1 when aggressive-state (it initiated)", draw=Choice((0.0, 1.0))),
    Slot("skill_state", 41, "idle 0, walk 0.2, loot 0.3, follow 0.5, rush 0.6, angry 0.8, "
         "berserk 0.9", draw=Choice(SKILL_STATES)),
    Slot("damage_taken", 42, "1 - HP ratio (derived)"),
    Slot("cooldown_progress", 43, "average skill cooldown progress (1 ready)", draw=Uniform()),
    Slot("combat_duration", 44, "since a player was near / 30 s", 30.0,
         draw=WithTarget(Uniform())),
    Slot("hp_success", 45, "HP ratio, success proxy (derived)"),
    Slot("time_alive", 47, "time alive / 5 min", 300.0, draw=Uniform()),
    Slot("full_hp", 49, "1 at full HP, else 0 (derived)"),
    Slot("provoked", 50, "aggressive-state 0.5 + provoked 0.5",
         draw=Choice((0.0, 0.5, 1.0))),
    Slot("momentum", 51, "skill 1.0, attacking 0.9, walking 0.5, else 0.1", calm=0.1,
         draw=Choice((1.0, 0.9, 0.5, 0.1))),
    Slot("goal", 52, "primary goal: the skill state over berserk's (idle 0 ... berserk 1)",
         0.9, draw=From("skill_state")),
    Slot("looter_assist", 53, "looter 0.3 + assist 0.3", draw=Choice((0.0, 0.3, 0.6))),
    Slot("goal_progress", 54, "1 - distance / range; 0.5 without a target (derived)"),
    Slot("hp_urgency", 55, "1 - HP ratio (derived)"),
    Slot("sp_need", 56, "1 - SP ratio (derived)"),
    Slot("risk_tolerance", 57, "risk tolerance", draw=Uniform()),
    Slot("cooperation", 58, "assist mode 0.8, else 0.2", calm=0.2,
         draw=Choice((0.2, 0.8))),
    Slot("explores", 59, "0.2 with no random walk, else 0.7", calm=0.2,
         draw=Choice((0.2, 0.7)), policy=True),
    Slot("aggression", 60, "aggressive mode 0.9, angry 0.7, else 0.3", calm=0.3,
         draw=Choice((0.9, 0.7, 0.3))),
    Slot("defence_priority", 61, "1 - aggression", calm=0.7, draw=Complement("aggression")),
    Slot("support_priority", 62, "healer 0.9, assist 0.7, else 0",
         draw=Choice((0.0, 0.7, 0.9), (0.7, 0.15, 0.15))),
    Slot("constant_63", 63, "constant", calm=0.5, draw=Constant()),
)
# fmt: on
AT: Final = {slot.name: slot.index for slot in SLOTS}
SCALE: Final = {slot.name: slot.scale for slot in SLOTS}

_READY: Final = AtLeast("skills_ready")

READS: Final[Mapping[str, Reading]] = {
    "hp": Value("hp"),
    "sp": Value("sp"),
    "has_target": Below("target_distance"),
    "target_distance": Value("target_distance"),
    "target_hp": Value("target_hp"),
    "target_threat": Value("target_threat"),
    "enemies": Value("enemies"),
    "other_threat": Missing(),  # never a bigger threat: the rule tier never changes target
    "pack": Value("pack"),
    "pack_hp": Value("pack_hp"),  # the monster's own HP: a support heals when itself hurt
    "ally_under_attack": AllOf(
        (Positive("pack"), Below("target_distance"), Positive("damage_received"))
    ),
    "skill_ready": (_READY, _READY, _READY),  # one share decides for all three skills
    "stunned": Missing(np.bool_),  # 6 counts any bad status: the stunned rule never fires
    "idle_time": None,  # no idle clock: with no target, wander if random walk (59) allows
    "explores": AtLeast("explores"),
}

KNOBS: Final = {
    "hp": Knob(("hp",)),
    "sp": Knob(("sp",)),
    "target_distance": Knob(("target_distance",)),
    "target_hp": Knob(("target_hp",), needs_target=True),
    "target_threat": Knob(("target_threat",), needs_target=True),
    "enemies": Knob(
        ("enemies",), mirror=("players_in_view", SCALE["enemies"] / SCALE["players_in_view"])
    ),
    "pack": Knob(("pack",), marks=("pack_cohesion", 0.8)),
    "skills_ready": Knob(("skills_ready", "cooldown_progress")),
    "explores": Knob(("explores",), flag=(0.7, 0.2)),
}


def draw_company(rng: np.random.Generator, x: FloatArray) -> None:
    """The target (in 70% of rows: a player, usually, or a monster), the players in view and
    the pack (in 40%), drawn together: area control weighs the pack against the players."""
    n = len(x)

    def uniform(lo: float = 0.0, hi: float = 1.0) -> FloatArray:
        return rng.uniform(lo, hi, n).astype(np.float32)

    def choice(values: list[float]) -> FloatArray:
        return rng.choice(np.asarray(values, dtype=np.float32), n).astype(np.float32)

    has_target = rng.random(n) < 0.7
    players = np.where(
        has_target, rng.integers(1, 8, n), rng.integers(0, 4, n) * (rng.random(n) < 0.3)
    ).astype(np.float32)
    x[:, AT["enemies"]] = players / SCALE["enemies"]
    x[:, AT["players_in_view"]] = players / SCALE["players_in_view"]
    x[:, AT["target_distance"]] = np.where(has_target, uniform(0.0, 0.95), 1.0)
    x[:, AT["target_threat"]] = uniform()
    x[:, AT["target_hp"]] = uniform(0.05, 1.0)
    target_class = np.where(rng.random(n) < 0.85, 1.0, 0.5).astype(np.float32)
    x[:, AT["target_class"]] = target_class
    x[:, AT["target_skill_threat"]] = np.where(target_class == 1.0, uniform(0.01, 0.66), 0.3)

    in_pack = rng.random(n) < 0.4
    size = SCALE["pack"]
    pack = np.where(in_pack, rng.integers(1, 8, n) / size, 0.0).astype(np.float32)
    x[:, AT["pack"]] = pack
    x[:, AT["pack_cohesion"]] = np.where(in_pack, 0.8, 0.0)
    x[:, AT["leader"]] = np.where(in_pack, choice([0.0, 1.0]), 0.0)
    x[:, AT["formation"]] = np.where(in_pack, choice([0.0, 0.7]), 0.0)
    total = players + pack * size
    x[:, AT["area_control"]] = np.where(total > 0, pack * size / np.maximum(total, 1.0), 0.5)


def couple(x: FloatArray) -> None:
    """Write the slots the encoder derives from others (HP, SP, target), in place, [N, 64]."""
    hp = x[:, AT["hp"]]
    sp = x[:, AT["sp"]]
    dist = x[:, AT["target_distance"]]
    has_target = dist < NO_TARGET
    x[:, AT["hp_again"]] = hp
    x[:, AT["pack_hp"]] = hp
    x[:, AT["hp_success"]] = hp
    x[:, AT["damage_taken"]] = 1.0 - hp
    x[:, AT["hp_urgency"]] = 1.0 - hp
    x[:, AT["full_hp"]] = (hp >= 1.0).astype(np.float32)
    x[:, AT["sp_need"]] = 1.0 - sp
    x[:, AT["ally_skills_ready"]] = x[:, AT["skills_ready"]]
    for name in ("target_class", "target_threat", "target_hp", "target_skill_threat"):
        x[:, AT[name]] = np.where(has_target, x[:, AT[name]], 0.0)
    x[:, AT["damage_received"]] = np.where(has_target & (hp < 1.0), 0.3, 0.0)
    x[:, AT["advantage"]] = np.where(
        has_target, np.where(hp > x[:, AT["target_hp"]], 0.7, 0.3), 0.5
    )
    x[:, AT["goal_progress"]] = np.where(has_target, np.clip(1.0 - dist, 0.0, 1.0), 0.5)


TABLE: Final = Table(
    slots=SLOTS,
    reads=READS,
    knobs=KNOBS,
    draw_order=(range(0, 21), draw_company, range(21, 64)),
    couple=couple,
)
