"""The map server's side, as the C++ gateway does it (shared/CONTRACT.md section 1).

Statements are built as text exactly like the C++ formats them, and results are read
as the text libpq returns, parsed the way std::stoi / std::stof would (mltasks.game's, the
emulator the benchmarks and dev's load run). Here one decision at a time, with the hostile
rows (NULL states, any priority) the tests need, built by the same functions.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import psycopg

# The emulator's statements and parsers: the tests play the game as dev's load and the
# benchmarks do, in one place.
from mltasks import game
from mltasks.contract import TRADITIONAL_AI
from mltasks.game import stof as stof
from mltasks.game import stoi as stoi


def array_send(
    values: Sequence[float | None], dims: tuple[int, ...] | None = None, oid: int = 700
) -> bytes:
    """A real[] (oid 700; 701 is float8) in PostgreSQL's binary form, as array_send
    returns it: what the bridge claims and sends a worker for a row's state."""
    dims = dims or (len(values),)
    has_nulls = int(any(v is None for v in values))
    out = struct.pack(">3i", len(dims), has_nulls, oid)
    out += b"".join(struct.pack(">2i", d, 1) for d in dims)
    for v in values:
        out += struct.pack(">i", -1) if v is None else struct.pack(">if", 4, v)
    return out


def insert_sql(
    state: Sequence[float] | None,
    archetype: str = "aggressive",
    mob_id: int = 1002,
    monster_id: int = 1002,
    priority: int = 5,
) -> str:
    """The gateway's INSERT (mltasks.game's), any archetype, state (NULL too) or priority."""
    array, hp, sp = game.state_sql(state)
    return game.insert_sql(
        monster_id=monster_id,
        mob_id=mob_id,
        archetype=archetype,
        array=array,
        hp=hp,
        sp=sp,
        priority=priority,
    ).decode()


def _exec_text(conn: psycopg.Connection[Any], text: str) -> list[tuple[str | None, ...]]:
    res = conn.pgconn.exec_(text.encode())
    if res.status not in (1, 2):  # COMMAND_OK, TUPLES_OK
        raise psycopg.DatabaseError((res.error_message or b"").decode())
    return [
        tuple(
            None if res.get_value(r, c) is None else bytes(res.get_value(r, c) or b"").decode()
            for c in range(res.nfields)
        )
        for r in range(res.ntuples)
    ]


def insert(conn: psycopg.Connection[Any], state: Sequence[float] | None, **kw: Any) -> int:
    rows = _exec_text(conn, insert_sql(state, **kw))
    text = rows[0][0]
    assert text is not None
    rid = int(text)  # std::stoul, then uint32
    assert 0 < rid <= 2**31 - 1
    return rid


def poll(conn: psycopg.Connection[Any], request_id: int) -> tuple[int, float] | None:
    rows = _exec_text(conn, game.poll_sql(request_id).decode())
    if not rows:
        return None
    action, conf = rows[0]
    if action is None or conf is None:
        raise ValueError("NULL in a response: the map server would crash")
    return stoi(action), stof(conf)


def mark_timeout(conn: psycopg.Connection[Any], request_id: int) -> None:
    _exec_text(conn, game.give_up_sql(request_id).decode())


def decide(
    conn: psycopg.Connection[Any], state: Sequence[float] | None, timeout_ms: float, **kw: Any
) -> tuple[int, tuple[int, float] | None]:
    """One decision: insert, poll every 2 ms, give up and mark timeout after timeout_ms."""
    rid = insert(conn, state, **kw)
    deadline = time.monotonic() + timeout_ms / 1000
    while time.monotonic() < deadline:
        answer = poll(conn, rid)
        if answer is not None:
            return rid, answer
        time.sleep(0.002)
    mark_timeout(conn, rid)
    return rid, None


def answered_by_model(
    conn: psycopg.Connection[Any], state: Sequence[float], timeout_ms: float, **kw: Any
) -> bool:
    """One decision, answered with an action rather than 255: until a worker beats, the
    bridge rightly answers 255 itself, so this is how a test waits for the service."""
    _, answer = decide(conn, state, timeout_ms, **kw)
    return answer is not None and answer[0] != TRADITIONAL_AI


TOKEN = "test-claim"


class Answered(NamedTuple):
    """A request of a run, with every answer written for it (one each, if all went well)."""

    state: list[float]
    status: str
    closed: bool  # answered_at set
    sources: list[str]
    actions: list[int]
    models: list[str | None]


def answers_per_request(conninfo: str) -> list[Answered]:
    """Each answered request of the database with all its answers, for a run's checks."""
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute(
            "SELECT r.state_vector, r.status, r.answered_at IS NOT NULL, array_agg(s.source),"
            " array_agg(s.action_id), array_agg(s.model)"
            " FROM ai_requests AS r JOIN ai_responses AS s USING (request_id)"
            " GROUP BY r.request_id"
        ).fetchall()
    return [Answered(*r) for r in rows]


def claim(conn: psycopg.Connection[Any], *request_ids: int, token: str = TOKEN) -> None:
    """Claim rows as a bridge does (status, claimed_at, claim token), for tests that send
    a batch to a worker by hand."""
    conn.execute(
        "UPDATE ai_requests SET status = 'processing', claimed_at = clock_timestamp(),"
        " attempts = attempts + 1, claim_token = %s WHERE request_id = ANY(%s)",
        (token, list(request_ids)),
    )
