"""The bridge's own publish path: Celery's message, one LPUSH, congestion from its reply."""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis
from celery import Celery
from kombu.serialization import loads

from bridge.congestion import CONGESTION_RECHECK_S
from bridge.loop import Bridge
from bridge.publish import Publisher
from mltasks.broker.celery_app import INFER_TASK
from mltasks.config import Config, DatabaseConfig
from tests import game
from tests.conftest import app_with_broker
from tests.waiting import wait_until

STATE = [0.8, 0.5] + [0.0] * 62
QUEUE = "cpu"


@pytest.fixture
def quiet_broker(config: Config) -> Iterator[tuple[Celery, redis.Redis]]:
    db = 12
    app = app_with_broker(config, config.redis.db_url(db), "publish-test")
    client = redis.Redis.from_url(config.redis.db_url(db))
    client.flushdb()
    yield app, client
    client.flushdb()
    client.close()


def _envelope(raw: bytes) -> dict[str, Any]:
    msg: dict[str, Any] = json.loads(raw)
    # Ids and the origin differ between any two messages.
    for key in ("id", "root_id", "origin", "argsrepr"):
        msg["headers"].pop(key, None)
    for key in ("correlation_id", "reply_to", "delivery_tag", "argsrepr", "kwargsrepr"):
        msg["properties"].pop(key, None)
    return msg


def test_message_is_the_one_send_task_writes(
    quiet_broker: tuple[Celery, redis.Redis],
) -> None:
    app, client = quiet_broker
    args = [[[7, "tank", 3, STATE, 11]], 3, 1.5, [1.25]]
    app.send_task(INFER_TASK, args=args, queue=QUEUE)
    theirs = client.rpop(QUEUE)
    assert Publisher(app, client).publish(QUEUE, args, 1) == 1
    ours = client.rpop(QUEUE)
    assert isinstance(theirs, bytes) and isinstance(ours, bytes)
    assert _envelope(ours) == _envelope(theirs)
    body = json.loads(ours)
    payload = loads(  # type: ignore[no-untyped-call]  # kombu ships no annotations
        base64.b64decode(body["body"]),
        body["content-type"],
        body["content-encoding"],
        accept={"application/x-msgpack"},
    )
    assert payload[0] == args and payload[1] == {}
    assert body["headers"]["argsrepr"] == "(batch of 1)"  # not the rows: Flower shows this


def test_publish_answers_with_the_batches_waiting(
    quiet_broker: tuple[Celery, redis.Redis],
) -> None:
    app, client = quiet_broker
    p = Publisher(app, client)
    assert [p.publish(QUEUE, [[], 3, 0.0, []], 0) for _ in range(3)] == [1, 2, 3]


def test_a_batch_taken_by_an_idle_worker_is_not_counted_as_waiting(
    config: Config, quiet_broker: tuple[Celery, redis.Redis]
) -> None:
    """Redis hands a push to a blocked BRPOP before the LLEN of the same pipeline runs."""
    import threading

    app, client = quiet_broker
    taken: list[Any] = []
    consumer = redis.Redis.from_url(config.redis.db_url(12), client_name="mltasks-test-brpop")
    t = threading.Thread(target=lambda: taken.append(consumer.brpop([QUEUE], timeout=5)))
    t.start()

    def blocked() -> bool:
        return any(
            c.get("name") == "mltasks-test-brpop" and c.get("cmd") == "brpop"
            for c in client.client_list()
        )

    try:
        wait_until(blocked, 5, 'the consumer (the "worker") to wait in BRPOP')
        assert Publisher(app, client).publish(QUEUE, [[], 3, 0.0, []], 0) == 0
    finally:
        t.join(5)
        consumer.close()
    assert taken and taken[0] is not None


