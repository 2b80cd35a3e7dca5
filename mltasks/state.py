"""The 64-value state vector, read by name: the one module that knows which index is what.

Two layouts ship (``state.layout`` in the config):

- ``encoder`` (the default): what the game's map server really sends, written by the fork's
  ``MobMLEncoder::encode_state`` (shared/CONTRACT.md section 2b).
- ``seed``: the seed document's table (CONTRACT.md section 2), with the exact slots inside
  each of its ranges chosen by this project (the demo models of earlier releases used it).

Everything else in the service (the rule policy, the demo models' sampler, the benchmarks,
the tests) asks a `Layout` for named features (`Features`) or builds a state from named
values (`Layout.state`); no other module indexes a state vector.

The named features and where each layout keeps them::

    feature            encoder (2b)                          seed (2)
    -----------------  ------------------------------------  ---------------------------
    hp                 0                                     0
    sp                 1                                     1
    has_target         31 < 0.99 (31 is 1.0 without one)     11 < 0.99 (nobody in sight)
    target_distance    31 (distance / view range)            11 (nearest enemy)
    target_hp          34                                    12
    target_threat      32                                    13
    enemies            30 (players in view / 10)             14 (enemies in sight / 5)
    other_threat       - (0: never a bigger threat)          15
    pack               22 (pack size / 10)                   21 (allies / 5)
    pack_hp            24 (the encoder writes own HP here)   22 (weakest ally; 1 if none)
    ally_under_attack  derived: pack and a target and        23
                       damage received (33 > 0)
    skill_ready 1..3   5 >= 0.5 for all three (share of      31, 32, 33
                       skills off cooldown)
    stunned            - (0: 6 counts any bad status)        41
    idle_time          -                                     61
    explores           59 >= 0.5 (random-walk mode)          -

How the policy copes where a layout lacks a feature: the encoder has no per-skill readiness,
so one share decides for all three skills; no second threat, so the rule tier never changes
target on it; no stun flag, so the stunned rule never fires; no idle clock, so a monster with
no target wanders when its mode allows random walk (59) and idles otherwise. The seed table
has no random-walk flag: there a monster wanders once its idle time passes its archetype's
threshold. The encoder's pack HP is the monster's own HP (its "ally HP" slot repeats it), so
a support monster heals when it is itself hurt while in a pack.

One module because it is the one place that knows which index is what; most of its length is
the two layouts' tables, slot by slot.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, get_args

import numpy as np
import numpy.typing as npt

from mltasks.contract import ARCHETYPES, STATE_DIM

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]

LayoutName = Literal["encoder", "seed"]
LAYOUT_NAMES: Final[tuple[LayoutName, ...]] = get_args(LayoutName)
DEFAULT_LAYOUT: Final[LayoutName] = "encoder"

NO_TARGET: Final = 0.99
"""A target distance at or above this means no target (both layouts encode it as 1.0)."""

FLAG: Final = 0.5
"""A 0/1 flag slot counts as set at or above this."""


@dataclass(frozen=True, slots=True)
class Features:
    """The named situation of a batch, one float32 (or bool) array of N rows per feature.

    ``idle_time`` and ``explores`` exist in one layout each (None in the other); every
    other feature exists in both, some derived (see the module's table).
    """

    hp: FloatArray
    sp: FloatArray
    has_target: BoolArray
    target_distance: FloatArray
    target_hp: FloatArray
    target_threat: FloatArray
    enemies: FloatArray
    other_threat: FloatArray
    pack: FloatArray
    pack_hp: FloatArray
    ally_under_attack: BoolArray
    skill_ready: tuple[BoolArray, BoolArray, BoolArray]
    stunned: BoolArray
    idle_time: FloatArray | None
    explores: BoolArray | None


Sampler = Callable[[np.random.Generator, int, int], FloatArray]
Reader = Callable[[FloatArray], Features]
Writer = Callable[[FloatArray, Mapping[str, Any]], None]


@dataclass(frozen=True, slots=True)
class Layout:
    """One state layout: its named slots, how to read features, sample and build states."""

    name: LayoutName
    slots: Mapping[str, int]
    """Named indices of this layout (documentation and the rare direct read)."""
    read_slots: tuple[int, ...]
    """The only indices the rule policy reads in this layout (the demo models see these)."""
    situation: tuple[str, ...]
    """The keywords `state` accepts."""
    _reader: Reader = field(repr=False)
    _sampler: Sampler = field(repr=False)
    _writer: Writer = field(repr=False)
    _base: Callable[[int], FloatArray] = field(repr=False)
    _hp: Callable[[FloatArray, FloatArray], None] = field(repr=False)

    def read(self, states: npt.ArrayLike) -> Features:
        """Named features of a batch float32 [N, 64]; raises ValueError on another shape."""
        return self._reader(check_states(states))

    def sample(self, rng: np.random.Generator, n: int, archetype: str | None = None) -> FloatArray:
        """``n`` plausible states (float32 [n, 64], values in [0, 1]) that exercise every
        rule; ``archetype`` fixes what the layout says about the monster's kind."""
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        a_idx = ARCHETYPES.index(archetype) if archetype is not None else -1
        return self._sampler(rng, n, a_idx)

    def with_hp(self, states: npt.ArrayLike, hp: npt.ArrayLike) -> FloatArray:
        """A copy of the batch with each row's HP ratio replaced, and every slot the layout
        derives from it (the encoder's repeats and complements) rewritten to match."""
        x = check_states(states).copy()
        self._hp(x, np.broadcast_to(np.asarray(hp, dtype=np.float32), (x.shape[0],)))
        return x

    def state(self, archetype: str | None = None, **situation: Any) -> FloatArray:
        """One state float32 [64] of a calm monster (full HP and SP, no target, nobody
        around, skills not ready) with the named situation applied, written as this layout
        writes it (coupled slots included). Unknown names raise ValueError."""
        unknown = sorted(set(situation) - set(self.situation))
        if unknown:
            raise ValueError(
                f"layout {self.name!r} has no {unknown}; it takes {list(self.situation)}"
            )
        a_idx = ARCHETYPES.index(archetype) if archetype is not None else 0
        x = self._base(a_idx)
        self._writer(x, situation)
        return x


def check_states(states: npt.ArrayLike) -> FloatArray:
    """The batch as float32 [N, 64], rejecting anything else."""
    arr = np.asarray(states)
    if arr.ndim != 2 or arr.shape[1] != STATE_DIM:
        raise ValueError(f"states must have shape [N, {STATE_DIM}], got {list(arr.shape)}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"states must be numeric, got dtype {arr.dtype}")
    return arr.astype(np.float32, copy=False)


# ============================================================================ encoder (2b)

ENCODER_SLOTS: Final[Mapping[str, int]] = {
    "hp": 0,
    "sp": 1,
    "level": 2,
    "mobility": 3,
    "atk": 4,
    "skills_ready": 5,
    "bad_status": 6,
    "archetype_id": 8,
    "role_confidence": 9,
    "hp_again": 10,
    "terrain": 12,
    "unwalkable_near": 13,
    "items_near": 14,
    "hazards_near": 15,
    "players_in_view": 16,
    "monsters_in_view": 17,
    "spawn_distance": 18,
    "map_danger": 19,
    "daytime": 20,
    "area_control": 21,
    "pack": 22,
    "pack_cohesion": 23,
    "pack_hp": 24,
    "leader": 25,
    "formation": 26,
    "ally_skills_ready": 28,
    "constant_29": 29,
    "enemies": 30,
    "target_distance": 31,
    "target_threat": 32,
    "damage_received": 33,
    "target_hp": 34,
    "target_class": 35,
    "target_skill_threat": 36,
    "positioning": 37,
    "escape_routes": 38,
    "advantage": 39,
    "initiated": 40,
    "skill_state": 41,
    "damage_taken": 42,
    "cooldown_progress": 43,
    "combat_duration": 44,
    "hp_success": 45,
    "time_alive": 47,
    "full_hp": 49,
    "provoked": 50,
    "momentum": 51,
    "goal": 52,
    "looter_assist": 53,
    "goal_progress": 54,
    "hp_urgency": 55,
    "sp_need": 56,
    "risk_tolerance": 57,
    "cooperation": 58,
    "explores": 59,
    "aggression": 60,
    "defence_priority": 61,
    "support_priority": 62,
    "constant_63": 63,
}
_E = ENCODER_SLOTS

# The skill states the encoder writes at 41 (idle, walk, loot, follow, rush, angry, berserk).
_SKILL_STATES: Final = np.array([0.0, 0.2, 0.3, 0.5, 0.6, 0.8, 0.9], dtype=np.float32)


def _read_encoder(x: FloatArray) -> Features:
    n = x.shape[0]
    dist = x[:, _E["target_distance"]]
    has_target = dist < NO_TARGET
    pack = x[:, _E["pack"]]
    ready = x[:, _E["skills_ready"]] >= FLAG
    return Features(
        hp=x[:, _E["hp"]],
        sp=x[:, _E["sp"]],
        has_target=has_target,
        target_distance=dist,
        target_hp=x[:, _E["target_hp"]],
        target_threat=x[:, _E["target_threat"]],
        enemies=x[:, _E["enemies"]],
        other_threat=np.zeros(n, dtype=np.float32),
        pack=pack,
        pack_hp=x[:, _E["pack_hp"]],
        ally_under_attack=(pack > 0) & has_target & (x[:, _E["damage_received"]] > 0),
        skill_ready=(ready, ready, ready),
        stunned=np.zeros(n, dtype=np.bool_),
        idle_time=None,
        explores=x[:, _E["explores"]] >= FLAG,
    )


def _encoder_base(a_idx: int) -> FloatArray:
    """A calm monster as the encoder writes it: full HP and SP, no target, nobody around."""
    x = np.zeros(STATE_DIM, dtype=np.float32)
    x[_E["hp"]] = 1.0
    x[_E["sp"]] = 1.0
    x[_E["target_distance"]] = 1.0
    x[_E["level"]] = 0.2
    x[_E["mobility"]] = 0.5
    x[_E["atk"]] = 0.05
    x[_E["archetype_id"]] = a_idx / 5.0
    x[_E["role_confidence"]] = 0.75
    x[_E["area_control"]] = 0.5
    x[_E["constant_29"]] = 0.5
    x[_E["positioning"]] = 1.0
    x[_E["escape_routes"]] = 1.0
    x[_E["momentum"]] = 0.1
    x[_E["cooperation"]] = 0.2
    x[_E["explores"]] = 0.2
    x[_E["aggression"]] = 0.3
    x[_E["defence_priority"]] = 0.7
    x[_E["constant_63"]] = 0.5
    _encoder_couple(x[None, :], target_class=np.zeros(1, dtype=np.float32))
    return x


def _encoder_couple(x: FloatArray, target_class: FloatArray) -> None:
    """Write the slots the encoder derives from others (HP, SP, target), in place, [N, 64]."""
    hp = x[:, _E["hp"]]
    sp = x[:, _E["sp"]]
    dist = x[:, _E["target_distance"]]
    has_target = dist < NO_TARGET
    x[:, _E["hp_again"]] = hp
    x[:, _E["pack_hp"]] = hp
    x[:, _E["hp_success"]] = hp
    x[:, _E["damage_taken"]] = 1.0 - hp
    x[:, _E["hp_urgency"]] = 1.0 - hp
    x[:, _E["full_hp"]] = (hp >= 1.0).astype(np.float32)
    x[:, _E["sp_need"]] = 1.0 - sp
    x[:, _E["ally_skills_ready"]] = x[:, _E["skills_ready"]]
    x[:, _E["target_class"]] = np.where(has_target, target_class, 0.0)
    for name in ("target_threat", "target_hp", "target_skill_threat"):
        x[:, _E[name]] = np.where(has_target, x[:, _E[name]], 0.0)
    x[:, _E["damage_received"]] = np.where(has_target & (hp < 1.0), 0.3, 0.0)
    x[:, _E["advantage"]] = np.where(
        has_target, np.where(hp > x[:, _E["target_hp"]], 0.7, 0.3), 0.5
    )
    x[:, _E["goal_progress"]] = np.where(has_target, np.clip(1.0 - dist, 0.0, 1.0), 0.5)


def _encoder_hp(x: FloatArray, hp: FloatArray) -> None:
    x[:, _E["hp"]] = hp
    _encoder_couple(x, target_class=x[:, _E["target_class"]].copy())


def _write_encoder(x: FloatArray, s: Mapping[str, Any]) -> None:
    """Apply a named situation to one encoder state (see `Layout.state`)."""
    for name in ("hp", "sp", "pack", "target_threat", "target_hp"):
        if name in s:
            x[_E[name]] = s[name]
    enemies = float(s.get("enemies", 0.1 if s.get("target_distance") is not None else 0.0))
    x[_E["enemies"]] = enemies
    x[_E["players_in_view"]] = enemies / 2.0  # players / 20 vs players / 10
    dist = s.get("target_distance")
    x[_E["target_distance"]] = 1.0 if dist is None else dist
    if dist is not None:
        x[_E["target_hp"]] = s.get("target_hp", 1.0)
        x[_E["target_threat"]] = s.get("target_threat", 0.5)
        x[_E["target_skill_threat"]] = 0.3
    if "skills_ready" in s:
        x[_E["skills_ready"]] = s["skills_ready"]
        x[_E["cooldown_progress"]] = s["skills_ready"]
    if "explores" in s:
        x[_E["explores"]] = 0.7 if s["explores"] else 0.2
    if s.get("pack", 0) > 0:
        x[_E["pack_cohesion"]] = 0.8
    _encoder_couple(
        x[None, :],
        target_class=np.ones(1, dtype=np.float32),  # a player: the usual target
    )


def _sample_encoder(rng: np.random.Generator, n: int, a_idx: int) -> FloatArray:
    """Plausible encoder states: its constants, its coupled slots, "no target" as 31 = 1."""
    x = np.zeros((n, STATE_DIM), dtype=np.float32)

    def uniform(lo: float = 0.0, hi: float = 1.0) -> FloatArray:
        return rng.uniform(lo, hi, n).astype(np.float32)

    def choice(values: list[float], p: list[float] | None = None) -> FloatArray:
        return rng.choice(np.asarray(values, dtype=np.float32), n, p=p).astype(np.float32)

    hp = uniform()
    hp[rng.random(n) < 0.15] = 1.0  # monsters at full HP are common
    x[:, _E["hp"]] = hp
    x[:, _E["sp"]] = uniform()
    x[:, _E["level"]] = uniform(0.01, 0.66)
    x[:, _E["mobility"]] = uniform()
    x[:, _E["atk"]] = uniform(0.0, 0.2)
    x[:, _E["skills_ready"]] = choice([0.0, 0.25, 1 / 3, 0.5, 2 / 3, 0.75, 1.0])
    x[:, _E["bad_status"]] = choice([0.0, 0.1, 0.2], [0.85, 0.1, 0.05])
    x[:, _E["archetype_id"]] = a_idx / 5.0 if a_idx >= 0 else choice([i / 5 for i in range(6)])
    x[:, _E["role_confidence"]] = 0.75
    x[:, _E["terrain"]] = choice([0.0, 1 / 3, 2 / 3, 1.0])
    x[:, _E["unwalkable_near"]] = uniform(0.0, 0.4)
    x[:, _E["items_near"]] = choice([0.0, 0.1, 0.2, 0.3], [0.7, 0.15, 0.1, 0.05])
    x[:, _E["hazards_near"]] = choice([0.0, 0.1, 0.2], [0.85, 0.1, 0.05])
    x[:, _E["monsters_in_view"]] = rng.integers(0, 16, n) / 30.0
    x[:, _E["spawn_distance"]] = uniform()
    x[:, _E["map_danger"]] = choice([0.0, 0.3, 0.5], [0.8, 0.1, 0.1])
    x[:, _E["daytime"]] = choice([0.0, 1.0])

    # A target in 70% of states: a player (usually) or a monster, anywhere in view.
    has_target = rng.random(n) < 0.7
    players = np.where(
        has_target, rng.integers(1, 8, n), rng.integers(0, 4, n) * (rng.random(n) < 0.3)
    ).astype(np.float32)
    x[:, _E["enemies"]] = players / 10.0
    x[:, _E["players_in_view"]] = players / 20.0
    x[:, _E["target_distance"]] = np.where(has_target, uniform(0.0, 0.95), 1.0)
    x[:, _E["target_threat"]] = uniform()
    x[:, _E["target_hp"]] = uniform(0.05, 1.0)
    target_class = np.where(rng.random(n) < 0.85, 1.0, 0.5).astype(np.float32)
    x[:, _E["target_skill_threat"]] = np.where(target_class == 1.0, uniform(0.01, 0.66), 0.3)

    # A pack in 40% of states.
    in_pack = rng.random(n) < 0.4
    pack = np.where(in_pack, rng.integers(1, 8, n) / 10.0, 0.0).astype(np.float32)
    x[:, _E["pack"]] = pack
    x[:, _E["pack_cohesion"]] = np.where(in_pack, 0.8, 0.0)
    x[:, _E["leader"]] = np.where(in_pack, choice([0.0, 1.0]), 0.0)
    x[:, _E["formation"]] = np.where(in_pack, choice([0.0, 0.7]), 0.0)
    total = players + pack * 10.0
    x[:, _E["area_control"]] = np.where(total > 0, pack * 10.0 / np.maximum(total, 1.0), 0.5)
    x[:, _E["constant_29"]] = 0.5

    x[:, _E["positioning"]] = uniform()
    x[:, _E["escape_routes"]] = rng.integers(2, 9, n) / 8.0
    x[:, _E["initiated"]] = choice([0.0, 1.0])
    skill_state = rng.choice(_SKILL_STATES, n)
    x[:, _E["skill_state"]] = skill_state
    x[:, _E["goal"]] = skill_state / 0.9
    x[:, _E["cooldown_progress"]] = uniform()
    x[:, _E["combat_duration"]] = np.where(has_target, uniform(), 0.0)
    x[:, _E["time_alive"]] = uniform()
    x[:, _E["provoked"]] = choice([0.0, 0.5, 1.0])
    x[:, _E["momentum"]] = choice([1.0, 0.9, 0.5, 0.1])
    x[:, _E["looter_assist"]] = choice([0.0, 0.3, 0.6])
    x[:, _E["risk_tolerance"]] = uniform()
    x[:, _E["cooperation"]] = choice([0.2, 0.8])
    x[:, _E["explores"]] = choice([0.2, 0.7])
    aggression = choice([0.9, 0.7, 0.3])
    x[:, _E["aggression"]] = aggression
    x[:, _E["defence_priority"]] = 1.0 - aggression
    x[:, _E["support_priority"]] = choice([0.0, 0.7, 0.9], [0.7, 0.15, 0.15])
    x[:, _E["constant_63"]] = 0.5
    _encoder_couple(x, target_class)
    return x


ENCODER: Final = Layout(
    name="encoder",
    slots=ENCODER_SLOTS,
    read_slots=tuple(
        sorted(
            _E[k]
            for k in (
                "hp",
                "sp",
                "skills_ready",
                "pack",
                "pack_hp",
                "enemies",
                "target_distance",
                "target_threat",
                "damage_received",
                "target_hp",
                "explores",
            )
        )
    ),
    situation=(
        "hp",
        "sp",
        "target_distance",
        "target_hp",
        "target_threat",
        "enemies",
        "pack",
        "skills_ready",
        "explores",
    ),
    _reader=_read_encoder,
    _sampler=_sample_encoder,
    _writer=_write_encoder,
    _base=_encoder_base,
    _hp=_encoder_hp,
)


# ============================================================================ seed (2)

SEED_SLOTS: Final[Mapping[str, int]] = {
    "hp": 0,
    "sp": 1,
    "pos_x": 2,
    "pos_y": 3,
    "pos_z": 4,
    "atk": 5,
    "def": 6,
    "matk": 7,
    # 11-20 enemy information
    "target_distance": 11,  # nearest enemy, 0 adjacent .. 1 nobody in sight
    "target_hp": 12,
    "target_threat": 13,
    "enemies": 14,  # enemies in sight / 5
    "other_threat": 15,  # the most dangerous enemy that is not the target
    # 21-30 ally information
    "pack": 21,  # allies / 5
    "pack_hp": 22,  # weakest ally's HP ratio, 1.0 when none
    "ally_under_attack": 23,
    # 31-40 skills: 1 when ready
    "skill_1_ready": 31,
    "skill_2_ready": 32,
    "skill_3_ready": 33,
    # 41-50 status effects
    "stunned": 41,
    # 61-63 temporal features
    "idle_time": 61,  # time since the last action, normalised
}
_S = SEED_SLOTS


def _read_seed(x: FloatArray) -> Features:
    dist = x[:, _S["target_distance"]]
    return Features(
        hp=x[:, _S["hp"]],
        sp=x[:, _S["sp"]],
        has_target=dist < NO_TARGET,
        target_distance=dist,
        target_hp=x[:, _S["target_hp"]],
        target_threat=x[:, _S["target_threat"]],
        enemies=x[:, _S["enemies"]],
        other_threat=x[:, _S["other_threat"]],
        pack=x[:, _S["pack"]],
        pack_hp=x[:, _S["pack_hp"]],
        ally_under_attack=x[:, _S["ally_under_attack"]] >= FLAG,
        skill_ready=(
            x[:, _S["skill_1_ready"]] >= FLAG,
            x[:, _S["skill_2_ready"]] >= FLAG,
            x[:, _S["skill_3_ready"]] >= FLAG,
        ),
        stunned=x[:, _S["stunned"]] >= FLAG,
        idle_time=x[:, _S["idle_time"]],
        explores=None,
    )


def _seed_base(a_idx: int) -> FloatArray:
    x = np.zeros(STATE_DIM, dtype=np.float32)
    x[_S["hp"]] = 1.0
    x[_S["sp"]] = 1.0
    x[_S["target_distance"]] = 1.0
    x[_S["pack_hp"]] = 1.0
    return x


def _write_seed(x: FloatArray, s: Mapping[str, Any]) -> None:
    dist = s.get("target_distance")
    x[_S["target_distance"]] = 1.0 if dist is None else dist
    if dist is not None:
        x[_S["target_hp"]] = s.get("target_hp", 1.0)
        x[_S["target_threat"]] = s.get("target_threat", 0.5)
        x[_S["enemies"]] = s.get("enemies", 0.2)
    for name in ("hp", "sp", "enemies", "other_threat", "pack", "pack_hp", "idle_time"):
        if name in s:
            x[_S[name]] = s[name]
    for name in ("ally_under_attack", "stunned"):
        if name in s:
            x[_S[name]] = 1.0 if s[name] else 0.0
    if "skills_ready" in s:
        ready = s["skills_ready"]
        flags = ready if isinstance(ready, tuple) else (ready, ready, ready)
        for i, flag in enumerate(flags, start=1):
            x[_S[f"skill_{i}_ready"]] = 1.0 if flag else 0.0


def _seed_hp(x: FloatArray, hp: FloatArray) -> None:
    x[:, _S["hp"]] = hp


def _sample_seed(rng: np.random.Generator, n: int, a_idx: int) -> FloatArray:
    """Seed-layout states: named slots with realistic marginals, the rest mild noise."""
    x = (rng.random((n, STATE_DIM)) * 0.5).astype(np.float32)

    def uniform(lo: float = 0.0, hi: float = 1.0) -> FloatArray:
        return rng.uniform(lo, hi, n).astype(np.float32)

    def flag(p: float) -> FloatArray:
        return (rng.random(n) < p).astype(np.float32)

    x[:, _S["hp"]] = uniform()
    x[:, _S["sp"]] = uniform()
    for name in ("pos_x", "pos_y", "pos_z", "atk", "def", "matk"):
        x[:, _S[name]] = uniform()

    # Enemies: a mass at "nobody in sight", else anywhere up to the edge of sight.
    seen = rng.random(n) >= 0.25
    count = rng.integers(1, 6, n).astype(np.float32)  # 1..5 enemies when any
    x[:, _S["target_distance"]] = np.where(seen, uniform(0.0, 0.95), 1.0)
    x[:, _S["target_hp"]] = np.where(seen, uniform(0.05, 1.0), 0.0)
    x[:, _S["target_threat"]] = np.where(seen, uniform(), 0.0)
    x[:, _S["enemies"]] = np.where(seen, count / 5.0, 0.0)
    x[:, _S["other_threat"]] = np.where(seen & (count > 1), uniform(), 0.0)

    # Allies: none in 30% of states (pack_hp 1.0 then, nobody under attack).
    allies = rng.random(n) >= 0.3
    x[:, _S["pack"]] = np.where(allies, rng.integers(1, 6, n) / 5.0, 0.0)
    x[:, _S["pack_hp"]] = np.where(allies, uniform(0.02, 1.0), 1.0)
    x[:, _S["ally_under_attack"]] = np.where(allies & seen, flag(0.4), 0.0)

    for i in (1, 2, 3):
        x[:, _S[f"skill_{i}_ready"]] = flag(0.6)
    stunned = _S["stunned"]
    x[:, stunned + 1 : stunned + 10] = flag(0.05)[:, None] * (
        rng.random((n, 9)) < 0.5
    )  # other status effects, sparse 0/1
    x[:, stunned] = flag(0.08)
    x[:, _S["idle_time"]] = uniform()
    return x


SEED: Final = Layout(
    name="seed",
    slots=SEED_SLOTS,
    read_slots=tuple(
        sorted(
            _S[k]
            for k in (
                "hp",
                "sp",
                "target_distance",
                "target_threat",
                "other_threat",
                "pack",
                "pack_hp",
                "ally_under_attack",
                "skill_1_ready",
                "skill_2_ready",
                "skill_3_ready",
                "stunned",
                "idle_time",
            )
        )
    ),
    situation=(
        "hp",
        "sp",
        "target_distance",
        "target_hp",
        "target_threat",
        "enemies",
        "other_threat",
        "pack",
        "pack_hp",
        "ally_under_attack",
        "skills_ready",
        "stunned",
        "idle_time",
    ),
    _reader=_read_seed,
    _sampler=_sample_seed,
    _writer=_write_seed,
    _base=_seed_base,
    _hp=_seed_hp,
)


LAYOUTS: Final[Mapping[str, Layout]] = {"encoder": ENCODER, "seed": SEED}
assert tuple(LAYOUTS) == LAYOUT_NAMES


def get_layout(name: str) -> Layout:
    """A layout by name; an unknown one raises ValueError naming the choices."""
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ValueError(f"unknown state layout {name!r}; expected one of {LAYOUT_NAMES}") from None


def sample_states(
    rng: np.random.Generator,
    n: int,
    layout: str = DEFAULT_LAYOUT,
    archetype: str | None = None,
) -> FloatArray:
    """``n`` plausible states in a layout (the encoder's unless told): tests, benchmarks,
    canaries and the demo models' training sets all draw from here."""
    return get_layout(layout).sample(rng, n, archetype)
