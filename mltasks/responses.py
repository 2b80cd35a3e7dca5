"""Writing answers into ai_responses: the only place the service writes the game's table."""

from __future__ import annotations

from collections.abc import Sequence

import psycopg

from mltasks.db import wrap_errors
from mltasks.inference import Answer
from mltasks.sql import query


def write_answers(conn: psycopg.Connection[tuple[object, ...]], answers: Sequence[Answer]) -> None:
    """All answers of a batch in one statement; a redelivered batch writes nothing twice."""
    if not answers:
        return
    ordered = sorted(answers, key=lambda a: a.request_id)  # one lock order: no deadlocks
    params = {
        "request_ids": [a.request_id for a in ordered],
        "action_ids": [a.action_id for a in ordered],
        "confidences": [a.confidence for a in ordered],
        "sources": [a.source for a in ordered],
        "models": [a.model for a in ordered],
        "reasons": [a.reason for a in ordered],
        "statuses": [a.status for a in ordered],
    }
    with wrap_errors("writing answers"):
        conn.execute(query("answer_batch"), params)


def expire(
    conn: psycopg.Connection[tuple[object, ...]], request_ids: Sequence[int], reason: str
) -> None:
    """Answer claimed rows 255 (traditional AI) with a reason, without a worker."""
    if not request_ids:
        return
    with wrap_errors("expiring requests"):
        conn.execute(query("expire_batch"), {"request_ids": sorted(request_ids), "reason": reason})
