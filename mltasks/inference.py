"""From claimed rows to answers: validate, group by archetype, one batched call per group.

Pure of I/O (the engine is passed in), so every rule here is unit-testable and the
Celery task stays a thin shell around it.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from mltasks import metrics
from mltasks.contract import ARCHETYPES, STATE_DIM, TRADITIONAL_AI
from mltasks.errors import ModelError

log = logging.getLogger(__name__)

# A claimed row as the bridge sends it: [request_id, archetype, mob_id, state_vector,
# monster_id] (the last may be absent).
Row = Sequence[Any]


class Predictor(Protocol):
    """What answers one archetype: an ONNX model, or the rule policy."""

    @property
    def name(self) -> str: ...

    @property
    def source(self) -> str: ...

    def logits(self, states: np.ndarray) -> np.ndarray: ...


class Predictors(Protocol):
    def serving(self, archetype: str) -> Predictor | None: ...


@dataclass(frozen=True, slots=True)
class Answer:
    request_id: int
    action_id: int
    confidence: float
    source: str  # model | rules | cache | bridge
    status: str  # completed | invalid
    model: str | None = None
    reason: str | None = None


def traditional(request_id: int, reason: str, status: str = "completed") -> Answer:
    """255: the game uses its own AI for this decision; the reason is recorded."""
    return Answer(request_id, TRADITIONAL_AI, 0.0, "bridge", status, None, reason)


def validate(row: Row) -> tuple[str, np.ndarray] | str:
    """(archetype, state float32[64]) for a usable row, else the reason it is not."""
    return validate_rows([row])[0]


def _plain_numbers(state: Sequence[Any]) -> bool:
    return all(type(v) is float or type(v) is int for v in state)


def validate_rows(rows: Sequence[Row]) -> list[tuple[str, np.ndarray] | str]:
    """`validate` for a batch: rows of plain numbers are converted as one array."""
    out: list[tuple[str, np.ndarray] | str] = []
    plain: list[int] = []
    for i, row in enumerate(rows):
        reason = _shape_reason(row)
        if reason is None and _plain_numbers(row[3]):
            plain.append(i)
            out.append("")  # filled below
        else:
            out.append(reason if reason is not None else _slow_validate(row))
    if plain:
        wide = np.array([rows[i][3] for i in plain], dtype=np.float64)
        with np.errstate(over="ignore"):
            vecs = wide.astype(np.float32)
        finite = np.asarray(np.isfinite(vecs).all(axis=1))  # NaN, inf, beyond float32's range
        for k, i in enumerate(plain):
            out[i] = (rows[i][1], vecs[k]) if finite[k] else "state_not_finite"
    return out


def _shape_reason(row: Row) -> str | None:
    archetype, state = row[1], row[3]
    if archetype is None:
        return "archetype_null"
    if archetype not in ARCHETYPES:
        return "archetype_unknown"
    if state is None:
        return "state_null"
    if not isinstance(state, (list, tuple)):
        return "state_not_array"
    if len(state) != STATE_DIM:
        return f"state_length_{len(state)}"
    return None


def _slow_validate(row: Row) -> tuple[str, np.ndarray] | str:
    """A state that is not all plain numbers: the exact reason, or its vector."""
    archetype, state = row[1], row[3]
    if any(v is None for v in state):  # numpy would silently turn None into NaN
        return "state_element_null"
    try:
        wide = np.array(state, dtype=np.float64)
    except (TypeError, ValueError):
        return "state_not_numeric"
    if wide.shape != (STATE_DIM,) or any(isinstance(v, bool) for v in state):
        return "state_not_numeric"
    with np.errstate(over="ignore"):
        vec = wide.astype(np.float32)
    if not np.isfinite(vec).all():
        return "state_not_finite"
    return archetype, vec


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


class BatchCache(Protocol):
    """The part of mltasks.cache.Cache a batch uses: one read and one write per batch."""

    def lookup_batch(
        self, action_names: Sequence[str | None], logit_names: Sequence[str | None]
    ) -> tuple[list[tuple[int, float] | None], list[np.ndarray | None]]: ...

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


def answer_rows(rows: Sequence[Row], engine: Predictors) -> list[Answer]:
    """One answer per row, in any order; a bad row never fails the others."""
    return answer_batch(rows, engine).answers


def _optional_int(row: Row, i: int) -> int | None:
    v = row[i] if len(row) > i else None
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else None


def answer_batch(
    rows: Sequence[Row],
    engine: Predictors,
    cache: BatchCache | None = None,
    model_type: str = "",
) -> Outcome:
    """Like answer_rows, also returning the model failures met on the way.

    With a cache: one lookup for the whole batch (L2 answers, L3 logits), the model only
    for what both missed, and one write of the fresh answers, logits and states.
    """
    from mltasks.cache import action_keys, logits_keys

    failures: list[ModelError] = []
    answers: list[Answer] = []
    valid: list[_Valid] = []
    for row, checked in zip(rows, validate_rows(rows), strict=True):
        request_id = int(row[0])
        if isinstance(checked, str):
            answers.append(traditional(request_id, checked, status="invalid"))
            continue
        valid.append(
            _Valid(request_id, checked[0], checked[1], _optional_int(row, 2), _optional_int(row, 4))
        )
    if not valid:
        return Outcome(answers, failures)

    names: list[str | None] = [None] * len(valid)
    l3_names: list[str | None] = [None] * len(valid)
    hit_actions: list[tuple[int, float] | None] = [None] * len(valid)
    hit_logits: list[np.ndarray | None] = [None] * len(valid)
    if cache is not None:
        with_mob = [i for i, v in enumerate(valid) if v.mob_id is not None]
        if with_mob:
            found = action_keys(
                np.stack([valid[i].vec for i in with_mob]),
                [int(valid[i].mob_id or 0) for i in with_mob],
            )
            for i, key in zip(with_mob, found, strict=True):
                names[i] = key
        l3_names = logits_keys([(v.archetype, model_type, v.vec) for v in valid])
        hit_actions, hit_logits = cache.lookup_batch(names, l3_names)

    groups: dict[str, list[int]] = defaultdict(list)
    for i, v in enumerate(valid):
        hit = hit_actions[i]
        if hit is not None:
            answers.append(Answer(v.request_id, hit[0], hit[1], "cache", "completed", "cache"))
        else:
            groups[v.archetype].append(i)

    fresh: list[tuple[str, int, float]] = []
    computed: list[tuple[str | None, np.ndarray]] = []
    for archetype, idxs in groups.items():
        model = engine.serving(archetype)
        if model is None:
            answers.extend(traditional(valid[i].request_id, "no_model") for i in idxs)
            continue
        logits: dict[int, np.ndarray] = {i: lg for i in idxs if (lg := hit_logits[i]) is not None}
        need = [i for i in idxs if i not in logits]
        if need:
            try:
                with metrics.time_inference():
                    out = model.logits(np.stack([valid[i].vec for i in need]))
            except Exception as exc:  # a model or the rule policy broke: these rows get 255
                err = exc if isinstance(exc, ModelError) else ModelError(f"{model.name}: {exc!r}")
                log.error("%s", err, extra={"event": "inference_failed", "model": model.name})
                failures.append(err)
                answers.extend(traditional(valid[i].request_id, "model_error") for i in need)
                need = []
            else:
                for i, row_logits in zip(need, out, strict=True):
                    logits[i] = row_logits
                    computed.append((l3_names[i], row_logits))
        ordered = [i for i in idxs if i in logits]
        if not ordered:
            continue
        block = np.stack([logits[i] for i in ordered])
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            log.error(
                "%s returned non-finite logits for %d rows",
                model.name,
                int((~finite).sum()),
                extra={"event": "inference_non_finite", "model": model.name},
            )
        actions, probs = softmax_choice(np.where(np.isfinite(block), block, 0.0))
        ran = set(need)
        for k, i in enumerate(ordered):
            rid = valid[i].request_id
            if not finite[k]:
                answers.append(traditional(rid, "model_output_not_finite"))
                continue
            action, conf = int(actions[k]), as_confidence(float(probs[k]))
            source = model.source if i in ran else "cache"
            answers.append(Answer(rid, action, conf, source, "completed", model.name))
            name = names[i]
            if name is not None:
                fresh.append((name, action, conf))

    outcome = Outcome(answers, failures)
    if cache is not None:
        states = [(v.monster_id, v.vec) for v in valid if v.monster_id is not None]
        outcome.remember = lambda: cache.store_batch(fresh, computed, states)
    return outcome
