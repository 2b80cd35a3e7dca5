"""One side answers a late batch: the worker that started it, or the bridge's rescue.

The rescue (255 `lost` at 80% of the deadline) used to race the worker answering the same
batch: both paid for the rows, and the worker's answers were refused. Now whichever takes
the batch's claim token first (mltasks/serving/owner.py) answers it, and the other leaves it.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
import redis

from bridge.loop import Bridge
from mltasks.config import Config
from mltasks.fallback.levels import cache_client
from mltasks.serving import owner
from mltasks.serving.records import as_row
from tests import game
from tests.conftest import app_with_broker
from tests.game import TOKEN, claim

STATE = [0.8, 0.5] + [0.0] * 62


def answered(pg: psycopg.Connection[Any]) -> dict[int, tuple[Any, ...]]:
    rows = pg.execute("SELECT request_id, source, reason FROM ai_responses").fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


def test_the_first_to_take_a_batch_owns_it(config: Config) -> None:
    r = cache_client(config)
    assert owner.take(r, "t1", owner.WORKER)
    assert not owner.take(r, "t1", owner.BRIDGE)
    assert owner.take_all(r, ["t1", "t2", "t3"], owner.BRIDGE) == [False, True, True]
    assert not owner.take(r, "t2", owner.WORKER)
    assert 0 < int(r.ttl("mltasks:batch:t1")) <= 30


def test_without_redis_both_sides_go_on() -> None:
    """Redis away: each side works as before (PostgreSQL keeps one answer per row)."""
    gone = redis.Redis(port=1, socket_connect_timeout=0.2)
    assert owner.take_all(gone, ["a", "b"], owner.BRIDGE) == [True, True]


def test_a_batch_the_bridge_took_is_not_inferred(
    config: Config, pg: psycopg.Connection[Any], worker: Any
) -> None:
    from mltasks.serving.tasks import infer_batch

    rid = game.insert(pg, STATE)
    claim(pg, rid)
    assert owner.take(cache_client(config), TOKEN, owner.BRIDGE)
    now = time.time()
    rows = [[rid, "aggressive", 1002, STATE, 1002]]
    assert infer_batch.apply(args=[rows, 3, now, [now], TOKEN]).get() == 0
    assert answered(pg) == {}  # the bridge's expire answers it, not the worker


def test_the_rescue_leaves_a_started_batch_to_its_worker(
    config: Config, pg: psycopg.Connection[Any]
) -> None:
    """Two batches past their rescue point: the one a worker has taken is left to it, the
    one nobody took (lost on the way) is answered 255 `lost`."""
    # A broker db nothing consumes: the batches stay where the bridge put them.
    app = app_with_broker(config, config.redis.db_url(14), "owner-test")
    b = Bridge(config, app)
    b.level = 3  # no worker heartbeats here: route to the cpu queue regardless
    try:
        started, lost = game.insert(pg, STATE), game.insert(pg, STATE)
        late = time.time() - 60.0  # a minute ago: due for the rescue at once
        for rid in (started, lost):
            token = f"claim-{rid}"
            claim(pg, rid, token=token)
            b.dispatch([as_row([rid, "aggressive", 1002, STATE, 1002])], [late], token)
        assert owner.take(cache_client(config), f"claim-{started}", owner.WORKER)
        assert b.rescue() == 1
        assert answered(pg) == {lost: ("bridge", "lost")}
        assert b.left_to_workers == 1
        status = pg.execute(
            "SELECT status FROM ai_requests WHERE request_id = %s", (started,)
        ).fetchone()
        assert status == ("processing",)
    finally:
        b.close()
