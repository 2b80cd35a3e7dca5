"""From claimed rows to answers: validate, plan the batch, let each archetype's fusion
members speak (`mltasks.serving.voices`), fuse, and answer every row exactly once.

Pure of I/O (the engine and the cache are passed in), so every rule here is unit-testable
and the Celery task stays a thin shell around it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from mltasks import metrics
from mltasks.errors import ModelError
from mltasks.models.fusion import Fused, FusionRule, Member, fuse_groups, model_name
from mltasks.serving.plan import (
    BatchCache,
    Group,
    Plan,
    Predictor,
    Predictors,
    Results,
    Valid,
    plan_batch,
)
from mltasks.serving.records import Answer as Answer
from mltasks.serving.records import Row as Row
from mltasks.serving.records import Source, as_rows
from mltasks.serving.records import traditional as traditional
from mltasks.serving.validation import validate_rows
from mltasks.serving.voices import alike, voices, voices_alike

log = logging.getLogger(__name__)


def softmax_choice(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Argmax action and its softmax probability, per row."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    actions = p.argmax(axis=1)
    return actions, p[np.arange(len(actions)), actions]


def as_confidence(p: float) -> float:
    """Rounded to 4 decimals, inside [0, 1]: a value std::stof always parses."""
    if not math.isfinite(p):
        return 0.0
    return round(min(1.0, max(0.0, p)), 4)


@dataclass(slots=True)
class Outcome:
    """A batch's answers, and the model failures the fallback ladder must hear about.

    ``remember`` writes the fresh answers, logits and states to the cache: the caller runs
    it after the answers are in PostgreSQL, so the game never waits on a cache write.
    """

    answers: list[Answer]
    failures: list[ModelError]
    remember: Callable[[], object] = lambda: None
    fused: dict[str, int] = field(default_factory=dict)
    """Answers by how many types had a say: ``single`` or ``fused``."""
    shadow: list[Any] = field(default_factory=list)
    """Canary candidates to run after the answers are written (`mltasks.models.shadow`)."""


def answer_rows(rows: Sequence[Sequence[Any]], engine: Predictors) -> list[Answer]:
    """One answer per row, in any order; a bad row never fails the others."""
    return answer_batch(rows, engine).answers


def _tag(member: Predictor) -> str:
    """``<type>@<version>`` of a model with a version id, else its type alone (rules)."""
    version = str(getattr(member, "version", "") or "")
    return f"{member.model_type}@{version}" if version else member.model_type


def answer_batch(
    rows: Sequence[Sequence[Any]],
    engine: Predictors,
    cache: BatchCache | None = None,
    rule: FusionRule | None = None,
    lookup: bool = True,
    observe: bool = True,
    write_actions: bool = True,
    write_states: bool = True,
) -> Outcome:
    """Validate, look the batch up (one cache round trip), run each archetype's fusion
    members on what the cache missed, fuse, and answer every row exactly once.

    ``lookup`` False (a level outside ``caching.lookup_levels``): L2 and L3 are not read,
    only L1 histories where a member needs them; L2 answers (with ``write_actions``) and
    L1 states are still written (the game's next hits, the next histories), L3 outputs
    are not.

    ``observe`` False (the worker's warm-up, mltasks.serving.warm): the model calls
    timings stay out of ``ml_inference_latency_seconds``.

    ``write_actions`` False (``caching.write_actions``, the default of a worker): no L2
    answer is written, and without ``lookup`` no L2 key made: the game writes its own.
    ``write_states`` False (no worker that reads L1 histories is alive,
    `mltasks.serving.process.histories_read`): no state is pushed to L1.

    With a cache: L2 answers rows outright, L3 saves a member's run for a row, L1 gives the
    sequence members their history windows; the fresh answers, outputs and states are
    written back by ``Outcome.remember``, after the caller has stored the answers.
    """
    rule = rule or FusionRule()
    refused, valid = _validated(as_rows(rows))
    if not valid:
        return Outcome(refused, [])
    plan = plan_batch(valid, engine, cache, lookup, write_actions)
    res = Results(refused)
    voiced: list[tuple[Group, list[Member]]] = []
    served: list[Group] = []
    for group in _cache_misses(plan, res.answers).values():
        if not plan.members[group.archetype]:
            res.answers.extend(
                traditional(plan.valid[i].request_id, "no_model") for i in group.rows
            )
            continue
        served.append(group)
    together, alone = alike(plan, served, engine)
    voiced.extend(voices_alike(plan, groups, res) for groups in together)
    voiced.extend((group, voices(plan, group, engine, res)) for group in alone)
    # One fusion for all the archetypes whose members line up (fusion.fuse_groups).
    fused = fuse_groups([(voices, len(group.rows)) for group, voices in voiced], rule)
    for (group, _), one in zip(voiced, fused, strict=True):
        _assemble(plan, group, one, res)
    if observe:
        metrics.observe_inference(plan.timings)
    outcome = Outcome(res.answers, res.failures, fused=res.fused, shadow=res.shadow)
    if cache is not None:
        states_seen = (
            [(v.monster_id, v.vec) for v in valid if v.monster_id is not None]
            if write_states
            else []
        )
        fresh, computed = res.fresh, res.computed
        outcome.remember = lambda: cache.store_batch(fresh, computed, states_seen)
    return outcome


def _validated(rows: Sequence[Row]) -> tuple[list[Answer], list[Valid]]:
    """255 ``invalid`` (with the reason) for the rows that cannot be answered; the others."""
    refused: list[Answer] = []
    valid: list[Valid] = []
    for row, checked in zip(rows, validate_rows(rows), strict=True):
        request_id = int(row.request_id)
        if isinstance(checked, str):
            refused.append(traditional(request_id, checked, status="invalid"))
            continue
        valid.append(Valid(request_id, checked[0], checked[1], row.mob_id, row.monster_id))
    return refused, valid


def _cache_misses(plan: Plan, answers: list[Answer]) -> dict[str, Group]:
    """Answer the rows L2 holds an answer for; group the others by archetype."""
    groups: dict[str, Group] = {}
    for i, v in enumerate(plan.valid):
        hit = plan.found.actions[i]
        if hit is not None:
            answers.append(Answer(v.request_id, hit[0], hit[1], "cache", "completed", "cache"))
        else:
            groups.setdefault(v.archetype, Group(v.archetype, [])).rows.append(i)
    return groups


def _assemble(plan: Plan, group: Group, fused: Fused, res: Results) -> None:
    """The group's answers from the fusion: an action where it answered, else 255 and why."""
    actions, probs = fused.choice()
    action_of, prob_of, answered = actions.tolist(), probs.tolist(), fused.answered.tolist()
    start = 0
    for archetype, count in group.parts or [(group.archetype, len(group.rows))]:
        members = plan.members[archetype]
        # ai_responses.model names each type with the version that answered: <type>@<version>.
        tagged = {m.model_type: _tag(m) for m, _ in members}
        names: dict[tuple[str, ...], str] = {}
        source = cast(Source, members[0][0].source)  # "model" (ONNX) or "rules"
        for k in range(start, start + count):
            i = group.rows[k]
            rid = plan.valid[i].request_id
            if not answered[k]:
                res.answers.append(traditional(rid, _unanswered_reason(group, k)))
                continue
            action, conf = action_of[k], as_confidence(prob_of[k])
            used = fused.used[k]
            res.fused["fused" if len(used) > 1 else "single"] += 1
            model = names.get(used)
            if model is None:
                model = names[used] = model_name(archetype, [tagged[t] for t in used])
            answered_by: Source = source if group.ran[k] else "cache"
            res.answers.append(Answer(rid, action, conf, answered_by, "completed", model))
            name = plan.action_names[i]
            if name is not None and plan.write_actions:
                res.fresh.append((name, action, conf))
        start += count


def _unanswered_reason(group: Group, k: int) -> str:
    """Why no member could speak for the group's row ``k``."""
    if group.failed[k]:
        return "model_error"
    if group.non_finite[k]:
        return "model_output_not_finite"
    return "no_model"
