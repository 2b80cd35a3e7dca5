"""Plans that do not depend on the queue table's statistics.

The bench empties and ANALYZEs the tables before each run, as a fresh install or a cleaned
table has them; the service then makes its plans while the table is nearly empty, and keeps
them (psycopg prepares a statement after 5 runs, PostgreSQL then settles on one generic
plan; PL/pgSQL keeps its trigger's). Each of those plans must still use an index once the
table holds many rows: a seq scan there grows with the table, per statement.
"""

from __future__ import annotations

import re
from typing import Any

import psycopg

from mltasks.config import Config
from mltasks.sql import query

# Each hot statement with its parameter types (in order of appearance) and sample values.
STATEMENTS: dict[str, tuple[dict[str, str], str]] = {
    "claim_batch": ({"limit": "int", "token": "text", "deadline_s": "float8"}, "64, 'x', 0.015"),
    "answer_batch": (
        {
            "request_ids": "int[]",
            "action_ids": "int[]",
            "confidences": "real[]",
            "sources": "text[]",
            "models": "text[]",
            "reasons": "text[]",
            "statuses": "text[]",
            "token": "text",
        },
        "'{1,2}', '{1,1}', '{0.5,0.5}', '{model,model}', '{m,m}', '{NULL,NULL}',"
        " '{completed,completed}', 'x'",
    ),
    "expire_batch": ({"request_ids": "int[]", "reason": "text"}, "'{1,2}', 'lost'"),
    "release_stale": (
        {"lease_s": "float8", "since_s": "float8", "limit": "int"},
        "1.0, 315360000, 1000",
    ),
    "answer_game_timeouts": ({"lease_s": "float8"}, "1.0"),
    "has_pending": ({}, ""),
    "queue_stats": ({}, ""),
    "delete_finished": ({"retention_s": "float8", "limit": "int"}, "60, 1000"),
}


def prepare(
    conn: psycopg.Connection[Any],
    name: str,
    spec: tuple[dict[str, str], str] | None = None,
) -> str:
    """PREPARE the named statement with positional parameters (its types and sample values:
    ``spec``, else its entry in STATEMENTS); returns its EXECUTE."""
    params, args = spec if spec is not None else STATEMENTS[name]
    text = query(name)
    for i, p in enumerate(params, 1):
        text = re.sub(rf"%\({p}\)[sb]", f"${i}", text)
    signature = f"({', '.join(params.values())})" if params else ""
    conn.execute(f"PREPARE {name}{signature} AS {text}")
    return f"EXECUTE {name}({args})" if args else f"EXECUTE {name}"


def fill(conn: psycopg.Connection[Any], rows: int) -> None:
    conn.execute(
        "INSERT INTO ai_requests (monster_id, archetype, state_vector, status, claimed_at,"
        " answered_at) SELECT g, 'aggressive', array_fill(0.5::real, ARRAY[64]), 'completed',"
        " now(), now() FROM generate_series(1, %s) AS g",
        (rows,),
    )


def analyzed_empty(config: Config) -> None:
    with psycopg.connect(config.database.conninfo, autocommit=True) as conn:
        conn.execute("TRUNCATE ai_responses, ai_requests")
        conn.execute("ANALYZE ai_requests")
        conn.execute("ANALYZE ai_responses")


def planned_empty_then_filled(config: Config, conn: psycopg.Connection[Any]) -> dict[str, str]:
    """Every hot statement prepared (generic plans forced) and run once on the empty,
    analyzed table, then the table filled with 20,000 rows: {name: its EXECUTE}."""
    analyzed_empty(config)
    conn.execute("SET plan_cache_mode = force_generic_plan")
    run = {name: prepare(conn, name) for name in STATEMENTS}
    for execute in run.values():
        conn.execute(execute)  # planned now, on the empty table
    fill(conn, 20_000)
    return run


def test_plans_made_on_an_empty_table_use_the_indexes_on_a_full_one(config: Config) -> None:
    """Every hot statement, planned (generic plans forced) on the empty, analyzed table
    through the service's own connection settings, reads no row by a seq scan once the
    table holds 20,000: an index bounds each one."""
    with psycopg.connect(config.database.conninfo, autocommit=True) as conn:
        run = planned_empty_then_filled(config, conn)
        seq = {}
        for name, execute in run.items():
            plan = "\n".join(str(r[0]) for r in conn.execute(f"EXPLAIN {execute}"))
            seq[name] = re.findall(r"Seq Scan on ai_requests\b.*", plan)
    assert not any(seq.values()), seq


