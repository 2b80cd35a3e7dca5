"""The bridge's statements that touch many rows never wait for a row a worker holds.

A worker's answer_batch and the bridge's rescue (expire_batch) used to lock overlapping rows
in different orders: PostgreSQL found the deadlock only after its deadlock_timeout (1 s),
and under 8 emulated map servers that stalled the service every few seconds. Here a
transaction holds one row's lock, as a worker writing its answers does, and each of the
bridge's statements must finish at once, leaving that row to its holder.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from bridge.housekeeping import FULL_LOOKBACK_S, RELEASE_LIMIT
from mltasks.config import Config
from mltasks.serving.answers import expire
from mltasks.sql import query
from tests import game
from tests.game import claim

STATE = [0.5] * 64
NO_WAIT = "SET statement_timeout = '2s'"  # a statement that waits for the lock fails


@pytest.fixture
def holder(config: Config) -> Iterator[psycopg.Connection[Any]]:
    """A second session, in a transaction the test opens (a worker mid-write)."""
    with psycopg.connect(config.database.conninfo) as conn:
        yield conn
        conn.rollback()


def lock(holder: psycopg.Connection[Any], rid: int) -> None:
    holder.execute("SELECT 1 FROM ai_requests WHERE request_id = %s FOR UPDATE", (rid,))


def status(pg: psycopg.Connection[Any], rid: int) -> tuple[Any, ...] | None:
    return pg.execute(
        "SELECT r.status, s.reason FROM ai_requests r"
        " LEFT JOIN ai_responses s USING (request_id) WHERE r.request_id = %s",
        (rid,),
    ).fetchone()


def test_the_rescue_skips_a_row_a_worker_is_answering(
    pg: psycopg.Connection[Any], holder: psycopg.Connection[Any]
) -> None:
    free, held = game.insert(pg, STATE), game.insert(pg, STATE)
    claim(pg, free, held)
    lock(holder, held)
    pg.execute(NO_WAIT)
    assert expire(pg, [held, free], "lost") == 1
    assert status(pg, free) == ("expired", "lost")
    assert status(pg, held) == ("processing", None)


def test_release_stale_skips_a_locked_row(
    pg: psycopg.Connection[Any], holder: psycopg.Connection[Any]
) -> None:
    free, held = game.insert(pg, STATE), game.insert(pg, STATE)
    claim(pg, free, held)
    lock(holder, held)
    pg.execute(NO_WAIT)
    full = {"lease_s": 0, "since_s": FULL_LOOKBACK_S, "limit": RELEASE_LIMIT}
    pg.execute(query("release_stale"), full)
    assert status(pg, free) == ("pending", None)
    assert status(pg, held) == ("processing", None)


def test_answer_game_timeouts_skips_a_locked_row(
    pg: psycopg.Connection[Any], holder: psycopg.Connection[Any]
) -> None:
    free, held = game.insert(pg, STATE), game.insert(pg, STATE)
    pg.execute(
        "UPDATE ai_requests SET status = 'timeout' WHERE request_id = ANY(%s)", ([free, held],)
    )
    lock(holder, held)
    pg.execute(NO_WAIT)
    pg.execute(query("answer_game_timeouts"), {"lease_s": 0})
    assert status(pg, free) == ("timeout", "game_timeout")
    assert status(pg, held) == ("timeout", None)
    holder.rollback()
    pg.execute(query("answer_game_timeouts"), {"lease_s": 0})  # the next round takes it
    assert status(pg, held) == ("timeout", "game_timeout")