class Clock:
    """The `time` module of bridge.loop and bridge.congestion, with a monotonic clock that
    moves only when the test moves it: the congestion intervals are asserted as behaviour,
    whatever this host's scheduling does to a few milliseconds."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    from bridge import congestion, loop

    c = Clock()
    monkeypatch.setattr(loop, "time", c)
    monkeypatch.setattr(congestion, "time", c)
    return c


def _congestion_bridge(config: Config, app: Celery, top_up: bool = False) -> Bridge:
    inference = dataclasses.replace(config.inference, top_up=top_up)
    b = Bridge(dataclasses.replace(config, inference=inference), app)
    b.level = 3  # the cpu tier, whatever the heartbeats say: nothing consumes here
    b.refresh_level = lambda: None  # type: ignore[method-assign]
    return b


def test_congested_tier_gathers_rows_until_the_queue_has_room(
    config: Config,
    pg: psycopg.Connection[Any],
    quiet_broker: tuple[Celery, redis.Redis],
    clock: Clock,
) -> None:
    """max_waiting_batches 1, no top-up: a batch waiting for a worker holds the next rows
    back, and they leave together once a worker took it (the queue is looked at every few
    ms)."""
    app, client = quiet_broker
    b = _congestion_bridge(config, app)
    status = "SELECT status FROM ai_requests WHERE request_id = %s"
    try:
        game.insert(pg, STATE)
        assert b.drain() == 1 and b.congested()  # nobody took it: one batch waiting
        second = game.insert(pg, STATE)
        third = game.insert(pg, STATE)
        b.wait(0.0)
        assert b.drain() == 0  # the rows stay pending, gathering
        clock.advance(CONGESTION_RECHECK_S * 2)  # the interval itself is under test
        assert b.drain() == 0  # looked again: the batch still waits (a dead worker's queue
        assert client.llen(QUEUE) == 1  # is not flooded)
        assert pg.execute(status, (second,)).fetchone() == ("pending",)

        assert client.rpop(QUEUE) is not None  # a worker takes it
        assert b.drain() == 0  # within the interval (the clock stood still): not looked at yet
        clock.advance(CONGESTION_RECHECK_S * 2)
        assert b.drain() == 2  # both rows in one batch
        assert pg.execute(status, (second,)).fetchone() == ("processing",)
        assert pg.execute(status, (third,)).fetchone() == ("processing",)
        assert client.llen(QUEUE) == 1
    finally:
        b.close()


def _batch(raw: Any) -> tuple[list[int], list[float], str]:
    """A pushed message's request ids, created times and claim token."""
    assert isinstance(raw, bytes)  # a message is there
    msg = json.loads(raw)
    args = loads(  # type: ignore[no-untyped-call]  # kombu ships no annotations
        base64.b64decode(msg["body"]),
        msg["content-type"],
        msg["content-encoding"],
        accept={"application/x-msgpack"},
    )[0]
    return [r[0] for r in args[0]], args[3], args[4]


def test_rows_held_back_join_the_batch_waiting_in_the_queue(
    config: Config,
    pg: psycopg.Connection[Any],
    quiet_broker: tuple[Celery, redis.Redis],
    clock: Clock,
) -> None:
    """top_up: while the batch waits for a worker, rows that arrive are claimed under its
    token and sent with it, as one message in its place; its rescue time stays its own."""
    app, client = quiet_broker
    b = _congestion_bridge(config, app, top_up=True)
    status = "SELECT status, claim_token FROM ai_requests WHERE request_id = %s"
    try:
        first = game.insert(pg, STATE)
        assert b.drain() == 1 and b.congested()  # nobody took it: one batch waiting
        ids, created, token = _batch(client.lindex(QUEUE, 0))
        assert ids == [first]
        due = b._in_flight[-1][0]
        second, third = game.insert(pg, STATE), game.insert(pg, STATE)
        assert b.drain() == 2  # joined the waiting batch
        assert client.llen(QUEUE) == 1
        ids, joined, same = _batch(client.lindex(QUEUE, 0))
        assert ids == [first, second, third] and same == token
        assert joined[0] == created[0] and len(joined) == 3
        assert pg.execute(status, (third,)).fetchone() == ("processing", token)
        assert len(b._in_flight) == 1 and b._in_flight[0][0] == due
        assert b._in_flight[0][2] == client.lindex(QUEUE, 0)  # the rescue takes this one
        assert b.topped_up == 2 and b.sent == 3
        assert b.drain() == 0  # nothing pending: the batch is left as it is
        assert b.rescue() == 0

        assert client.rpop(QUEUE) is not None  # a worker takes it: nothing waits
        fourth = game.insert(pg, STATE)
        assert b.drain() == 1  # within the recheck interval: still taken for full
        ids, _, again = _batch(client.lindex(QUEUE, 0))
        assert ids == [fourth] and again == token  # the next batch, under the same token
        assert client.llen(QUEUE) == 1 and b.topped_up == 2 and len(b._in_flight) == 2
    finally:
        b.close()


