"""Deterministic rule-based monster policy: the teacher of the demo models.

The demo ONNX models (``mltasks.demo_models``) are small MLPs fitted to imitate
this policy, so the whole pipeline produces behaviour that can be checked by
hand without any trained network.  It reads only the slots named in
``mltasks.contract.Idx`` and is vectorised over a batch: every rule is a boolean
mask over the rows and ``np.select`` picks the first rule that fires.

Rules, in priority order (the first one whose condition holds decides)::

    #   condition                                             action
    --  ----------------------------------------------------  -------------
    1   STUNNED >= 0.5                                        IDLE
    2   enemy in sight and HP < flee_hp                       FLEE
    3   heal_below > 0 and ALLY_MIN_HP < heal_below
        and SKILL_1_READY and SP >= heal_sp                   SKILL_1 (heal)
    4   taunts and enemy in sight and ALLY_UNDER_ATTACK
        and SKILL_3_READY and SP >= taunt_sp                  SKILL_3 (taunt)
    5   no enemy in sight and IDLE_TIME >= wander_after       MOVE_RANDOM
    6   no enemy in sight (otherwise)                         IDLE
    7   SECOND_THREAT - ENEMY_THREAT >= switch_margin         CHANGE_TARGET
    8   ENEMY_DIST < keep_away                                MOVE_AWAY
    9   nuke_range > 0 and ENEMY_DIST <= nuke_range
        and SKILL_2_READY and SP >= nuke_sp                   SKILL_2 (nuke)
    10  ENEMY_DIST <= attack_range                            ATTACK
    11  ENEMY_DIST > chase_limit                              IDLE (hold)
    12  otherwise                                             MOVE_CLOSER

"Enemy in sight" means ``ENEMY_DIST < SIGHT`` (1.0 encodes "nobody in sight");
a flag slot (skill ready, stunned, ally under attack) counts as set at >= 0.5.

Archetypes differ only in their ``ArchetypeParams``:

    archetype   flee_hp  attack  keep_away  chase  switch  skills
    ----------  -------  ------  ---------  -----  ------  ---------------------------
    aggressive  0.15     0.12    -          1.00   0.25    SKILL_2 bash in melee, SP>=0.5
    defensive   0.35     0.12    -          0.50   0.45    none; holds beyond 0.5
    support     0.30     0.35    0.15       0.60   0.50    SKILL_1 heal ally HP<0.5, SP>=0.2
    mage        0.25     0.50    0.25       1.00   0.35    SKILL_2 bolt within 0.7, SP>=0.3
    tank        0.10     0.12    -          0.80   0.30    SKILL_3 taunt, SP>=0.15
    ranged      0.25     0.65    0.30       1.00   0.35    none; kites between 0.3 and 0.65

Confidence is the margin of the deciding rule: how far its deciding feature(s)
lie past their threshold, normalised to [0, 1] (for a conjunction, the smallest
of its terms' margins), squashed by ``0.5 + 0.5 * tanh(3 * margin)`` into
[0.5, 1].  A decision right at a threshold gets 0.5, a clear-cut one nears 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from mltasks.contract import ARCHETYPES, N_ACTIONS, STATE_DIM, Action, Idx

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

SIGHT: Final = 0.99
"""ENEMY_DIST at or above this means no enemy in sight (the contract encodes it as 1.0)."""

FLAG: Final = 0.5
"""A 0/1 flag slot counts as set at or above this."""

READ_SLOTS: Final[tuple[int, ...]] = (
    Idx.HP,
    Idx.SP,
    Idx.ENEMY_DIST,
    Idx.ENEMY_THREAT,
    Idx.SECOND_THREAT,
    Idx.ALLY_MIN_HP,
    Idx.ALLY_UNDER_ATTACK,
    Idx.SKILL_1_READY,
    Idx.SKILL_2_READY,
    Idx.SKILL_3_READY,
    Idx.STUNNED,
    Idx.IDLE_TIME,
)
"""The only state slots the rules read; every other slot leaves the decision unchanged."""

_SQUASH_GAIN: Final = 3.0
_EPS: Final = 1e-6


@dataclass(frozen=True, slots=True)
class ArchetypeParams:
    """Thresholds of one archetype; distances and ratios are the normalised state values."""

    flee_hp: float
    """Flee when own HP is below this and an enemy is in sight."""
    attack_range: float
    """A basic attack reaches enemies at most this far."""
    keep_away: float
    """Back off when the enemy is closer than this (0: never)."""
    chase_limit: float
    """Beyond this distance hold position instead of closing in (1: always chase)."""
    switch_margin: float
    """Change target when the second enemy's threat exceeds the target's by this."""
    wander_after: float
    """With nobody in sight, wander once IDLE_TIME reaches this, else stay idle."""
    heal_below: float = 0.0
    """Heal (SKILL_1) an ally whose HP is below this (0: no heal)."""
    heal_sp: float = 0.0
    nuke_range: float = 0.0
    """Use the offensive skill (SKILL_2) on enemies at most this far (0: none)."""
    nuke_sp: float = 0.0
    taunts: bool = False
    """Taunt (SKILL_3) when an ally is under attack."""
    taunt_sp: float = 0.0


PARAMS: Final[dict[str, ArchetypeParams]] = {
    # Fights to the end, always closes in, bashes when SP is plentiful.
    "aggressive": ArchetypeParams(
        flee_hp=0.15,
        attack_range=0.12,
        keep_away=0.0,
        chase_limit=1.0,
        switch_margin=0.25,
        wander_after=0.3,
        nuke_range=0.12,
        nuke_sp=0.5,
    ),
    # Flees early, does not chase far: holds beyond half the sight range.
    "defensive": ArchetypeParams(
        flee_hp=0.35,
        attack_range=0.12,
        keep_away=0.0,
        chase_limit=0.5,
        switch_margin=0.45,
        wander_after=0.7,
    ),
    # Heals the weakest ally first; fights with a short-range spell, out of melee.
    "support": ArchetypeParams(
        flee_hp=0.30,
        attack_range=0.35,
        keep_away=0.15,
        chase_limit=0.6,
        switch_margin=0.5,
        wander_after=0.5,
        heal_below=0.5,
        heal_sp=0.2,
    ),
    # Casts from range, backs off when an enemy is too close.
    "mage": ArchetypeParams(
        flee_hp=0.25,
        attack_range=0.5,
        keep_away=0.25,
        chase_limit=1.0,
        switch_margin=0.35,
        wander_after=0.5,
        nuke_range=0.7,
        nuke_sp=0.3,
    ),
    # Almost never flees, taunts whatever hits its allies.
    "tank": ArchetypeParams(
        flee_hp=0.10,
        attack_range=0.12,
        keep_away=0.0,
        chase_limit=0.8,
        switch_margin=0.3,
        wander_after=0.6,
        taunts=True,
        taunt_sp=0.15,
    ),
    # Kites: keeps the enemy between keep_away and attack_range.
    "ranged": ArchetypeParams(
        flee_hp=0.25,
        attack_range=0.65,
        keep_away=0.3,
        chase_limit=1.0,
        switch_margin=0.35,
        wander_after=0.4,
    ),
}
assert tuple(PARAMS) == ARCHETYPES, "every archetype of the contract needs parameters"


def _params(archetype: str) -> ArchetypeParams:
    """Look up an archetype, failing loudly: a typo must not fall back to some default."""
    try:
        return PARAMS[archetype]
    except KeyError:
        raise ValueError(f"unknown archetype {archetype!r}; expected one of {ARCHETYPES}") from None


def _check_states(states: npt.ArrayLike) -> FloatArray:
    """Return the batch as float32 [N, 64], rejecting anything else."""
    arr = np.asarray(states)
    if arr.ndim != 2 or arr.shape[1] != STATE_DIM:
        raise ValueError(f"states must have shape [N, {STATE_DIM}], got {list(arr.shape)}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"states must be numeric, got dtype {arr.dtype}")
    return arr.astype(np.float32, copy=False)


def _above(x: FloatArray, threshold: float) -> FloatArray:
    """Margin of ``x >= threshold`` scaled by the room above the threshold."""
    return (x - threshold) / max(1.0 - threshold, _EPS)


def _below(x: FloatArray, threshold: float) -> FloatArray:
    """Margin of ``x < threshold`` scaled by the room below the threshold."""
    return (threshold - x) / max(threshold, _EPS)


Rules = tuple[list[BoolArray], list[int], list[FloatArray]]


def _rules(states: FloatArray, p: ArchetypeParams) -> Rules:
    """Evaluate every rule: (conditions, actions, margins) in priority order."""
    hp = states[:, Idx.HP]
    sp = states[:, Idx.SP]
    dist = states[:, Idx.ENEMY_DIST]
    threat = states[:, Idx.ENEMY_THREAT]
    second = states[:, Idx.SECOND_THREAT]
    ally_hp = states[:, Idx.ALLY_MIN_HP]
    ally_hit = states[:, Idx.ALLY_UNDER_ATTACK]
    s1 = states[:, Idx.SKILL_1_READY]
    s2 = states[:, Idx.SKILL_2_READY]
    s3 = states[:, Idx.SKILL_3_READY]
    stunned = states[:, Idx.STUNNED]
    idle = states[:, Idx.IDLE_TIME]

    n = states.shape[0]
    never = np.zeros(n, dtype=np.bool_)
    zero = np.zeros(n, dtype=np.float32)
    in_sight = dist < SIGHT
    sight_margin = _below(dist, SIGHT)

    heal = (
        (ally_hp < p.heal_below) & (s1 >= FLAG) & (sp >= p.heal_sp) if p.heal_below > 0 else never
    )
    heal_m = np.minimum(_below(ally_hp, p.heal_below), _above(sp, p.heal_sp))

    taunt = in_sight & (ally_hit >= FLAG) & (s3 >= FLAG) & (sp >= p.taunt_sp) if p.taunts else never
    taunt_m = np.minimum(_above(ally_hit, FLAG), _above(sp, p.taunt_sp))

    wander = idle >= p.wander_after
    wander_m = np.abs(idle - p.wander_after) / np.where(
        wander, max(1.0 - p.wander_after, _EPS), max(p.wander_after, _EPS)
    )

    gap = second - threat
    switch = gap >= p.switch_margin
    switch_m = _above(gap, p.switch_margin)

    away = dist < p.keep_away if p.keep_away > 0 else never
    away_m = _below(dist, p.keep_away) if p.keep_away > 0 else zero

    nuke = (dist <= p.nuke_range) & (s2 >= FLAG) & (sp >= p.nuke_sp) if p.nuke_range > 0 else never
    nuke_m = np.minimum(_below(dist, p.nuke_range), _above(sp, p.nuke_sp))

    attack = dist <= p.attack_range
    attack_m = _below(dist, p.attack_range)

    hold = dist > p.chase_limit
    hold_m = np.minimum((dist - p.chase_limit) / max(SIGHT - p.chase_limit, _EPS), sight_margin)

    # MOVE_CLOSER: between attack range and chase limit; margin to the nearer edge.
    upper = min(p.chase_limit, SIGHT)
    closer_m = (
        np.minimum(
            (dist - p.attack_range) / max(upper - p.attack_range, _EPS),
            (upper - dist) / max(upper - p.attack_range, _EPS),
        )
        * 2.0
    )

    conditions = [
        stunned >= FLAG,
        in_sight & (hp < p.flee_hp),
        heal,
        taunt,
        ~in_sight & wander,
        ~in_sight,
        switch,
        away,
        nuke,
        attack,
        hold,
    ]
    actions = [
        Action.IDLE,
        Action.FLEE,
        Action.SKILL_1,
        Action.SKILL_3,
        Action.MOVE_RANDOM,
        Action.IDLE,
        Action.CHANGE_TARGET,
        Action.MOVE_AWAY,
        Action.SKILL_2,
        Action.ATTACK,
        Action.IDLE,
        Action.MOVE_CLOSER,  # default
    ]
    margins = [
        _above(stunned, FLAG),
        np.minimum(_below(hp, p.flee_hp), sight_margin),
        heal_m,
        taunt_m,
        wander_m,
        wander_m,
        switch_m,
        away_m,
        nuke_m,
        attack_m,
        hold_m,
        closer_m,  # default
    ]
    return conditions, [int(a) for a in actions], margins


def _squash(margin: FloatArray) -> FloatArray:
    """Map a non-negative margin to a confidence in [0.5, 1]."""
    m = np.clip(np.nan_to_num(margin.astype(np.float32), nan=0.0), 0.0, 1.0)
    conf: FloatArray = (0.5 + 0.5 * np.tanh(_SQUASH_GAIN * m)).astype(np.float32)
    return conf


def decide(states: np.ndarray, archetype: str) -> tuple[np.ndarray, np.ndarray]:
    """Decide one action per row: (actions int64 [N] in 0..9, confidence float32 [N] in (0, 1]).

    Raises ``ValueError`` for an unknown archetype or a batch that is not [N, 64].
    """
    p = _params(archetype)
    x = _check_states(states)
    conditions, actions, margins = _rules(x, p)
    action = np.select(conditions, actions[:-1], default=actions[-1]).astype(np.int64)
    margin = np.select(conditions, margins[:-1], default=margins[-1]).astype(np.float32)
    return action, _squash(margin)


def logits(states: np.ndarray, archetype: str) -> np.ndarray:
    """Soft scores float32 [N, 10] whose argmax is ``decide``'s action.

    The chosen action gets ``log(confidence)``; the remaining probability mass
    goes to the action the next applicable rule would have picked (80%) and is
    spread evenly over the rest (20%), so a hesitant decision shows its runner-up.
    """
    p = _params(archetype)
    x = _check_states(states)
    conditions, actions, margins = _rules(x, p)
    action = np.select(conditions, actions[:-1], default=actions[-1]).astype(np.int64)
    conf = _squash(np.select(conditions, margins[:-1], default=margins[-1]))

    # Runner-up: first rule after the deciding one whose condition also holds.
    n = x.shape[0]
    fired = np.stack([*conditions, np.ones(n, dtype=np.bool_)], axis=1)  # [N, rules]
    first = np.argmax(fired, axis=1)
    later = fired & (np.arange(fired.shape[1])[None, :] > first[:, None])
    later[:, -1] = True
    second_rule = np.argmax(later, axis=1)
    runner = np.asarray(actions, dtype=np.int64)[second_rule]
    runner = np.where(runner == action, (action + 1) % N_ACTIONS, runner)

    rest = 1.0 - conf.astype(np.float64)
    probs = np.repeat((0.2 * rest / (N_ACTIONS - 2))[:, None], N_ACTIONS, axis=1)
    rows = np.arange(n)
    probs[rows, runner] = 0.8 * rest
    probs[rows, action] = conf
    return np.log(probs + _EPS).astype(np.float32)
