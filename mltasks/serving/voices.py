"""Each fusion member's say on a group's rows: its output, from L3 where it hit, else from
one model call, and the rows it may speak for (a failed or non-finite row drops out).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from typing import Any, cast

import numpy as np

from mltasks.errors import ModelError
from mltasks.models.fusion import Member
from mltasks.models.history import windows as history_windows
from mltasks.models.loaded import TypeOutput
from mltasks.serving.plan import Group, Plan, Predictor, Predictors, Results

log = logging.getLogger(__name__)


def _member_output(
    plan: Plan,
    group: Group,
    member: Predictor,
    states: np.ndarray,
    windows: np.ndarray | None,
    failures: list[ModelError],
    computed: list[tuple[str | None, Any]],
    shadow: tuple[Any, list[Any]] | None = None,
) -> tuple[TypeOutput, np.ndarray]:
    """One member's output for the group's rows, from L3 where it hit, else run once for
    the rest; and the rows it may speak for."""
    n = len(group.rows)
    have = np.zeros(n, dtype=np.bool_)
    cached: np.ndarray | None = None  # [n, packed_width], the rows L3 answered
    if member.cacheable and plan.output_index and plan.found.outputs:
        for k, i in enumerate(group.rows):
            j = plan.output_index.get((i, member.model_type))
            hit = plan.found.outputs[j] if j is not None else None
            if hit is not None and hit.shape == (member.packed_width,):
                if cached is None:
                    cached = np.zeros((n, member.packed_width), dtype=np.float32)
                cached[k], have[k] = hit, True
    # The rows to run: all of them (the usual case, no L3 hit: no copies), or the misses.
    need = np.arange(n) if cached is None else np.flatnonzero(~have)
    out = _run_member(group, member, states, windows, need, failures, shadow, plan.timings)
    if out is None:
        packed = np.zeros((n, member.packed_width), dtype=np.float32) if cached is None else cached
        return member.unpack(packed), have
    out = _float32(out)  # as the cache's packed form would hold it
    finite = out.finite()
    if not finite.all():
        _non_finite(member, int((~finite).sum()))
        group.non_finite[need[~finite]] = True
    have[need[finite]] = True
    group.ran[need[finite]] = True
    if member.cacheable and plan.output_names:  # the outputs L3 will keep
        fresh = out.packed()
        for pos, k in enumerate(need.tolist()):
            l3_key = plan.output_names.get((group.rows[k], member.model_type))
            if l3_key is not None and finite[pos]:
                computed.append((l3_key, fresh[pos]))
    if cached is None and finite.all():  # every row ran and is finite: no copies
        return out, have
    packed = np.zeros((n, member.packed_width), dtype=np.float32) if cached is None else cached
    packed[need] = out.packed()
    packed = np.where(have[:, None], packed, 0.0).astype(np.float32)
    return member.unpack(packed), have


def _run_member(
    group: Group,
    member: Predictor,
    states: np.ndarray,
    windows: np.ndarray | None,
    need: np.ndarray,
    failures: list[ModelError],
    shadow: tuple[Any, list[Any]] | None,
    timings: list[float],
) -> TypeOutput | None:
    """``member`` on the rows ``need`` (all of them: passed as they are, no copy); None
    when there are none, or it failed (its rows are marked, the failure recorded)."""
    if not len(need):
        return None
    if len(need) < len(states):
        states = states[need]
        windows = None if windows is None else windows[need]
    # CPU seconds of this thread: the candidate's, measured on the shadow thread, are
    # compared with these, and neither counts time spent waiting for a busy CPU.
    t0 = time.thread_time() if shadow is not None else 0.0
    out = _call(member, states, windows, failures, timings)
    if out is None:
        group.failed[need] = True
        return None
    if shadow is not None:  # the candidate runs on these rows after the answers
        from mltasks.models.shadow import ShadowJob

        candidate, jobs = shadow
        jobs.append(
            ShadowJob(
                group.archetype,
                member.model_type,
                candidate,
                states,
                windows,
                out.scores,
                time.thread_time() - t0,
            )
        )
    return out


def _call(
    member: Predictor,
    states: np.ndarray,
    windows: np.ndarray | None,
    failures: list[ModelError],
    timings: list[float],
) -> TypeOutput | None:
    """One model call, timed; None when it failed (the failure logged and recorded)."""
    started = time.perf_counter()
    try:
        out = member.run(states, windows)
    except Exception as exc:  # a model or the rule policy broke: it drops out
        err = exc if isinstance(exc, ModelError) else ModelError(f"{member.name}: {exc!r}")
        log.error("%s", err, extra={"event": "inference_failed", "model": member.name})
        failures.append(err)
        return None
    timings.append(time.perf_counter() - started)
    return out


def _float32(out: TypeOutput) -> TypeOutput:
    """``out`` in float32, as the cache's packed form holds it (a copy only where needed)."""

    def f32(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else a.astype(np.float32, copy=False)

    return TypeOutput(f32(out.scores), f32(out.value), f32(out.threat))


def voices(plan: Plan, group: Group, engine: Predictors, res: Results) -> list[Member]:
    """Each member's say on the group's rows (with its canary candidate's shadow run)."""
    members = plan.members[group.archetype]
    n = len(group.rows)
    group.failed = np.zeros(n, dtype=np.bool_)
    group.non_finite = np.zeros(n, dtype=np.bool_)
    group.ran = np.zeros(n, dtype=np.bool_)
    states = np.stack([plan.valid[i].vec for i in group.rows])
    windows = None
    if any(m.sequence for m, _ in members):
        monsters = [plan.valid[i].monster_id for i in group.rows]
        windows = history_windows(states, monsters, plan.found.histories)
    offered = getattr(engine, "shadows", None)
    candidates = offered(group.archetype) if offered is not None else {}
    voices = []
    for member, weight in members:
        cand = candidates.get(member.model_type)
        out, ok = _member_output(
            plan,
            group,
            member,
            states,
            windows,
            res.failures,
            res.computed,
            None if cand is None else (cand, res.shadow),
        )
        voices.append(Member(member.model_type, weight, member.scores_kind, out, ok))
    return voices


def alike(
    plan: Plan, groups: list[Group], engine: Predictors
) -> tuple[list[list[Group]], list[Group]]:
    """The groups answered by `voices_alike`, those whose members line up (the same types,
    weights and kinds: every archetype of a level, usually) together; and those answered
    alone by `voices`.

    A group with a canary candidate, or a batch with an L3 hit, is answered alone (the
    shadow's rows and the L3 rows are per archetype there).
    """
    offered = getattr(engine, "shadows", None)
    l3_hit = bool(plan.output_index) and any(o is not None for o in plan.found.outputs)
    sets: dict[tuple[object, ...], list[Group]] = {}
    alone: list[Group] = []
    for group in groups:
        if l3_hit or (offered is not None and offered(group.archetype)):
            alone.append(group)
            continue
        sets.setdefault(_form(plan.members[group.archetype]), []).append(group)
    return list(sets.values()), alone


def _form(members: Sequence[tuple[Predictor, float]]) -> tuple[object, ...]:
    """What must be equal for archetypes to be answered as one group."""
    return tuple(
        (
            type(m),
            m.model_type,
            weight,
            m.scores_kind,
            m.sequence,
            m.cacheable,
            m.packed_width,
            getattr(m, "roles", None),
        )
        for m, weight in members
    )


def voices_alike(plan: Plan, groups: list[Group], res: Results) -> tuple[Group, list[Member]]:
    """`voices` of several archetypes whose members line up, as one group: each model
    is still called on its own archetype's rows, but the rest (the checks, the fusion,
    the answers) runs once for the batch, not once per archetype: on a batch of 22 rows
    of six archetypes that was half of answering it."""
    rows = [i for g in groups for i in g.rows]
    n = len(rows)
    merged = Group(groups[0].archetype, rows, [(g.archetype, len(g.rows)) for g in groups])
    merged.failed = np.zeros(n, dtype=np.bool_)
    merged.non_finite = np.zeros(n, dtype=np.bool_)
    states = np.stack([plan.valid[i].vec for i in rows])
    columns = [plan.members[g.archetype] for g in groups]
    windows = None
    if any(m.sequence for m, _ in columns[0]):
        monsters = [plan.valid[i].monster_id for i in rows]
        windows = history_windows(states, monsters, plan.found.histories)
    bounds = [0, *itertools.accumulate(len(g.rows) for g in groups)]
    # Per archetype, each member's say: one merged call where there is one, else a call each.
    said = [
        _say(plan, g, members, states[start:end], _part(windows, start, end), res)
        for g, start, end, members in zip(groups, bounds[:-1], bounds[1:], columns, strict=True)
    ]
    ran = np.zeros(n, dtype=np.bool_)
    voices = []
    for j, (first, weight) in enumerate(columns[0]):
        outs: list[TypeOutput] = []
        have = np.ones(n, dtype=np.bool_)
        for start, end, members, told in zip(bounds[:-1], bounds[1:], columns, said, strict=True):
            member = members[j][0]
            out = told[j]
            if out is None:
                merged.failed[start:end] = True
                have[start:end] = False
                out = member.unpack(np.zeros((end - start, member.packed_width), np.float32))
            outs.append(out)
        out = _float32(_concatenated(outs))
        finite = out.finite()
        if not finite.all():
            for start, end, members in zip(bounds, bounds[1:], columns, strict=False):
                bad = int((~finite[start:end] & have[start:end]).sum())
                if bad:
                    _non_finite(members[j][0], bad)
            merged.non_finite |= have & ~finite
        ok = have & finite
        ran |= ok
        if first.cacheable and plan.output_names:  # the outputs L3 will keep
            fresh = out.packed()
            for k in np.flatnonzero(ok).tolist():
                l3_key = plan.output_names.get((rows[k], first.model_type))
                if l3_key is not None:
                    res.computed.append((l3_key, fresh[k]))
        if not ok.all():  # a row that may not speak gives zeros, as `_member_output`
            out = first.unpack(np.where(ok[:, None], out.packed(), 0.0).astype(np.float32))
        voices.append(Member(first.model_type, weight, first.scores_kind, out, ok))
    merged.ran = ran
    return merged, voices


def _part(windows: np.ndarray | None, start: int, end: int) -> np.ndarray | None:
    return None if windows is None else windows[start:end]


def _say(
    plan: Plan,
    group: Group,
    members: Sequence[tuple[Predictor, float]],
    states: np.ndarray,
    windows: np.ndarray | None,
    res: Results,
) -> list[TypeOutput | None]:
    """Each member's output for one archetype's rows (None: it failed, recorded): from its
    merged session in one call where the engine has one; a call each otherwise, and after
    a merged call that failed (so that the failing member is the one named)."""
    merged = plan.merged.get(group.archetype)
    if merged is not None:
        started = time.perf_counter()
        try:
            said: list[TypeOutput | None] = list(merged.run(states))
        except ModelError:
            pass
        else:
            plan.timings.append(time.perf_counter() - started)
            return said
    return [_call(m, states, windows, res.failures, plan.timings) for m, _ in members]


def _concatenated(outs: Sequence[TypeOutput]) -> TypeOutput:
    """The outputs of one type for several archetypes' rows, one after another."""

    def cat(arrays: list[np.ndarray | None]) -> np.ndarray | None:
        if arrays[0] is None:
            return None
        return np.concatenate(cast(list[np.ndarray], arrays))

    return TypeOutput(
        cat([o.scores for o in outs]), cat([o.value for o in outs]), cat([o.threat for o in outs])
    )


def _non_finite(member: Predictor, rows: int) -> None:
    log.error(
        "%s returned non-finite values for %d rows",
        member.name,
        rows,
        extra={"event": "inference_non_finite", "model": member.name},
    )