def test_a_top_up_never_grows_a_batch_past_the_claim_limit(
    config: Config,
    pg: psycopg.Connection[Any],
    quiet_broker: tuple[Celery, redis.Redis],
    clock: Clock,
) -> None:
    app, client = quiet_broker
    inference = dataclasses.replace(config.inference, batch_size=32)
    b = _congestion_bridge(dataclasses.replace(config, inference=inference), app, top_up=True)
    try:
        for _ in range(30):
            game.insert(pg, STATE)
        assert b.drain() == 30 and b.congested()
        for _ in range(5):
            game.insert(pg, STATE)
        assert b.drain() == 2
        assert len(_batch(client.lindex(QUEUE, 0))[0]) == 32
        assert b.drain() == 0  # full: the other three wait for the next batch
        pending = "SELECT count(*) FROM ai_requests WHERE status = 'pending'"
        assert pg.execute(pending).fetchone() == (3,)
    finally:
        b.close()


def test_broker_channel_keeps_one_client(celery_app: Celery) -> None:
    """mltasks.broker.transport: kombu's channel makes its Redis client once, not per command."""
    with celery_app.connection_for_write() as conn:
        channel = conn.default_channel
        first = channel._create_client()
        assert channel._create_client() is first
        assert channel._create_client(asynchronous=True) is not first
        channel._pool = None  # kombu drops the pool after a connection error
        assert channel._create_client() is not first


def test_service_sessions_skip_the_wal_flush_wait() -> None:
    db = DatabaseConfig(url="postgresql://u@127.0.0.1/x?options=-c%20statement_timeout%3D5")
    assert "-c statement_timeout=5 -c synchronous_commit=off" in db.conninfo
    assert "synchronous_commit" not in DatabaseConfig(synchronous_commit=True).conninfo
    assert "synchronous_commit=off" in DatabaseConfig().conninfo


def test_answers_are_written_with_synchronous_commit_off(config: Config) -> None:
    with psycopg.connect(config.database.conninfo) as conn:
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("off",)


def test_a_route_change_drops_the_old_queues_congestion(
    config: Config, pg: psycopg.Connection[Any], quiet_broker: tuple[Celery, redis.Redis]
) -> None:
    """The cpu tier's full queue (its worker died) must not hold back the rules tier."""
    app, _ = quiet_broker
    b = _congestion_bridge(config, app)
    try:
        game.insert(pg, STATE)
        assert b.drain() == 1 and b.congested()
        b.level = 4  # the heartbeats moved the route to the rule tier
        assert not b.congested()
        game.insert(pg, STATE)
        assert b.drain() == 1
    finally:
        b.close()


def test_a_hold_back_never_outlasts_the_rows_deadline(
    config: Config,
    pg: psycopg.Connection[Any],
    quiet_broker: tuple[Celery, redis.Redis],
    clock: Clock,
) -> None:
    """A full queue whose worker does not read (mingle after a reconnect, a huge batch)
    holds rows back for at most half their deadline; then they go to the next live tier
    with room, or are answered here with the rule policy (issue 11, item 2)."""
    app, client = quiet_broker
    b = _congestion_bridge(config, app)
    b.congestion.hold_back_s = 0.05
    status = "SELECT status FROM ai_requests WHERE request_id = %s"
    reason = "SELECT source, reason FROM ai_responses WHERE request_id = %s"
    try:
        game.insert(pg, STATE)
        assert b.drain() == 1 and b.congested()
        held = game.insert(pg, STATE)
        assert b.drain() == 0
        assert b.congested()  # not lapsed yet: the clock stood still
        clock.advance(b.congestion.hold_back_s + 1e-6)  # just past the hold-back
        assert not b.congested()  # lapsed: claims again
        assert b.drain() == 1  # no live tier below: the rule policy answers here
        assert pg.execute(status, (held,)).fetchone() == ("completed",)
        assert pg.execute(reason, (held,)).fetchone() == ("rules", "congested")
        assert client.llen(QUEUE) == 1  # the stuck queue got nothing more

        b.live = {"cpu": True, "rules": True}
        diverted = game.insert(pg, STATE)
        assert b.drain() == 1  # to the rule tier's queue, which has room
        assert pg.execute(status, (diverted,)).fetchone() == ("processing",)
        assert client.llen("rules") == 1
        assert client.llen(QUEUE) == 1

        assert client.rpop(QUEUE) is not None  # the cpu worker reads again
        clock.advance(CONGESTION_RECHECK_S * 2)  # the queue is looked at again
        back = game.insert(pg, STATE)
        assert b.drain() == 1
        assert client.llen(QUEUE) == 1 and client.llen("rules") == 1, back
    finally:
        client.delete("rules")
        b.close()
