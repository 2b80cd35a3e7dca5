"""The rule-based monster policy: fallback level 4, and the demo models' teacher.

It reads named features (``mltasks.state.Features``), never a bare index, so it is correct
on whichever layout the config names (``state.layout``: ``encoder``, what the game sends,
or ``seed``). It is vectorised over a batch: every rule is a boolean mask over the rows and
``np.select`` picks the first rule that fires.

Rules, in priority order (the first one whose condition holds decides)::

    #   situation                                              action
    --  -----------------------------------------------------  -------------------
    1   stunned                                                IDLE
    2   a target, and HP below the archetype's flee_hp         FLEE
    3   heals: in a pack whose HP is below heal_below,
        skill 1 ready, SP >= heal_sp                           SKILL_1 (heal)
    4   taunts: a target, an ally under attack,
        skill 3 ready, SP >= taunt_sp                          SKILL_3 (taunt)
    5   no target, and the monster may wander                  MOVE_RANDOM
    6   no target (otherwise)                                  IDLE
    7   another enemy's threat exceeds the target's
        by switch_margin                                       CHANGE_TARGET
    8   the target is closer than keep_away                    MOVE_AWAY (keep distance)
    9   casts: target within nuke_range, skill 2 ready,
        SP >= nuke_sp                                          SKILL_2 (bolt)
    10  the target within attack_range                         ATTACK
    11  the target beyond chase_limit                          IDLE (hold position)
    12  otherwise                                              MOVE_CLOSER

"May wander": in the seed layout, idle time at or above wander_after; in the encoder
layout, the monster's random-walk mode (slot 59). Where a layout lacks a feature the rule
that needs it cannot fire (no stun flag, no second threat in the encoder layout); how each
layout provides each feature is its table's ``READS`` (``mltasks.layouts``).

Per archetype (distances are the state's normalised ones, 0 adjacent .. 1 no target)::

    archetype   flees below  attacks within  keeps away  holds beyond  skills
    ----------  -----------  --------------  ----------  ------------  --------------------------
    aggressive  HP 0.20      0.12            -           -             none: always closes in
    defensive   HP 0.35      0.12            -           0.50          none; changes target late
    support     HP 0.30      0.35            0.15        0.60          SKILL_1 heal, pack HP<0.5
    mage        HP 0.25      0.50            0.25        -             SKILL_2 bolt within 0.7
    tank        HP 0.10      0.12            -           0.80          SKILL_3 taunt, SP>=0.15
    ranged      HP 0.25      0.65            0.30        -             none; kites 0.3-0.65

Confidence is the margin of the deciding rule: how far its deciding feature(s) lie past
their threshold, normalised to [0, 1] (for a conjunction, the smallest of its terms'
margins), squashed by ``0.5 + 0.5 * tanh(3 * margin)`` into [0.5, 1]. A decision right at a
threshold gets 0.5, a clear-cut one nears 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from mltasks.contract import ARCHETYPES, N_ACTIONS, Action
from mltasks.layouts.table import NO_TARGET
from mltasks.state import DEFAULT_LAYOUT, Features, get_layout

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

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
    # Fights almost to the end and always closes in: a plain melee attacker.
    "aggressive": ArchetypeParams(
        flee_hp=0.2,
        attack_range=0.12,
        keep_away=0.0,
        chase_limit=1.0,
        switch_margin=0.25,
        wander_after=0.3,
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


def _above(x: FloatArray, threshold: float) -> FloatArray:
    """Margin of ``x >= threshold`` scaled by the room above the threshold."""
    return (x - threshold) / max(1.0 - threshold, _EPS)


def _below(x: FloatArray, threshold: float) -> FloatArray:
    """Margin of ``x < threshold`` scaled by the room below the threshold."""
    return (threshold - x) / max(threshold, _EPS)


Rules = tuple[list[BoolArray], list[int], list[FloatArray]]


def _rules(f: Features, p: ArchetypeParams) -> Rules:
    """Evaluate every rule: (conditions, actions, margins) in priority order."""
    hp, sp, dist = f.hp, f.sp, f.target_distance
    ready1, ready2, ready3 = f.skill_ready
    n = hp.shape[0]
    never = np.zeros(n, dtype=np.bool_)
    zero = np.zeros(n, dtype=np.float32)
    one = np.ones(n, dtype=np.float32)
    in_sight = f.has_target
    sight_margin = _below(dist, NO_TARGET)

    heal = (
        (f.pack > 0) & (f.pack_hp < p.heal_below) & ready1 & (sp >= p.heal_sp)
        if p.heal_below > 0
        else never
    )
    heal_m = np.minimum(_below(f.pack_hp, p.heal_below), _above(sp, p.heal_sp))

    taunt = in_sight & f.ally_under_attack & ready3 & (sp >= p.taunt_sp) if p.taunts else never
    taunt_m = _above(sp, p.taunt_sp)

    if f.idle_time is not None:
        idle = f.idle_time
        wander = idle >= p.wander_after
        wander_m = np.abs(idle - p.wander_after) / np.where(
            wander, max(1.0 - p.wander_after, _EPS), max(p.wander_after, _EPS)
        )
    else:  # the encoder's random-walk mode: a flag, no clock
        wander = f.explores if f.explores is not None else never
        wander_m = one * 0.5

    gap = f.other_threat - f.target_threat
    switch = gap >= p.switch_margin
    switch_m = _above(gap, p.switch_margin)

    away = dist < p.keep_away if p.keep_away > 0 else never
    away_m = _below(dist, p.keep_away) if p.keep_away > 0 else zero

    nuke = (dist <= p.nuke_range) & ready2 & (sp >= p.nuke_sp) if p.nuke_range > 0 else never
    nuke_m = np.minimum(_below(dist, p.nuke_range), _above(sp, p.nuke_sp))

    attack = dist <= p.attack_range
    attack_m = _below(dist, p.attack_range)

    hold = dist > p.chase_limit
    hold_m = np.minimum((dist - p.chase_limit) / max(NO_TARGET - p.chase_limit, _EPS), sight_margin)

    # MOVE_CLOSER: between attack range and chase limit; margin to the nearer edge.
    upper = min(p.chase_limit, NO_TARGET)
    closer_m = (
        np.minimum(
            (dist - p.attack_range) / max(upper - p.attack_range, _EPS),
            (upper - dist) / max(upper - p.attack_range, _EPS),
        )
        * 2.0
    )

    conditions = [
        f.stunned,
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
        one,
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


def projected_hp(windows: npt.ArrayLike, layout: str = DEFAULT_LAYOUT) -> FloatArray:
    """Per history window [N, 10, 64] (oldest first): the HP the monster is heading for,
    its current HP plus the change over the window, clipped to [0, 1]."""
    w = np.asarray(windows, dtype=np.float32)
    if w.ndim != 3 or w.shape[1] < 1:
        raise ValueError(f"windows must have shape [N, T, 64], got {list(w.shape)}")
    lay = get_layout(layout)
    last, first = lay.read(w[:, -1, :]).hp, lay.read(w[:, 0, :]).hp
    out: FloatArray = np.clip(last + (last - first), 0.0, 1.0).astype(np.float32)
    return out


def decide_history(
    windows: npt.ArrayLike, archetype: str, layout: str = DEFAULT_LAYOUT
) -> tuple[IntArray, FloatArray]:
    """The sequence models' teacher: `decide` on the current state (the window's last row),
    as if the HP were already where its trend leads (`projected_hp`). A monster losing HP
    fast flees before it crosses its threshold; with no history (the current state repeated)
    it is exactly `decide`."""
    w = np.asarray(windows, dtype=np.float32)
    current = get_layout(layout).with_hp(w[:, -1, :], projected_hp(w, layout))
    return decide(current, archetype, layout)


def threat(states: npt.ArrayLike, layout: str = DEFAULT_LAYOUT) -> FloatArray:
    """The threat the teacher states, in [0, 1]: none without a target, else 60% the
    target's threat and 40% how hurt the monster is (the demo threat model's target)."""
    f = get_layout(layout).read(states)
    t = np.where(f.has_target, 0.6 * f.target_threat + 0.4 * (1.0 - f.hp), 0.0)
    out: FloatArray = np.clip(t, 0.0, 1.0).astype(np.float32)
    return out


def decide(
    states: npt.ArrayLike, archetype: str, layout: str = DEFAULT_LAYOUT
) -> tuple[IntArray, FloatArray]:
    """Decide one action per row: (actions int64 [N] in 0..9, confidence float32 [N] in (0, 1]).

    Raises ``ValueError`` for an unknown archetype or layout, or a batch that is not [N, 64].
    """
    p = _params(archetype)
    conditions, actions, margins = _rules(get_layout(layout).read(states), p)
    action = np.select(conditions, actions[:-1], default=actions[-1]).astype(np.int64)
    margin = np.select(conditions, margins[:-1], default=margins[-1]).astype(np.float32)
    return action, _squash(margin)


def logits(states: npt.ArrayLike, archetype: str, layout: str = DEFAULT_LAYOUT) -> FloatArray:
    """Soft scores float32 [N, 10] whose argmax is ``decide``'s action.

    The chosen action gets ``log(confidence)``; the remaining probability mass
    goes to the action the next applicable rule would have picked (80%) and is
    spread evenly over the rest (20%), so a hesitant decision shows its runner-up.
    """
    p = _params(archetype)
    conditions, actions, margins = _rules(get_layout(layout).read(states), p)
    action = np.select(conditions, actions[:-1], default=actions[-1]).astype(np.int64)
    conf = _squash(np.select(conditions, margins[:-1], default=margins[-1]))

    # Runner-up: first rule after the deciding one whose condition also holds.
    n = action.shape[0]
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
