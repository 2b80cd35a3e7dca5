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

from bridge.loop import Bridge
from bridge.publish import Publisher
from mltasks.celery_app import INFER_TASK, settings_for
from mltasks.config import Config, DatabaseConfig
from tests import game

STATE = [0.8, 0.5] + [0.0] * 62
QUEUE = "cpu"


def _app(config: Config, db: int) -> Celery:
    """An app of its own on a private broker db: nothing consumes its queues."""
    app = Celery("publish-test")
    app.conf.update(settings_for(config))
    app.conf.broker_url = config.redis.db_url(db)
    return app


@pytest.fixture
def quiet_broker(config: Config) -> Iterator[tuple[Celery, redis.Redis]]:
    db = 12
    app = _app(config, db)
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
    assert theirs is not None and ours is not None
    assert _envelope(ours) == _envelope(theirs)
    body = json.loads(ours)
    payload = loads(
        base64.b64decode(body["body"]),
        body["content-type"],
        body["content-encoding"],
        accept={"application/x-msgpack"},
    )
    assert payload[0] == args and payload[1] == {}
    assert body["headers"]["argsrepr"] == "(batch of 1)"  # not the rows: Flower shows this


def test_publish_answers_with_the_queue_length(
    quiet_broker: tuple[Celery, redis.Redis],
) -> None:
    app, client = quiet_broker
    p = Publisher(app, client)
    assert [p.publish(QUEUE, [[], 3, 0.0, []], 0) for _ in range(3)] == [1, 2, 3]


def test_congested_tier_gathers_rows_until_an_answer_is_heard(
    config: Config, pg: psycopg.Connection[Any], quiet_broker: tuple[Celery, redis.Redis]
) -> None:
    """max_waiting_batches 1: a second waiting batch stops the claims; an answer resumes."""
    app, client = quiet_broker
    cfg = dataclasses.replace(
        config, inference=dataclasses.replace(config.inference, max_waiting_batches=1)
    )
    b = Bridge(cfg, app)
    try:
        b.level = 3  # the cpu tier, whatever the heartbeats say: nothing consumes here
        b.refresh_level = lambda: None  # type: ignore[method-assign]
        first = game.insert(pg, STATE)
        assert b.drain() == 1 and not b.congested()  # one batch waiting: within the limit
        game.insert(pg, STATE)
        assert b.drain() == 1 and b.congested()  # two waiting: stop claiming
        third = game.insert(pg, STATE)
        b.wait(0.0)
        assert b.drain() == 0  # congested: the row stays pending, gathering
        status = "SELECT status FROM ai_requests WHERE request_id = %s"
        assert pg.execute(status, (third,)).fetchone() == ("pending",)

        # A worker answers the first batch: the schema's NOTIFY ai_answered reaches the bridge.
        pg.execute(
            "INSERT INTO ai_responses (request_id, action_id, confidence, source) "
            "VALUES (%s, 1, 0.5, 'model')",
            (first,),
        )
        b.wait(1.0)
        assert not b.congested()
        assert b.drain() == 1
        assert pg.execute(status, (third,)).fetchone() == ("processing",)
        assert client.llen(QUEUE) == 3
    finally:
        b.close()


def test_congestion_ends_by_itself_when_no_answer_comes(
    config: Config, pg: psycopg.Connection[Any], quiet_broker: tuple[Celery, redis.Redis]
) -> None:
    """A worker that died with its batch sends no NOTIFY: the bridge tries again soon."""
    from bridge.loop import CONGESTION_MAX_S

    app, _ = quiet_broker
    cfg = dataclasses.replace(
        config, inference=dataclasses.replace(config.inference, max_waiting_batches=0)
    )
    b = Bridge(cfg, app)
    try:
        b.level = 3
        game.insert(pg, STATE)
        assert b.drain() == 1 and b.congested()
        time.sleep(CONGESTION_MAX_S * 1.5)  # the safety interval itself is under test
        assert not b.congested()
    finally:
        b.close()


def test_broker_channel_keeps_one_client(celery_app: Celery) -> None:
    """mltasks.broker: kombu's channel makes its Redis client once, not per command."""
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
