"""The bridge's rescue answers only batches no worker has taken.

It used to answer 255 (`lost`) every row still unanswered at 80% of its deadline, while the
worker that had the batch in hand went on inferring and writing the same rows: both paid,
and the worker's answers were refused. Now a due batch is taken back off its queue first
(one LREM per batch; none for a batch a blocked worker took at its push); only a batch still
waiting there is rescued.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
import redis

from bridge.loop import Bridge
from bridge.publish import Publisher
from mltasks.config import Config
from mltasks.serving.records import as_row
from tests import game
from tests.conftest import app_with_broker
from tests.game import claim

STATE = [0.8, 0.5] + [0.0] * 62
QUEUE = "cpu"


def answered(pg: psycopg.Connection[Any]) -> dict[int, tuple[Any, ...]]:
    rows = pg.execute("SELECT request_id, source, reason FROM ai_responses").fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


def test_the_rescue_leaves_a_batch_a_worker_took_and_answers_one_still_waiting(
    config: Config, pg: psycopg.Connection[Any]
) -> None:
    """Two batches past their rescue point: the one a worker has taken off the queue is
    left to it, the one still waiting is taken back and answered 255 `lost`."""
    broker_url = config.redis.db_url(14)  # nothing consumes there: we play the worker
    b = Bridge(config, app_with_broker(config, broker_url, "rescue-test"))
    b.level = 3  # no worker heartbeats here: route to the cpu queue regardless
    try:
        taken, waiting = game.insert(pg, STATE), game.insert(pg, STATE)
        late = time.time() - 60.0  # a minute old: due for the rescue at once
        for rid in (taken, waiting):
            claim(pg, rid, token=f"claim-{rid}")
            b.dispatch([as_row([rid, "aggressive", 1002, STATE, 1002])], [late], f"claim-{rid}")
        broker = redis.Redis.from_url(broker_url)
        assert broker.llen(QUEUE) == 2
        assert broker.rpop(QUEUE) is not None  # a worker's BRPOP takes the first batch
        assert b.rescue() == 1
        assert answered(pg) == {waiting: ("bridge", "lost")}
        assert b.left_to_workers == 1
        assert broker.llen(QUEUE) == 0  # no worker will see the rescued batch
        status = pg.execute(
            "SELECT status FROM ai_requests WHERE request_id = %s", (taken,)
        ).fetchone()
        assert status == ("processing",)  # its worker answers it (or the lease, if it dies)
    finally:
        b.close()


def test_withdraw_takes_back_only_what_is_still_queued(config: Config) -> None:
    broker = redis.Redis.from_url(config.redis.db_url(14))
    p = Publisher(app_with_broker(config, config.redis.db_url(14), "withdraw-test"), broker)
    p.publish(QUEUE, [[], 3, 0.0, []], 0)
    first = p.last_message
    p.publish(QUEUE, [[], 3, 0.0, []], 0)
    second = p.last_message
    assert first != second  # each message is its own (task id, delivery tag)
    assert broker.rpop(QUEUE) == first  # the oldest goes to a worker first
    assert p.withdraw([(QUEUE, first), (QUEUE, second)]) == [False, True]
    assert broker.llen(QUEUE) == 0


def test_without_redis_every_due_batch_is_answered_here(config: Config) -> None:
    """Redis away: the rows are answered by the bridge (one answer a row still holds)."""
    gone = redis.Redis(port=1, socket_connect_timeout=0.2)
    p = Publisher(app_with_broker(config, "redis://127.0.0.1:1/0", "gone"), gone)
    assert p.withdraw([(QUEUE, b"a"), (QUEUE, b"b")]) == [True, True]


def test_a_batch_a_waiting_worker_took_at_once_is_not_watched(
    config: Config, pg: psycopg.Connection[Any]
) -> None:
    """The push found a worker blocked in BRPOP (the queue empty right after it): the
    batch is that worker's, so no rescue entry and no LREM later."""
    import threading

    broker_url = config.redis.db_url(14)
    b = Bridge(config, app_with_broker(config, broker_url, "rescue-taken"))
    b.level = 3
    broker = redis.Redis.from_url(broker_url)
    popped: list[Any] = []
    worker = threading.Thread(target=lambda: popped.append(broker.brpop([QUEUE], timeout=10)))
    try:
        worker.start()
        deadline = time.monotonic() + 5
        while not any(c.get("cmd") == "brpop" for c in broker.client_list()):
            assert time.monotonic() < deadline, "the stand-in worker never blocked"
            time.sleep(0.01)
        rid = game.insert(pg, STATE)
        claim(pg, rid, token="claim-taken")
        b.dispatch([as_row([rid, "aggressive", 1002, STATE, 1002])], [time.time()], "claim-taken")
        worker.join(5)
        assert popped and popped[0] is not None and popped[0][1] == b.publisher.last_message
        assert len(b._in_flight) == 0  # nothing for the rescue to take back
        assert b.sent == 1 and b.rescue() == 0 and answered(pg) == {}
    finally:
        b.close()
        broker.close()
