"""The schema: the game's exact statements, id wrap-around, constraints, idempotent init."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from mltasks.config import Config
from mltasks.db import init_schema
from tests import game

STATE = [0.8, 0.5] + [0.0] * 62


def test_init_is_idempotent(config: Config, pg: psycopg.Connection[Any]) -> None:
    rid = game.insert(pg, STATE)
    init_schema(config.database)
    init_schema(config.database)
    assert pg.execute("SELECT count(*) FROM ai_requests").fetchone() == (1,)
    assert pg.execute("SELECT request_id FROM ai_requests").fetchone() == (rid,)


def test_the_game_statements_work_unchanged(pg: psycopg.Connection[Any]) -> None:
    rid = game.insert(pg, STATE)
    assert game.poll(pg, rid) is None
    game.mark_timeout(pg, rid)
    row = pg.execute(
        "SELECT status, priority, archetype, array_length(state_vector, 1), hp_ratio "
        "FROM ai_requests WHERE request_id = %s",
        (rid,),
    ).fetchone()
    assert row == ("timeout", 5, "aggressive", 64, pytest.approx(0.8))


def test_analyze_of_the_queue_is_small(pg: psycopg.Connection[Any]) -> None:
    """The queue's ANALYZE skips the states (their element statistics cost it most of its
    time, and no plan reads them), samples 3,000 rows for every other column of the queue
    and of its answers (none left at the default target, a column added later included),
    and still gathers what the claim's plans use."""

    def targets(table: str) -> dict[str, int]:
        return dict(
            pg.execute(
                "SELECT attname, coalesce(attstattarget, -1) FROM pg_attribute "
                "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
                (table,),
            ).fetchall()
        )

    queue, answers = targets("ai_requests"), targets("ai_responses")
    assert queue.pop("state_vector") == 0
    for table in (queue, answers):
        assert table and all(0 < t <= 10 for t in table.values()), table
    for i in range(50):
        game.insert(pg, [i / 50] + [0.5] * 63, archetype="tank" if i % 2 else "mage")
    pg.execute("ANALYZE ai_requests")
    columns = {
        r[0]
        for r in pg.execute(
            "SELECT attname FROM pg_stats WHERE schemaname = current_schema() "
            "AND tablename = 'ai_requests'"
        )
    }
    assert "state_vector" not in columns
    assert {"status", "created_at", "archetype"} <= columns


def test_created_at_uses_the_clock_not_the_transaction(pg: psycopg.Connection[Any]) -> None:
    with pg.transaction():
        a = game.insert(pg, STATE)
        pg.execute("SELECT pg_sleep(0.01)")
        b = game.insert(pg, STATE)
    ta, tb = (
        r[0]
        for r in pg.execute(
            "SELECT created_at FROM ai_requests WHERE request_id = ANY(%s) ORDER BY request_id",
            ([a, b],),
        )
    )
    assert tb > ta


def test_one_response_per_request_and_only_parseable_values(pg: psycopg.Connection[Any]) -> None:
    rid = game.insert(pg, STATE)
    ins = (
        "INSERT INTO ai_responses (request_id, action_id, confidence, source) "
        "VALUES (%s, %s, %s, 'model')"
    )
    pg.execute(ins, (rid, 1, 0.5))
    with pytest.raises(psycopg.errors.UniqueViolation):
        pg.execute(ins, (rid, 2, 0.5))
    rid2 = game.insert(pg, STATE)
    for action, conf in [(None, 0.5), (1, None), (10, 0.5), (-1, 0.5), (1, 1.5), (1, float("nan"))]:
        with pytest.raises((psycopg.errors.NotNullViolation, psycopg.errors.CheckViolation)):
            pg.execute(ins, (rid2, action, conf))


def test_status_is_checked(pg: psycopg.Connection[Any]) -> None:
    rid = game.insert(pg, STATE)
    with pytest.raises(psycopg.errors.CheckViolation):
        pg.execute("UPDATE ai_requests SET status = 'bogus' WHERE request_id = %s", (rid,))


def test_insert_notifies_only_while_a_bridge_sleeps(
    config: Config, pg: psycopg.Connection[Any]
) -> None:
    from mltasks.sql import query

    with psycopg.connect(config.database.conninfo, autocommit=True) as listener:
        listener.execute("LISTEN ai_requests")
        game.insert(pg, STATE)  # nobody sleeps: no NOTIFY, no serialised commit
        assert list(listener.notifies(timeout=0.5, stop_after=1)) == []
        listener.execute(query("bridge_sleeps"))
        listener.execute(query("bridge_settles"))
        game.insert(pg, STATE)
        got = list(listener.notifies(timeout=5, stop_after=1))
        assert [n.channel for n in got] == ["ai_requests"]
        listener.execute(query("bridge_wakes"))
        game.insert(pg, STATE)
        assert list(listener.notifies(timeout=0.5, stop_after=1)) == []
        listener.execute(query("bridge_sleeps"))
    # The listener is gone: its record goes with the housekeeping once its backend exited.
    from tests.conftest import wait_for

    def forgotten() -> bool:
        pg.execute(query("forget_gone_bridges"))
        return pg.execute("SELECT count(*) FROM ai_bridges_waiting").fetchone() == (0,)

    wait_for(forgotten, 10, "the gone bridge's record to be dropped")


