"""From claimed rows to answers: validate, group by archetype, one batched call per group.

Pure of I/O (the engine is passed in), so every rule here is unit-testable and the
Celery task stays a thin shell around it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np

from mltasks import metrics
from mltasks.errors import ModelError
from mltasks.models.family import Scores
from mltasks.models.fusion import Fused, FusionRule, Member, fuse_groups, model_name
from mltasks.models.history import windows as history_windows
from mltasks.models.loaded import TypeOutput
from mltasks.serving.records import Answer as Answer
from mltasks.serving.records import Row as Row
from mltasks.serving.records import Source, as_rows
from mltasks.serving.records import traditional as traditional
from mltasks.serving.validation import validate_rows

if TYPE_CHECKING:
    from mltasks.cache.client import BatchLookup

log = logging.getLogger(__name__)


class Predictor(Protocol):
    """What one model type (or the rule policy) is to the answering path."""

    @property
    def name(self) -> str: ...

    @property
    def model_type(self) -> str: ...

    @property
    def source(self) -> str: ...

    @property
    def sequence(self) -> bool:
        """Reads [N, 10, 64] history windows rather than [N, 64] states."""
        ...

    @property
    def cacheable(self) -> bool:
        """Its output depends on the state alone, so L3 may keep it."""
        ...

    @property
    def scores_kind(self) -> Scores: ...

    @property
    def packed_width(self) -> int: ...

    def unpack(self, packed: np.ndarray) -> TypeOutput: ...

    def run(self, states: np.ndarray, windows: np.ndarray | None = None) -> TypeOutput: ...


class Predictors(Protocol):
    """What answers a level: per archetype, the members of its fusion and their weights."""

    def fusion(self, archetype: str) -> Sequence[tuple[Predictor, float]]: ...


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
    """Canary candidates to run after the answers are written (`mltasks.models.canary`)."""


class BatchCache(Protocol):
    """The part of mltasks.cache.Cache a batch uses: one read and one write per batch."""

    def lookup(
        self,
        action_names: Sequence[str | None],
        output_names: Sequence[str | None],
        monsters: Sequence[int] = (),
    ) -> BatchLookup: ...

    def store_batch(
        self,
        actions: Iterable[tuple[str, int, float]],
        logits: Iterable[tuple[str | None, Any]],
        states: Iterable[tuple[int, Any]],
    ) -> int: ...


@dataclass(frozen=True, slots=True)
class _Valid:
    request_id: int
    archetype: str
    vec: np.ndarray
    mob_id: int | None
    monster_id: int | None


def answer_rows(rows: Sequence[Sequence[Any]], engine: Predictors) -> list[Answer]:
    """One answer per row, in any order; a bad row never fails the others."""
    return answer_batch(rows, engine).answers


@dataclass(slots=True)
class _Plan:
    """The cache's part of a batch: what to ask, and what it answered."""

    valid: list[_Valid]
    members: dict[str, Sequence[tuple[Predictor, float]]]
    action_names: list[str | None]
    output_names: dict[tuple[int, str], str]  # (row, model type) -> L3 key
    found: BatchLookup
    # (row, model type) -> its place in found.outputs: made once, read by every member
    output_index: dict[tuple[int, str], int] = field(default_factory=dict)
    # Seconds each model call of the batch took: recorded once, after the batch.
    timings: list[float] = field(default_factory=list)


def _plan(
    valid: list[_Valid], engine: Predictors, cache: BatchCache | None, lookup: bool = True
) -> _Plan:
    """Keys of the batch, and one cache round trip for L2, L3 and L1 (without ``lookup``:
    no L3 key at all, and a round trip for L1 alone where a member reads a history)."""
    from mltasks.cache.client import BatchLookup
    from mltasks.cache.codec import action_keys, output_key, state_digests

    members = {a: engine.fusion(a) for a in {v.archetype for v in valid}}
    empty = BatchLookup([None] * len(valid), [], {})
    if cache is None:
        return _Plan(valid, members, [None] * len(valid), {}, empty)
    names: list[str | None] = [None] * len(valid)
    with_mob = [i for i, v in enumerate(valid) if v.mob_id is not None]
    if with_mob:
        found = action_keys(
            np.stack([valid[i].vec for i in with_mob]),
            [int(valid[i].mob_id or 0) for i in with_mob],
        )
        for i, key in zip(with_mob, found, strict=True):
            names[i] = key
    # L3 keys only where L3 is read: an output kept by a level that never looks it up
    # would serve only a level that does, were it to come back within L3's TTL (10 s),
    # and would give it another precision's numbers (INT8 on the CPU, FP16 on a GPU).
    digests = state_digests(np.stack([v.vec for v in valid])) if lookup else []
    outputs: dict[tuple[int, str], str] = {}
    monsters: set[int] = set()
    for i, v in enumerate(valid):
        for member, _ in members[v.archetype]:
            if lookup and member.cacheable:
                version = getattr(member, "version", "")
                out_key = output_key(v.archetype, member.model_type, digests[i], version)
                if out_key is not None:
                    outputs[(i, member.model_type)] = out_key
            if member.sequence and v.monster_id is not None:
                monsters.add(v.monster_id)
    if lookup:
        looked = cache.lookup(names, list(outputs.values()), sorted(monsters))
    elif monsters:
        looked = cache.lookup([None] * len(valid), [], sorted(monsters))
    else:
        looked = empty
    index = {k: j for j, k in enumerate(outputs)}
    return _Plan(valid, members, names, outputs, looked, index)


