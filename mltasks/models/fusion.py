"""Fusion: the answer of several model types for the same rows, as one distribution.

The rule, per row (``models.fusion`` in the config names the types and weights per level):

1. Every type that proposes actions gives a distribution over actions 0-9: the softmax of
   its logits, or of its Q-values divided by ``q_temperature`` (twin critics count as
   Q-values). A type that failed or gave a non-finite value for the row drops out.
2. The fused distribution is their weighted average; the weights of the types present are
   renormalised, so a missing type never dilutes the others. No type left: no answer (255).
3. Danger moves probability to the retreat actions (FLEE and MOVE_AWAY, in proportion to
   what the actors already gave them): a threat score t (``threat_assessment``, clipped to
   [0, 1]) above 0.5 moves ``min(1, weight * threat_shift * (2t - 1))`` of the mass; a state
   value v (``movement_ppo``'s critic) rated bad, sigmoid(v) below 0.5, moves
   ``value_shift * (1 - 2 sigmoid(v))``. Both shifts compose: 1 - (1 - a)(1 - b).
4. The answer is the most probable action; its fused probability is the confidence.

``ai_responses.model`` names the types that had a say in the row: ``<archetype>/<type>``
for one, ``<archetype>/<type>+<type>+...`` for several, in the order the members are given (the
family's order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from mltasks.config import Config
from mltasks.contract import N_ACTIONS, Action
from mltasks.models.family import Scores
from mltasks.models.loaded import TypeOutput

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]

RETREAT: tuple[int, ...] = (int(Action.FLEE), int(Action.MOVE_AWAY))


@dataclass(frozen=True, slots=True)
class FusionRule:
    q_temperature: float = 1.0
    threat_shift: float = 0.5
    value_shift: float = 0.2


def rule_of(config: Config) -> FusionRule:
    """The fusion rule the configuration sets (``models.fusion``)."""
    f = config.models.fusion
    return FusionRule(f.q_temperature, f.threat_shift, f.value_shift)


@dataclass(frozen=True, slots=True)
class Member:
    """One type's say about N rows: its output, and which rows it may speak for."""

    model_type: str
    weight: float
    scores_kind: Scores
    out: TypeOutput
    ok: BoolArray


@dataclass(frozen=True, slots=True)
class Fused:
    probs: FloatArray  # [N, 10]
    answered: BoolArray  # [N]: at least one type proposed actions
    used: list[tuple[str, ...]]  # per row, the types that had a say

    def choice(self) -> tuple[npt.NDArray[np.int64], FloatArray]:
        actions = np.argmax(self.probs, axis=1).astype(np.int64)
        return actions, self.probs[np.arange(len(actions)), actions]


def fuse(members: Sequence[Member], n: int, rule: FusionRule) -> Fused:
    """The fused distribution of N rows (see the module's rule).

    The actors' softmax runs once over all of them stacked ([types, N, 10]): a batch's
    rows are few, so numpy's cost is per call, not per value (the same sums, in the same
    order, as one softmax per type).
    """
    keep = np.ones(n, dtype=np.float64)  # share of the mass the danger rules leave alone
    used = np.zeros((n, len(members)), dtype=np.bool_)
    scaled: list[npt.NDArray[np.floating]] = []  # per actor: scores / temperature
    weights: list[npt.NDArray[np.float64]] = []  # per actor: weight where it may speak
    for col, m in enumerate(members):
        ok = m.ok & (m.weight > 0)
        o = m.out
        if o.scores is not None:
            temperature = rule.q_temperature if m.scores_kind == "q_values" else 1.0
            z = o.scores if ok.all() else np.where(ok[:, None], o.scores, 0.0)
            scaled.append(z.astype(np.float64) / max(temperature, 1e-6))
            weights.append(np.asarray(m.weight * ok, dtype=np.float64))
        if o.threat is not None:
            t = np.clip(_finite_or_zero(o.threat), 0.0, 1.0)
            a = np.clip(m.weight * rule.threat_shift * np.maximum(0.0, 2.0 * t - 1.0), 0.0, 1.0)
            keep *= 1.0 - np.where(ok, a, 0.0)
        if o.value is not None:
            v = 1.0 / (1.0 + np.exp(-np.clip(_finite_or_zero(o.value), -50.0, 50.0)))
            b = np.clip(rule.value_shift * np.maximum(0.0, 1.0 - 2.0 * v), 0.0, 1.0)
            keep *= 1.0 - np.where(ok, b, 0.0)
        used[:, col] = ok
    if scaled:
        x = np.stack(scaled)
        x -= x.max(axis=2, keepdims=True)
        e = np.exp(x)
        p = (e / e.sum(axis=2, keepdims=True)).astype(np.float32)
        w = np.stack(weights)
        num = (w[:, :, None] * p).sum(axis=0)
        den = w.sum(axis=0)
    else:
        num = np.zeros((n, N_ACTIONS), dtype=np.float64)
        den = np.zeros(n, dtype=np.float64)
    answered = den > 0
    probs = np.divide(num, den[:, None], out=np.zeros_like(num), where=answered[:, None])
    retreat = probs[:, RETREAT] + 1e-6
    retreat /= retreat.sum(axis=1, keepdims=True)
    shifted = probs * keep[:, None]
    shifted[:, RETREAT] += (1.0 - keep)[:, None] * retreat
    probs = np.where(answered[:, None], shifted, 0.0)
    if used.all():  # every type spoke for every row (the usual case)
        names = [tuple(m.model_type for m in members)] * n
    else:
        names = [tuple(members[j].model_type for j in np.flatnonzero(row).tolist()) for row in used]
    return Fused(probs.astype(np.float32), answered, names)