def test_a_claim_takes_its_bridge_off_the_sleepers_record(
    config: Config, pg: psycopg.Connection[Any]
) -> None:
    """A woken bridge needs no statement of its own to stop the inserts notifying: its next
    claim (claim_batch) drops its record; another bridge's record stays."""
    from mltasks.sql import query

    def on_record(conn: psycopg.Connection[Any]) -> bool:
        row = pg.execute(
            "SELECT count(*) FROM ai_bridges_waiting WHERE pid = %s", (conn.info.backend_pid,)
        ).fetchone()
        return row == (1,)

    params = {"limit": 8, "deadline_s": 0.015, "token": "t"}
    with (
        psycopg.connect(config.database.conninfo, autocommit=True) as bridge,
        psycopg.connect(config.database.conninfo, autocommit=True) as other,
    ):
        bridge.execute(query("bridge_sleeps"))
        other.execute(query("bridge_sleeps"))
        assert on_record(bridge) and on_record(other)
        rid = game.insert(pg, STATE)
        claimed = bridge.execute(query("claim_batch"), params).fetchall()
        assert [r[0] for r in claimed] == [rid]
        assert not on_record(bridge) and on_record(other)
        bridge.execute(query("claim_batch"), params)  # off already: nothing to drop
        assert not on_record(bridge)
        other.execute(query("bridge_wakes"))


def test_a_bridge_going_to_sleep_waits_for_inserts_that_looked_before_it(
    config: Config, pg: psycopg.Connection[Any]
) -> None:
    """An INSERT that found nobody asleep holds the notify lock shared until it commits;
    the bridge's settle step waits for it, so its last look sees the row."""
    import threading

    from mltasks.sql import query

    pg.execute("BEGIN")
    pg.execute(game.insert_sql(STATE).removesuffix(" RETURNING request_id"))  # not committed
    done = threading.Event()
    with psycopg.connect(config.database.conninfo, autocommit=True) as bridge:
        bridge.execute(query("bridge_sleeps"))

        def settle() -> None:
            bridge.execute(query("bridge_settles"))
            done.set()

        t = threading.Thread(target=settle)
        t.start()
        assert not done.wait(0.3)  # waits for the open insert
        pg.execute("COMMIT")
        assert done.wait(5)
        t.join(5)
        assert bridge.execute(query("has_pending")).fetchone() == (True,)


def test_request_id_wraps_around_inside_integer_range(pg: psycopg.Connection[Any]) -> None:
    # An ancient request 1 with its answer still in the table when the ids come round.
    pg.execute(
        "INSERT INTO ai_requests (request_id, archetype, state_vector, status) "
        "VALUES (1, 'tank', NULL, 'completed')"
    )
    pg.execute(
        "INSERT INTO ai_responses (request_id, action_id, confidence, source) "
        "VALUES (1, 7, 0.9, 'model')"
    )
    pg.execute("SELECT setval('ai_requests_request_id_seq', 2147483646)")
    ids = [game.insert(pg, STATE) for _ in range(3)]
    assert ids == [2147483647, 1, 2]
    # The new request 1 is the game's fresh one, and no stale answer can be read for it.
    assert game.poll(pg, 1) is None
    row = pg.execute("SELECT archetype, status FROM ai_requests WHERE request_id = 1").fetchone()
    assert row == ("aggressive", "pending")
    assert pg.execute(
        "SELECT data_type FROM information_schema.columns "
        "WHERE table_name = 'ai_requests' AND column_name = 'request_id'"
    ).fetchone() == ("integer",)


def test_cleanup_removes_finished_rows_with_their_answers(pg: psycopg.Connection[Any]) -> None:
    from mltasks.sql import query

    done = game.insert(pg, STATE)
    live = game.insert(pg, STATE)
    pg.execute(
        "UPDATE ai_requests SET status = 'completed', "
        "created_at = created_at - interval '1 hour' WHERE request_id = %s",
        (done,),
    )
    pg.execute(
        "INSERT INTO ai_responses (request_id, action_id, confidence, source) "
        "VALUES (%s, 1, 0.5, 'model')",
        (done,),
    )
    cur = pg.execute(query("delete_finished"), {"retention_s": 60, "limit": 100})
    assert cur.rowcount == 1
    left = [r[0] for r in pg.execute("SELECT request_id FROM ai_requests")]
    assert left == [live]
    assert pg.execute("SELECT count(*) FROM ai_responses").fetchone() == (0,)
