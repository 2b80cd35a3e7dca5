"""What a row must be before a model sees it: a known archetype and 64 finite numbers.

A row that is not gets 255 with the reason (``state_length_63``, ``state_not_finite``, ...)
and never costs the other rows of its batch their answer.

A state comes as a list of numbers (any sender: tests, canaries, a hand-made message) or,
from the bridge, as the bytes PostgreSQL's ``array_send`` gives for the row's ``real[]``
(sql/queries.sql ``claim_batch``): a batch of those is decoded as one array, and no
Python float is made for it on either side of the broker.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any, Final

import numpy as np

from mltasks.contract import ARCHETYPES, STATE_DIM
from mltasks.serving.records import Row, as_row


def validate(row: Sequence[Any]) -> tuple[str, np.ndarray] | str:
    """(archetype, state float32[64]) for a usable row, else the reason it is not."""
    return validate_rows([as_row(row)])[0]


_PLAIN = frozenset({float, int})


def _plain_numbers(state: Sequence[Any]) -> bool:
    """Only floats and ints (not bool, str or None, which numpy would quietly convert)."""
    return set(map(type, state)) <= _PLAIN  # in C: 1.3 against 2.0 us a row


# array_send of a one-dimensional real[] without NULLs: five big-endian int4 (dimensions,
# has-NULLs flag, element type oid 700 = float4, length, lower bound), then per value its
# length (4) and the float4 itself.
FLOAT4_OID: Final = 700
WIRE_HEADER: Final = (1, 0, FLOAT4_OID, STATE_DIM)
WIRE_WORDS: Final = 5 + 2 * STATE_DIM
WIRE_BYTES: Final = 4 * WIRE_WORDS


def validate_rows(rows: Sequence[Row]) -> list[tuple[str, np.ndarray] | str]:
    """`validate` for a batch: rows of plain numbers are converted as one array, and so
    are the bridge's states (bytes, `_wire_states`)."""
    out: list[tuple[str, np.ndarray] | str] = []
    plain: list[int] = []
    wire: list[int] = []
    for i, row in enumerate(rows):
        reason = _shape_reason(row)
        if reason is not None:
            out.append(reason)
            continue
        out.append("")  # filled below
        state = row.state_vector
        if type(state) is bytes:
            wire.append(i)
        elif _plain_numbers(state):
            plain.append(i)
        else:
            out[i] = _slow_validate(row)
    if plain:
        wide = np.array([rows[i].state_vector for i in plain], dtype=np.float64)
        with np.errstate(over="ignore"):
            vecs = wide.astype(np.float32)
        _checked(rows, plain, vecs, np.ones(len(plain), dtype=np.bool_), out)
    if wire:
        vecs, readable = _wire_states([rows[i].state_vector for i in wire])
        _checked(rows, wire, vecs, readable, out)
    return out


def _checked(
    rows: Sequence[Row],
    picked: list[int],
    vecs: np.ndarray,
    readable: np.ndarray,
    out: list[tuple[str, np.ndarray] | str],
) -> None:
    """Rows ``picked`` as (archetype, vector), or why not: ``readable`` False for a state
    whose bytes are no float4 array (`_wire_reason`), else finite numbers only."""
    finite = np.isfinite(vecs).all(axis=1)  # NaN, inf, beyond float32's range
    for k, i in enumerate(picked):
        if not readable[k]:
            out[i] = _wire_reason(rows[i].state_vector)
        else:
            out[i] = (rows[i].archetype, vecs[k]) if finite[k] else "state_not_finite"


def _wire_states(states: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """float32 [n, 64] of ``WIRE_BYTES``-long array_send bytes, and which were readable
    (the header of a 1-D float4 array of 64 values without NULLs, each value 4 bytes)."""
    words = np.frombuffer(b"".join(states), dtype=">i4").reshape(len(states), WIRE_WORDS)
    readable = (words[:, :4] == WIRE_HEADER).all(axis=1) & (words[:, 5::2] == 4).all(axis=1)
    vecs = words.view(">f4")[:, 6::2].astype(np.float32)
    return vecs, readable


def _wire_reason(state: bytes) -> str:
    """Why bytes are not a usable state: the reasons a list would have been given."""
    if len(state) < 16:
        return "state_not_array"
    dims, has_nulls, oid, length = struct.unpack(">4i", state[:16])
    if dims != 1 or oid != FLOAT4_OID:
        return "state_not_array"
    if has_nulls:
        return "state_element_null"
    if length != STATE_DIM:
        return f"state_length_{max(length, 0)}"
    return "state_not_array"  # the right header over the wrong number of bytes


def _shape_reason(row: Row) -> str | None:
    archetype, state = row.archetype, row.state_vector
    if archetype is None:
        return "archetype_null"
    if archetype not in ARCHETYPES:
        return "archetype_unknown"
    if state is None:
        return "state_null"
    if type(state) is bytes:
        return None if len(state) == WIRE_BYTES else _wire_reason(state)
    if not isinstance(state, (list, tuple)):
        return "state_not_array"
    if len(state) != STATE_DIM:
        return f"state_length_{len(state)}"
    return None


def _slow_validate(row: Row) -> tuple[str, np.ndarray] | str:
    """A state that is not all plain numbers: the exact reason, or its vector."""
    archetype, state = row.archetype, row.state_vector
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
