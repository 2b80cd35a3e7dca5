"""Writing answers into ai_responses: the only place the service writes the game's table."""

from __future__ import annotations

from collections.abc import Sequence

import psycopg

from mltasks.db import wrap_errors
from mltasks.serving.records import Answer
from mltasks.sql import query

# request_id is a PostgreSQL integer: an id outside it can name no row.
ID_MIN, ID_MAX = 1, 2**31 - 1


def valid_request_id(value: object) -> bool:
    """An id a row of ai_requests can have (a hostile message may carry anything)."""
    return type(value) is int and ID_MIN <= value <= ID_MAX


def write_answers(
    conn: psycopg.Connection[tuple[object, ...]],
    answers: Sequence[Answer],
    token: str | None = None,
) -> set[int]:
    """All answers of a batch in one statement; returns the request ids it answered.

    Only rows claimed with ``token`` are answered (sql/queries.sql answer_batch): a row
    nobody claimed, claimed again since, or answered already is left alone, and is not
    in the result. A redelivered batch writes nothing twice. An answer whose id cannot
    be a row's is dropped here, so that it never costs the others their write.
    """
    ordered = sorted(
        (a for a in answers if valid_request_id(a.request_id)), key=lambda a: a.request_id
    )  # one lock order: no deadlocks
    if not ordered or not token:
        return set()
    params = {
        "request_ids": [a.request_id for a in ordered],
        "action_ids": [a.action_id for a in ordered],
        "confidences": [a.confidence for a in ordered],
        "sources": [a.source for a in ordered],
        "models": [a.model for a in ordered],
        "reasons": [a.reason for a in ordered],
        "statuses": [a.status for a in ordered],
        "token": token,
    }
    with wrap_errors("writing answers"):
        cur = conn.execute(query("answer_batch"), params)
        return {int(r[0]) for r in cur.fetchall()}  # type: ignore[call-overload]


def expire(
    conn: psycopg.Connection[tuple[object, ...]], request_ids: Sequence[int], reason: str
) -> int:
    """Answer claimed rows 255 (traditional AI) with a reason, without a worker; only rows
    still unanswered (processing) are touched. Returns how many were answered."""
    if not request_ids:
        return 0
    with wrap_errors("expiring requests"):
        cur = conn.execute(
            query("expire_batch"), {"request_ids": sorted(request_ids), "reason": reason}
        )
        return max(0, cur.rowcount)