def _wide(line: str) -> bool:
    """A plan node that read, dropped or looped 1,000 times or more (a BRIN bitmap's
    count of lossy pages aside)."""
    if "Bitmap Index Scan" in line:
        return False
    counts = re.findall(
        r"rows=(\d+) loops=(\d+)|Rows Removed by (?:Filter|Join Filter): (\d+)", line
    )
    return any(int(n) >= 1000 for match in counts for n in match if n)


def test_plans_made_on_an_empty_table_read_what_they_touch_not_the_table(config: Config) -> None:
    """No seq scan is not enough: a generic plan made on the empty, analyzed table joined
    the claimed rows back to ai_requests with the whole primary key as the outer side of a
    nested loop (claim, expiry, the lease sweep, the game-timeout sweep: every row of the
    table read per call), the answer write hashed the whole table to join its batch, and
    cleanup looped its BRIN scan once per row (17 million buffers on 20,000 rows). Run on a
    20,000-row table, no node of any hot statement reads, filters out or loops 1,000 times
    (a BRIN bitmap's lossy page count aside)."""
    with psycopg.connect(config.database.conninfo, autocommit=True) as conn:
        run = planned_empty_then_filled(config, conn)
        wide = {}
        for name, execute in run.items():
            plan = [str(r[0]) for r in conn.execute(f"EXPLAIN (ANALYZE, COSTS OFF) {execute}")]
            wide[name] = [line.strip() for line in plan if _wide(line)]
    assert not any(wide.values()), wide


def test_the_same_plans_without_the_services_settings_do_seq_scan(config: Config) -> None:
    """What the settings prevent (and what the test above would catch): a plain session's
    generic plans, made on the empty table, seq-scan the queue."""
    analyzed_empty(config)
    with psycopg.connect(config.database.conninfo, autocommit=True) as conn:
        conn.execute("SET enable_seqscan = on")
        conn.execute("SET plan_cache_mode = force_generic_plan")
        execute = prepare(conn, "claim_batch")
        conn.execute(execute)
        fill(conn, 20_000)
        plan = "\n".join(str(r[0]) for r in conn.execute(f"EXPLAIN {execute}"))
    assert "Seq Scan on ai_requests" in plan, plan


def test_the_games_inserts_free_a_reused_id_through_the_primary_key(config: Config) -> None:
    """The id-reuse trigger runs its DELETE for every insert of the game, with the plan
    PL/pgSQL kept from the first inserts into an empty table: that plan must be the
    primary key's, not a scan of the whole table per insert."""
    analyzed_empty(config)
    with psycopg.connect(config.database.conninfo, autocommit=True) as game:
        # The game's own session: none of the service's settings.
        game.execute("SET enable_seqscan = on")
        fill(game, 50)  # the trigger's plan is made (and kept) on a near-empty table
        fill(game, 5_000)
        game.execute("LOAD 'auto_explain'")
        game.execute("SET auto_explain.log_min_duration = 0")
        game.execute("SET auto_explain.log_nested_statements = on")
        game.execute("SET auto_explain.log_level = notice")
        notes: list[str] = []
        game.add_notice_handler(lambda d: notes.append(d.message_primary or ""))
        fill(game, 1)
    deletes = [n for n in notes if "DELETE FROM ai_requests" in n]
    assert deletes, notes
    assert all("Index Scan using ai_requests_pkey" in n for n in deletes), deletes
    assert not any("Seq Scan" in n for n in deletes), deletes


def _buffers(plan_rows: list[tuple[Any, ...]]) -> int:
    """Shared buffers (hit + read) of an EXPLAIN (ANALYZE, BUFFERS), every node."""
    text = "\n".join(str(r[0]) for r in plan_rows)
    return sum(int(n) for n in re.findall(r"(?:hit|read)=(\d+)", text))


