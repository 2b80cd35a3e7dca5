"""What a claim guarantees (issue 11, items 3-5): a state that is not 64 values never
leaves PostgreSQL, one malformed row never costs its batch the write, and only rows this
service claimed can be answered (a claim token), with no cache write for a refused answer.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import redis

from bridge.loop import Bridge
from mltasks.cache.codec import action_keys
from mltasks.config import Config
from mltasks.keys import GAME_ACTION_PREFIX, WORKING_MEMORY_PREFIX, heartbeat
from mltasks.serving.records import Row
from mltasks.serving.validation import validate_rows
from tests import game
from tests.conftest import app_with_broker
from tests.decode import as_text
from tests.game import TOKEN, claim

STATE = [0.8, 0.5] + [0.0] * 62


def response(pg: psycopg.Connection[Any], rid: int) -> tuple[Any, ...] | None:
    return pg.execute(
        "SELECT s.action_id, s.confidence, s.source, s.reason, r.status"
        " FROM ai_requests r LEFT JOIN ai_responses s USING (request_id)"
        " WHERE r.request_id = %s",
        (rid,),
    ).fetchone()


def insert_raw(pg: psycopg.Connection[Any], state_sql: str) -> int:
    row = pg.execute(
        "INSERT INTO ai_requests (monster_id, mob_id, archetype, state_vector, map_id,"
        " position_x, position_y, hp_ratio, sp_ratio, status, priority) VALUES"
        f" (1, 1002, 'tank', {state_sql}, 0, 0, 0, 0.5, 0.5, 'pending', 5)"
        " RETURNING request_id"
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_an_oversized_state_is_answered_invalid_by_the_claim_and_never_leaves_postgres(
    config: Config, pg: psycopg.Connection[Any]
) -> None:
    huge = insert_raw(pg, "array_fill(0.5::real, ARRAY[250000])")  # 1 MB of state
    square = insert_raw(pg, "array_fill(0.5::real, ARRAY[8, 8])")  # 64 values, not a vector
    good = game.insert(pg, STATE)
    b = Bridge(config, app_with_broker(config, "redis://127.0.0.1:1/0"))
    try:
        token, rows = b.claim()
    finally:
        b.close()
    by_id = {r[0]: r for r in rows}
    assert by_id[huge][3] is None and by_id[huge][7] == "state_length_250000"
    assert by_id[square][3] is None and by_id[square][7] == "state_length_8"
    good_state = by_id[good][3]  # the real[]'s bytes (array_send), decoded by the worker
    assert isinstance(good_state, bytes) and by_id[good][7] is None
    [checked] = validate_rows([Row(good, "tank", 1002, good_state)])
    assert not isinstance(checked, str) and checked[0] == "tank"
    assert checked[1].tolist() == np.asarray(STATE, dtype=np.float32).tolist()
    assert response(pg, huge) == (255, 0.0, "bridge", "state_length_250000", "invalid")
    assert response(pg, square) == (255, 0.0, "bridge", "state_length_8", "invalid")
    assert response(pg, good) == (None, None, None, None, "processing")
    assert len(token) >= 32
    assert pg.execute(
        "SELECT count(DISTINCT claim_token) FROM ai_requests WHERE claim_token = %s", (token,)
    ).fetchone() == (1,)


def test_one_malformed_row_never_costs_the_others_their_answer(
    config: Config, pg: psycopg.Connection[Any], models_dir: Path
) -> None:
    from mltasks.serving.batch import infer_batch

    a, b = game.insert(pg, STATE), game.insert(pg, STATE, archetype="mage")
    claim(pg, a, b)
    rows = [
        [2**40, "tank", 1002, STATE],  # beyond integer: no row can have it
        [a, "tank", 1002, STATE],
        ["12", "tank", 1002, STATE],  # not an integer
        "not a row",
        [-5, "tank", 1002, STATE],
        [b, "mage", 1002, STATE],
        [7],  # too short
    ]
    now = time.time()
    created = [now] * len(rows)
    assert infer_batch.apply(args=[rows, 3, now, created, TOKEN]).get() == 2
    for rid in (a, b):
        got = response(pg, rid)
        assert got is not None and 0 <= got[0] <= 9 and got[4] == "completed"


def test_answers_only_rows_claimed_with_the_token_and_caches_nothing_refused(
    config: Config, pg: psycopg.Connection[Any], redis_cache: redis.Redis, models_dir: Path
) -> None:
    from mltasks.serving.batch import infer_batch

    pending = game.insert(pg, STATE)  # nobody claimed it
    other = game.insert(pg, STATE, archetype="mage")
    claim(pg, other, token="another-claim")
    ghost = 999_999  # no such request
    redis_cache.set(heartbeat("gpu"), "1", px=60_000)  # a live GPU tier reads L1 states
    forged = [
        [pending, "tank", 1002, STATE, 1002],
        [other, "mage", 1002, STATE, 1003],
        [ghost, "tank", 4242, STATE, 4242],
    ]
    for token in (TOKEN, None, ""):
        infer_batch.apply(args=[forged, 3, time.time(), None, token]).get()
    assert response(pg, pending) == (None, None, None, None, "pending")
    assert response(pg, other) == (None, None, None, None, "processing")
    assert pg.execute("SELECT count(*) FROM ai_responses").fetchone() == (0,)
    written = redis_cache.keys("*")
    assert not [
        k for k in written if as_text(k).startswith((GAME_ACTION_PREFIX, WORKING_MEMORY_PREFIX))
    ], written

    # The same batch with the right token answers the row claimed with it, and caches it:
    # its state in L1, for the GPU tier to read; its L2 key is the game's to write
    # (caching.write_actions off).
    infer_batch.apply(args=[[forged[1]], 3, time.time(), None, "another-claim"]).get()
    got = response(pg, other)
    assert got is not None and got[0] != 255 and got[4] == "completed"
    assert redis_cache.llen(f"{WORKING_MEMORY_PREFIX}1003") == 1
    l2 = action_keys(np.array([STATE], dtype=np.float32), [1002])[0]
    assert redis_cache.get(l2) is None


def test_with_write_actions_a_worker_writes_the_games_l2_key(
    config: Config, pg: psycopg.Connection[Any], redis_cache: redis.Redis, models_dir: Path
) -> None:
    """caching.write_actions (a gateway that does not write its own cache): the answer is
    in L2 under the game's key and value, as the map server parses it."""
    import dataclasses

    from mltasks.cache.codec import parse_value
    from mltasks.config import set_config
    from mltasks.serving.batch import infer_batch

    set_config(
        dataclasses.replace(config, caching=dataclasses.replace(config.caching, write_actions=True))
    )
    rid = game.insert(pg, STATE, archetype="mage")
    claim(pg, rid)
    infer_batch.apply(args=[[[rid, "mage", 1002, STATE, 1003]], 3, time.time(), None, TOKEN]).get()
    got = response(pg, rid)
    assert got is not None and got[0] != 255
    l2 = action_keys(np.array([STATE], dtype=np.float32), [1002])[0]
    cached = parse_value(redis_cache.get(l2))
    assert cached is not None and cached[0] == got[0]


def test_an_oversized_broker_message_is_dropped_whole(
    config: Config, pg: psycopg.Connection[Any], models_dir: Path
) -> None:
    from mltasks.serving.batch import MAX_BATCH_ROWS, infer_batch

    rid = game.insert(pg, STATE)
    claim(pg, rid)
    rows = [[rid, "tank", 1002, STATE]] * (MAX_BATCH_ROWS + 1)
    t0 = time.monotonic()
    assert infer_batch.apply(args=[rows, 3, time.time(), None, TOKEN]).get() == 0
    assert time.monotonic() - t0 < 1.0
    assert response(pg, rid) == (None, None, None, None, "processing")
