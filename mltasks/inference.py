"""From claimed rows to answers: validate, group by archetype, one batched call per group.

Pure of I/O (the engine is passed in), so every rule here is unit-testable and the
Celery task stays a thin shell around it.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from mltasks.contract import ARCHETYPES, STATE_DIM, TRADITIONAL_AI
from mltasks.errors import ModelError

log = logging.getLogger(__name__)

# A claimed row as the bridge sends it: [request_id, archetype, mob_id, state_vector].
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
    if not np.isfinite(vec).all():  # NaN, infinities, and values beyond float32's range
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
    """A batch's answers, and the model failures the fallback ladder must hear about."""

    answers: list[Answer]
    failures: list[ModelError]


def answer_rows(rows: Sequence[Row], engine: Predictors) -> list[Answer]:
    """One answer per row, in any order; a bad row never fails the others."""
    return answer_batch(rows, engine).answers


def answer_batch(rows: Sequence[Row], engine: Predictors) -> Outcome:
    """Like answer_rows, also returning the model failures met on the way."""
    failures: list[ModelError] = []
    answers: list[Answer] = []
    groups: dict[str, tuple[list[int], list[np.ndarray]]] = defaultdict(lambda: ([], []))
    for row in rows:
        request_id = int(row[0])
        checked = validate(row)
        if isinstance(checked, str):
            answers.append(traditional(request_id, checked, status="invalid"))
            continue
        archetype, vec = checked
        ids, vecs = groups[archetype]
        ids.append(request_id)
        vecs.append(vec)

    for archetype, (ids, vecs) in groups.items():
        model = engine.serving(archetype)
        if model is None:
            answers.extend(traditional(i, "no_model") for i in ids)
            continue
        try:
            logits = model.logits(np.stack(vecs))
        except Exception as exc:  # a model or the rule policy broke: this group gets 255
            err = exc if isinstance(exc, ModelError) else ModelError(f"{model.name}: {exc!r}")
            log.error("%s", err, extra={"event": "inference_failed", "model": model.name})
            failures.append(err)
            answers.extend(traditional(i, "model_error") for i in ids)
            continue
        if not np.isfinite(logits).all():
            bad = ~np.isfinite(logits).all(axis=1)
            log.error(
                "%s returned non-finite logits for %d rows",
                model.name,
                int(bad.sum()),
                extra={"event": "inference_non_finite", "model": model.name},
            )
        actions, probs = softmax_choice(np.nan_to_num(logits, nan=0.0, posinf=0.0, neginf=0.0))
        finite = np.isfinite(logits).all(axis=1)
        for i, request_id in enumerate(ids):
            if not finite[i]:
                answers.append(traditional(request_id, "model_output_not_finite"))
                continue
            answers.append(
                Answer(
                    request_id,
                    int(actions[i]),
                    as_confidence(float(probs[i])),
                    model.source,
                    "completed",
                    model.name,
                )
            )
    return Outcome(answers, failures)