def test_the_lease_sweep_steps_over_the_rows_that_left_processing(config: Config) -> None:
    """Every claimed row leaves an entry in the processing index when it is answered,
    dead until a vacuum (autovacuum may be off, or behind). The bridge sweeps for expired
    leases four times a second: its plan must mark those entries dead as it passes (an
    index scan) and skip them after, not read them all again each time (a bitmap scan:
    450,000 a sweep after five minutes at 1,500/s)."""
    analyzed_empty(config)
    with psycopg.connect(config.database.conninfo, autocommit=True) as conn:
        conn.execute("ALTER TABLE ai_requests SET (autovacuum_enabled = false)")
        conn.execute("SET plan_cache_mode = force_generic_plan")
        execute = prepare(conn, "release_stale")
        conn.execute(execute)  # planned on the empty table
        conn.execute(
            "INSERT INTO ai_requests (monster_id, archetype, state_vector, status, claimed_at)"
            " SELECT g, 'aggressive', array_fill(0.5::real, ARRAY[64]), 'processing',"
            " now() - interval '1 hour' FROM generate_series(1, 20000) AS g"
        )
        conn.execute("UPDATE ai_requests SET status = 'completed', answered_at = now()")
        first = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS) {execute}").fetchall()
        again = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS) {execute}").fetchall()
    plan = "\n".join(str(r[0]) for r in first)
    assert "Index Scan using ai_requests_processing_idx" in plan, plan
    assert "Bitmap" not in plan, plan
    assert _buffers(again) * 5 < _buffers(first), (_buffers(first), _buffers(again))


def test_the_experience_round_planned_on_empty_tables_reads_its_window(config: Config) -> None:
    """The recorder's round (sql/experience.sql experience_record), planned on the empty
    tables and run on 20,000 answered requests for a window of 2,000: by the window and
    by key. The plan it had joined both whole primary keys row by row: 2.9 s and 243,389
    buffers for that round."""
    from mltasks.contract import ARCHETYPES

    analyzed_empty(config)
    params = {"lo": "timestamptz", "hi": "timestamptz", "archetypes": "text[]"}
    params["pair_wait_s"] = "float8"
    window = "now() - interval '10 s', now() - interval '8 s'"
    args = f"{window}, ARRAY{list(ARCHETYPES)!r}::text[], 60"
    with psycopg.connect(config.database.conninfo, autocommit=True) as conn:
        conn.execute("SET plan_cache_mode = force_generic_plan")
        execute = prepare(conn, "experience_record", (params, args))
        conn.execute(execute)  # planned now, on the empty tables
        conn.execute(
            "INSERT INTO ai_requests (monster_id, archetype, state_vector, status, claimed_at,"
            " answered_at, created_at) SELECT g, 'aggressive', array_fill(0.5::real, ARRAY[64]),"
            " 'completed', now(), now(), now() - interval '20 s' + g * interval '1 ms'"
            " FROM generate_series(1, 20000) AS g"
        )
        conn.execute(
            "INSERT INTO ai_responses (request_id, action_id, confidence, source)"
            " SELECT request_id, 1, 0.5, 'model' FROM ai_requests"
        )
        plan = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS) {execute}").fetchall()
    text_plan = "\n".join(str(r[0]) for r in plan)
    assert "rows=2000" in text_plan, text_plan  # the window's requests, each recorded
    assert _buffers(plan[:2]) < 100_000, text_plan


def test_a_bounded_lease_sweep_reads_only_its_window(config: Config) -> None:
    """The sweep's rounds between two full ones look back only to where the last round
    ended (bridge/housekeeping.py): the dead entries of every row answered before that are not
    stepped over again (3.6 ms a round for 66,000 of them, on the claim loop, held the
    rows that arrived meanwhile past the p99 at 10,000 decisions/s)."""
    analyzed_empty(config)
    params, _ = STATEMENTS["release_stale"]
    with psycopg.connect(config.database.conninfo, autocommit=True) as conn:
        conn.execute("ALTER TABLE ai_requests SET (autovacuum_enabled = false)")
        conn.execute("SET plan_cache_mode = force_generic_plan")
        bounded = prepare(conn, "release_stale", (params, "1.0, 2.0, 1000"))
        conn.execute(bounded)  # planned on the empty table
        conn.execute(
            "INSERT INTO ai_requests (monster_id, archetype, state_vector, status, claimed_at)"
            " SELECT g, 'aggressive', array_fill(0.5::real, ARRAY[64]), 'processing',"
            " now() - interval '1 hour' FROM generate_series(1, 20000) AS g"
        )
        conn.execute("UPDATE ai_requests SET status = 'completed', answered_at = now()")
        conn.execute(
            "INSERT INTO ai_requests (monster_id, archetype, state_vector, status, claimed_at)"
            " VALUES (1, 'aggressive', array_fill(0.5::real, ARRAY[64]), 'processing',"
            " now() - interval '1.5 s')"
        )
        plan = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS) {bounded}").fetchall()
    text = "\n".join(str(r[0]) for r in plan)
    assert "rows=1 " in text, text  # the one lease that ran out inside the window
    assert _buffers(plan) < 50, text
