"""`mltasks experience export DIR`: one ``<archetype>.npz`` of transitions per archetype.

Every array is a plain numeric, boolean or fixed-width string array, so that
``numpy.load(path, allow_pickle=False)`` reads it (docs/models.md, section Experience):

| key | shape, dtype | what |
| --- | --- | --- |
| state, next_state | [N, 64] float32 | the state and the same monster_id's next state |
| action | [N] int64 | the answer: 0-9, or 255 (the game used its traditional AI) |
| source | [N] str | model, rules, cache or bridge |
| model | [N] str | the types and versions that answered ('' when no model did) |
| confidence | [N] float32 | the answer's confidence |
| latency_ms | [N] float32 | answer written - request inserted |
| applied | [N] bool | False: the game timed out and acted on its own AI instead |
| reason | [N] str | why a 255 ('' otherwise) |
| monster_id, request_id | [N] int64 | as the game sent them |
| requested_at | [N] float64 | the request's time, seconds since the epoch |

Rows are in the order they were recorded (request time within a round). The states leave
PostgreSQL as the float32 bytes it stores, so what the trainer reads is what the model saw.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

from mltasks.errors import MLTasksError
from mltasks.files import write_atomic_with
from mltasks.sql import query

STATE_BYTES = 64 * 4
FETCH_ROWS = 10_000


def _rows(conn: psycopg.Connection[Any], archetype: str) -> Iterator[tuple[Any, ...]]:
    """One archetype's rows through a server-side cursor: memory holds the arrays only."""
    with conn.transaction(), conn.cursor(name=f"experience_export_{archetype}") as cur:
        cur.itersize = FETCH_ROWS
        cur.execute(query("experience_export"), {"archetype": archetype})
        yield from cur


def read_archetype(conn: psycopg.Connection[Any], archetype: str) -> dict[str, np.ndarray]:
    """The arrays of one archetype's file."""
    cols: dict[str, list[Any]] = {
        k: []
        for k in (
            "state", "next_state", "action", "source", "model", "reason", "confidence",
            "latency_ms", "applied", "monster_id", "request_id", "requested_at",
        )
    }  # fmt: skip
    names = list(cols)
    for row in _rows(conn, archetype):
        for name, value in zip(names, row, strict=True):
            cols[name].append(value)
    for name in ("state", "next_state"):
        if any(b is None or len(b) != STATE_BYTES for b in cols[name]):
            raise MLTasksError(f"ai_experience holds a {name} that is not 64 values ({archetype})")

    def states(name: str) -> np.ndarray:
        raw = b"".join(bytes(b) for b in cols[name])
        return np.frombuffer(raw, dtype=">f4").astype(np.float32).reshape(-1, 64)

    return {
        "state": states("state"),
        "action": np.asarray(cols["action"], dtype=np.int64),
        "next_state": states("next_state"),
        "source": np.asarray(cols["source"], dtype=np.str_),
        "model": np.asarray(cols["model"], dtype=np.str_),
        "confidence": np.asarray(cols["confidence"], dtype=np.float32),
        "latency_ms": np.asarray(cols["latency_ms"], dtype=np.float32),
        "applied": np.asarray(cols["applied"], dtype=np.bool_),
        "reason": np.asarray(cols["reason"], dtype=np.str_),
        "monster_id": np.asarray(cols["monster_id"], dtype=np.int64),
        "request_id": np.asarray(cols["request_id"], dtype=np.int64),
        "requested_at": np.asarray(cols["requested_at"], dtype=np.float64),
    }


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Compressed, through a temp file and a rename: a reader never sees half a file."""
    write_atomic_with(path, lambda fh: np.savez_compressed(fh, **arrays))  # type: ignore[arg-type]


def export(conn: psycopg.Connection[Any], directory: Path) -> dict[str, int]:
    """Write ``<directory>/<archetype>.npz`` for every archetype with transitions;
    returns rows written per archetype."""
    archetypes = [str(r[0]) for r in conn.execute(query("experience_archetypes"))]
    written: dict[str, int] = {}
    for archetype in archetypes:
        arrays = read_archetype(conn, archetype)
        write_npz(directory / f"{archetype}.npz", arrays)
        written[archetype] = len(arrays["action"])
    return written