def fuse_groups(groups: Sequence[tuple[Sequence[Member], int]], rule: FusionRule) -> list[Fused]:
    """`fuse` of each (members, N) group, in order: the groups whose members line up (the
    same types, weights and outputs: every archetype of a level, usually) go through one
    call on their rows stacked, then are split again.

    The rule is row by row, so the result is the same, bit for bit, as one call per group;
    the cost is not: numpy's cost on a few rows is per call, and a batch of 4 rows of 4
    archetypes made 4 calls of about 60 microseconds each.
    """
    if len(groups) == 1:  # one archetype: nothing to line up
        return [fuse(groups[0][0], groups[0][1], rule)]
    fused: list[Fused | None] = [None] * len(groups)
    alike: dict[tuple[object, ...], list[int]] = {}
    for g, (members, _) in enumerate(groups):
        alike.setdefault(_line_up(members), []).append(g)
    for same in alike.values():
        if len(same) == 1:
            members, n = groups[same[0]]
            fused[same[0]] = fuse(members, n, rule)
            continue
        sizes = [groups[g][1] for g in same]
        stacked = [
            _stacked([groups[g][0][col] for g in same]) for col in range(len(groups[same[0]][0]))
        ]
        whole = fuse(stacked, sum(sizes), rule)
        start = 0
        for g, n in zip(same, sizes, strict=True):
            end = start + n
            fused[g] = Fused(
                whole.probs[start:end], whole.answered[start:end], whole.used[start:end]
            )
            start = end
    return [f for f in fused if f is not None]


def _line_up(members: Sequence[Member]) -> tuple[object, ...]:
    """What must be equal for groups to be fused together: per member its type, weight and
    kind, and the dtype and width of each output it gave (None: no such output)."""

    def form(a: npt.NDArray[np.floating] | None) -> tuple[str, tuple[int, ...]] | None:
        return None if a is None else (a.dtype.str, a.shape[1:])

    return tuple(
        (
            m.model_type,
            m.weight,
            m.scores_kind,
            form(m.out.scores),
            form(m.out.value),
            form(m.out.threat),
        )
        for m in members
    )


def _stacked(members: Sequence[Member]) -> Member:
    """One member of several groups (lined up by `_line_up`), their rows one after another."""

    def cat(arrays: list[npt.NDArray[np.floating] | None]) -> npt.NDArray[np.floating] | None:
        return None if arrays[0] is None else np.concatenate(arrays)  # type: ignore[arg-type]

    first = members[0]
    out = TypeOutput(
        cat([m.out.scores for m in members]),
        cat([m.out.value for m in members]),
        cat([m.out.threat for m in members]),
    )
    return Member(
        first.model_type,
        first.weight,
        first.scores_kind,
        out,
        np.concatenate([m.ok for m in members]),
    )


def _finite_or_zero(x: npt.NDArray[np.floating]) -> npt.NDArray[np.floating]:
    """NaN as 0, what ``np.nan_to_num`` does before a clip to a finite range (infinities
    are clipped like the largest floats), at a fraction of its cost on a few rows."""
    return np.where(np.isnan(x), 0.0, x)


def model_name(archetype: str, types: Sequence[str]) -> str:
    """``ai_responses.model`` of a row: ``<archetype>/<type>[+<type>...]``."""
    return f"{archetype}/{'+'.join(types)}"
