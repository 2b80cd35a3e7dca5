"""The records a request travels as, from the bridge's claim to the worker's answer.

``Claimed`` is a row of ``claim_batch`` (sql/queries.sql) as the bridge reads it; ``Row`` is
the part of it that travels to a worker in the ``infer_batch`` message. Both are
``NamedTuple``: a ``Row`` still serialises as a msgpack array of five values, so the
message is byte for byte what it was with plain lists, and index access keeps working.
A worker receives plain lists from msgpack and makes them ``Row`` at the boundary
(`as_row`), where the ids of a hostile message are checked (mltasks.serving.batch).

``Answer`` is what goes into ``ai_responses`` (sql/queries.sql ``answer_batch``): its
``status`` closes the request in ``ai_requests`` and its ``source`` is the column's
(sql/schema.sql).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from mltasks.contract import TRADITIONAL_AI

Status = Literal["completed", "invalid", "expired"]
"""How an answer closes its request: answered, refused as malformed, or too late."""

Source = Literal["model", "rules", "cache", "bridge"]
"""Who answered: the ONNX fusion, the rule policy, a cached answer, or nobody (255)."""


class Row(NamedTuple):
    """A claimed request as it travels to a worker: ``[request_id, archetype, mob_id,
    state_vector, monster_id]`` on the wire.

    ``archetype`` and ``state_vector`` are as claimed, not yet validated (a bad one is
    answered 255 with its reason, `mltasks.serving.validation.validate_rows`); the state is
    a list of numbers, or the bytes of the claimed ``real[]`` (``array_send``) as the bridge
    sends it. ``mob_id`` and ``monster_id`` are ints or None (`as_row` drops anything else).
    """

    request_id: int
    archetype: Any
    mob_id: int | None
    state_vector: Any
    monster_id: int | None = None


class Claimed(NamedTuple):
    """One row of ``claim_batch``, in its column order."""

    request_id: int
    archetype: str | None
    mob_id: int | None
    state_vector: bytes | None
    """The ``real[]`` as ``array_send`` gives it (mltasks.serving.validation decodes it)."""
    monster_id: int | None
    overdue: bool
    """Already past the deadline when claimed: the claim answered it 255 ``deadline``."""
    created_epoch: float
    invalid: str | None
    """The claim answered it ``invalid`` already (its state is not 64 values): why."""

    def row(self) -> Row:
        """The part that travels to a worker (its first five columns)."""
        return _new(Row, self[:5])


# tuple.__new__ makes a record from a tuple of the right length without NamedTuple's own
# __new__ or _make (half the cost, per row, on the bridge's claim path).
_new = tuple.__new__


def claimed(rows: Iterable[tuple[Any, ...]]) -> list[Claimed]:
    """``claim_batch``'s rows (eight columns, in ``Claimed``'s order) as records."""
    return [_new(Claimed, r) for r in rows]


def _optional_int(v: object) -> int | None:
    """An id as an int, or None for anything that is not one (bool included)."""
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else None


def as_row(row: Sequence[Any]) -> Row:
    """A ``Row`` from what a message (or a caller) holds: ``[request_id, archetype, mob_id,
    state_vector(, monster_id)]``; extra values are ignored, a mob or monster id that is
    not an int is None. Needs at least four values."""
    if type(row) is Row:
        return row
    mob = row[2]
    monster = row[4] if len(row) > 4 else None
    return _new(
        Row,
        (
            row[0],
            row[1],
            mob if type(mob) is int else _optional_int(mob),  # the common case first
            row[3],
            monster if type(monster) is int else _optional_int(monster),
        ),
    )


def as_rows(rows: Sequence[Sequence[Any]]) -> list[Row]:
    """`as_row` for a batch (rows that are ``Row`` already cost one type check)."""
    return [r if type(r) is Row else as_row(r) for r in rows]


@dataclass(frozen=True, slots=True)
class Answer:
    """One answer, a row of ``ai_responses`` plus the status that closes its request."""

    request_id: int
    action_id: int
    confidence: float
    source: Source
    status: Status
    model: str | None = None
    reason: str | None = None
    """Why a 255 (or a rule answer given by the bridge): open-ended, e.g.
    ``state_length_<n>``, ``no_model``, ``deadline``, ``congested``."""


def traditional(request_id: int, reason: str, status: Status = "completed") -> Answer:
    """255: the game uses its own AI for this decision; the reason is recorded."""
    return Answer(request_id, TRADITIONAL_AI, 0.0, "bridge", status, None, reason)