@dataclass(slots=True)
class _Group:
    """The rows of one archetype that no L2 answer covered, through its fusion."""

    archetype: str
    rows: list[int]  # indices into the plan's valid rows
    # Several archetypes answered as one (`_voices_alike`): (archetype, rows) in row order.
    parts: list[tuple[str, int]] = field(default_factory=list)
    failed: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.bool_))
    non_finite: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.bool_))
    ran: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.bool_))


def _member_output(
    plan: _Plan,
    group: _Group,
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
        log.error(
            "%s returned non-finite values for %d rows",
            member.name,
            int((~finite).sum()),
            extra={"event": "inference_non_finite", "model": member.name},
        )
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
    group: _Group,
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
        from mltasks.models.canary import ShadowJob

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


def _tag(member: Predictor) -> str:
    """``<type>@<version>`` of a model with a version id, else its type alone (rules)."""
    version = str(getattr(member, "version", "") or "")
    return f"{member.model_type}@{version}" if version else member.model_type


@dataclass(slots=True)
class _Results:
    """What a batch gathers on its way: its answers, and what goes to the ladder and cache."""

    answers: list[Answer]
    failures: list[ModelError] = field(default_factory=list)
    fresh: list[tuple[str, int, float]] = field(default_factory=list)  # L2: key, action, conf
    computed: list[tuple[str | None, Any]] = field(default_factory=list)  # L3: key, output
    fused: dict[str, int] = field(default_factory=lambda: {"single": 0, "fused": 0})
    shadow: list[Any] = field(default_factory=list)


def answer_batch(
    rows: Sequence[Sequence[Any]],
    engine: Predictors,
    cache: BatchCache | None = None,
    rule: FusionRule | None = None,
    lookup: bool = True,
) -> Outcome:
    """Validate, look the batch up (one cache round trip), run each archetype's fusion
    members on what the cache missed, fuse, and answer every row exactly once.

    ``lookup`` False (a level outside ``caching.lookup_levels``): L2 and L3 are not read,
    only L1 histories where a member needs them; L2 answers and L1 states are still
    written (the game's next hits, the next histories), L3 outputs are not.

    With a cache: L2 answers rows outright, L3 saves a member's run for a row, L1 gives the
    sequence members their history windows; the fresh answers, outputs and states are
    written back by ``Outcome.remember``, after the caller has stored the answers.
    """
    rule = rule or FusionRule()
    refused, valid = _validated(as_rows(rows))
    if not valid:
        return Outcome(refused, [])
    plan = _plan(valid, engine, cache, lookup)
    res = _Results(refused)
    voiced: list[tuple[_Group, list[Member]]] = []
    served: list[_Group] = []
    for group in _cache_misses(plan, res.answers).values():
        if not plan.members[group.archetype]:
            res.answers.extend(
                traditional(plan.valid[i].request_id, "no_model") for i in group.rows
            )
            continue
        served.append(group)
    for alike in _alike(plan, served, engine):
        if len(alike) > 1:
            voiced.append(_voices_alike(plan, alike, res))
        else:
            voiced.append((alike[0], _voices(plan, alike[0], engine, res)))
    # One fusion for all the archetypes whose members line up (fusion.fuse_groups).
    fused = fuse_groups([(voices, len(group.rows)) for group, voices in voiced], rule)
    for (group, _), one in zip(voiced, fused, strict=True):
        _assemble(plan, group, one, res)
    metrics.observe_inference(plan.timings)
    outcome = Outcome(res.answers, res.failures, fused=res.fused, shadow=res.shadow)
    if cache is not None:
        states_seen = [(v.monster_id, v.vec) for v in valid if v.monster_id is not None]
        fresh, computed = res.fresh, res.computed
        outcome.remember = lambda: cache.store_batch(fresh, computed, states_seen)
    return outcome


def _validated(rows: Sequence[Row]) -> tuple[list[Answer], list[_Valid]]:
    """255 ``invalid`` (with the reason) for the rows that cannot be answered; the others."""
    refused: list[Answer] = []
    valid: list[_Valid] = []
    for row, checked in zip(rows, validate_rows(rows), strict=True):
        request_id = int(row.request_id)
        if isinstance(checked, str):
            refused.append(traditional(request_id, checked, status="invalid"))
            continue
        valid.append(_Valid(request_id, checked[0], checked[1], row.mob_id, row.monster_id))
    return refused, valid


def _cache_misses(plan: _Plan, answers: list[Answer]) -> dict[str, _Group]:
    """Answer the rows L2 holds an answer for; group the others by archetype."""
    groups: dict[str, _Group] = {}
    for i, v in enumerate(plan.valid):
        hit = plan.found.actions[i]
        if hit is not None:
            answers.append(Answer(v.request_id, hit[0], hit[1], "cache", "completed", "cache"))
        else:
            groups.setdefault(v.archetype, _Group(v.archetype, [])).rows.append(i)
    return groups


def _voices(plan: _Plan, group: _Group, engine: Predictors, res: _Results) -> list[Member]:
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


def _alike(plan: _Plan, groups: list[_Group], engine: Predictors) -> list[list[_Group]]:
    """The groups, with those whose members line up (the same types, weights and kinds:
    every archetype of a level, usually) together: they are answered as one group.

    A group with a canary candidate, or a batch with an L3 hit, keeps one group per
    archetype (`_voices`: the shadow's rows and the L3 rows are per archetype there).
    """
    offered = getattr(engine, "shadows", None)
    l3_hit = bool(plan.output_index) and any(o is not None for o in plan.found.outputs)
    sets: dict[tuple[object, ...], list[_Group]] = {}
    alone: list[list[_Group]] = []
    for group in groups:
        if l3_hit or (offered is not None and offered(group.archetype)):
            alone.append([group])
            continue
        sets.setdefault(_form(plan.members[group.archetype]), []).append(group)
    return [*sets.values(), *alone]


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


def _voices_alike(plan: _Plan, groups: list[_Group], res: _Results) -> tuple[_Group, list[Member]]:
    """`_voices` of several archetypes whose members line up, as one group: each model
    is still called on its own archetype's rows, but the rest (the checks, the fusion,
    the answers) runs once for the batch, not once per archetype: on a batch of 22 rows
    of six archetypes that was half of answering it."""
    rows = [i for g in groups for i in g.rows]
    n = len(rows)
    merged = _Group(groups[0].archetype, rows, [(g.archetype, len(g.rows)) for g in groups])
    merged.failed = np.zeros(n, dtype=np.bool_)
    merged.non_finite = np.zeros(n, dtype=np.bool_)
    states = np.stack([plan.valid[i].vec for i in rows])
    columns = [plan.members[g.archetype] for g in groups]
    windows = None
    if any(m.sequence for m, _ in columns[0]):
        monsters = [plan.valid[i].monster_id for i in rows]
        windows = history_windows(states, monsters, plan.found.histories)
    bounds = np.cumsum([0, *(len(g.rows) for g in groups)]).tolist()
    ran = np.zeros(n, dtype=np.bool_)
    voices = []
    for j, (first, weight) in enumerate(columns[0]):
        outs: list[TypeOutput] = []
        have = np.ones(n, dtype=np.bool_)
        for start, end, members in zip(bounds, bounds[1:], columns, strict=False):
            member = members[j][0]
            part = None if windows is None else windows[start:end]
            out = _call(member, states[start:end], part, res.failures, plan.timings)
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
                    log.error(
                        "%s returned non-finite values for %d rows",
                        members[j][0].name,
                        bad,
                        extra={"event": "inference_non_finite", "model": members[j][0].name},
                    )
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


def _concatenated(outs: Sequence[TypeOutput]) -> TypeOutput:
    """The outputs of one type for several archetypes' rows, one after another."""

    def cat(arrays: list[np.ndarray | None]) -> np.ndarray | None:
        if arrays[0] is None:
            return None
        return np.concatenate(cast(list[np.ndarray], arrays))

    return TypeOutput(
        cat([o.scores for o in outs]), cat([o.value for o in outs]), cat([o.threat for o in outs])
    )


def _assemble(plan: _Plan, group: _Group, fused: Fused, res: _Results) -> None:
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
            if name is not None:
                res.fresh.append((name, action, conf))
        start += count


def _unanswered_reason(group: _Group, k: int) -> str:
    """Why no member could speak for the group's row ``k``."""
    if group.failed[k]:
        return "model_error"
    if group.non_finite[k]:
        return "model_output_not_finite"
    return "no_model"
