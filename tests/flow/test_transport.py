"""The broker transport's untracked tasks (mltasks.broker.transport), on the session's Redis.

An ``infer_batch`` message must cost no unacked bookkeeping in Redis (the lease and the
bridge's rescue answer a lost batch); every other task keeps kombu's, so a cleanup lost with
its worker still comes back after the visibility timeout.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue  # type: ignore[attr-defined]

from mltasks.broker.celery_app import CLEANUP_TASK, INFER_TASK
from mltasks.config import Config

DB = 13  # a db of the session's private Redis that no other test uses
QUEUE = Queue("cpu", Exchange("cpu", type="direct"), routing_key="cpu")


@pytest.fixture
def broker(base_config: Config) -> Iterator[tuple[str, redis.Redis]]:
    url = base_config.redis.db_url(DB)
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url, client
    finally:
        client.flushdb()
        client.close()


def _consume_one(conn: Any, task: str) -> tuple[Any, Any]:
    """Publish one message of `task` and take it: (channel, message)."""
    conn.Producer().publish(
        {"args": []},
        exchange=QUEUE.exchange,
        routing_key="cpu",
        declare=[QUEUE],
        headers={"task": task, "id": f"{task}-1"},
    )
    got: list[Any] = []
    channel = conn.channel()
    consumer = conn.Consumer(QUEUE, channel=channel, callbacks=[lambda _b, m: got.append(m)])
    consumer.qos(prefetch_count=1)
    consumer.consume()
    conn.drain_events(timeout=5)
    assert len(got) == 1
    return channel, got[0]


def _connection(url: str) -> Any:
    options = {"untracked_tasks": (INFER_TASK,), "visibility_timeout": 30}
    return Connection(
        url, transport="mltasks.broker.transport:Transport", transport_options=options
    )


def test_an_infer_batch_message_leaves_nothing_in_the_unacked_hash(
    broker: tuple[str, redis.Redis],
) -> None:
    url, client = broker
    with _connection(url) as conn:
        channel, message = _consume_one(conn, INFER_TASK)
        assert not client.hlen("unacked"), "the infer message was recorded as unacked"
        assert not channel.qos.can_consume()  # still counted against the prefetch limit
        message.ack()
        assert channel.qos.can_consume()
        assert not client.hlen("unacked")


def test_other_tasks_keep_kombus_unacked_bookkeeping(broker: tuple[str, redis.Redis]) -> None:
    url, client = broker
    with _connection(url) as conn:
        channel, message = _consume_one(conn, CLEANUP_TASK)
        assert client.hlen("unacked") == 1, "a cleanup must come back if its worker dies"
        message.ack()
        assert not client.hlen("unacked")
        assert channel.qos.can_consume()


def test_a_requeued_infer_batch_message_goes_back_on_its_queue(
    broker: tuple[str, redis.Redis],
) -> None:
    url, client = broker
    with _connection(url) as conn:
        channel, message = _consume_one(conn, INFER_TASK)
        message.reject(requeue=True)
        assert client.llen("cpu") == 1
        assert channel.qos.can_consume()
        assert not client.hlen("unacked")


def test_the_service_settings_name_infer_batch_untracked(base_config: Config) -> None:
    from mltasks.broker.celery_app import settings_for

    options = settings_for(base_config)["broker_transport_options"]
    assert tuple(options["untracked_tasks"]) == (INFER_TASK,)
