"""Sending a batch to a tier's queue: Celery's own task message, written with one LPUSH.

``app.send_task`` costs the bridge 0.8-1.9 ms of CPU per batch on the benchmark machine
(kombu builds a Redis client per publish, wraps it in retry and declare layers, and the
full argument repr of every row), against about 0.3 ms for the LPUSH itself. The message
is still built by Celery (``amqp.as_task_v2``) and serialized by kombu, and its envelope
is the one kombu's Redis transport writes for Celery's direct queues (anonymous exchange,
routing key = queue, priority 0, body in base64), so any Celery worker consumes it
unchanged; ``tests/flow/test_publish.py`` compares it with what ``send_task`` writes.

The push and an LLEN go in one pipeline: Redis hands a pushed message to a worker blocked
in BRPOP before it runs the next command, so the LLEN counts the batches still waiting for
a worker (0: one was idle and took it). That is the bridge's congestion signal, without a
round trip of its own.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Any, cast

import redis
from celery import Celery
from kombu.serialization import dumps
from kombu.utils.uuid import uuid

from mltasks.broker.celery_app import INFER_TASK

SERIALIZER = "msgpack"


def task_message(app: Celery, queue: str, args: Sequence[Any], argsrepr: str) -> bytes:
    """The JSON envelope kombu's Redis transport would push for ``send_task(..., queue)``."""
    task_id = uuid()
    headers, properties, body, _ = app.amqp.as_task_v2(
        task_id,
        INFER_TASK,
        args=list(args),
        kwargs={},
        argsrepr=argsrepr,
        kwargsrepr="{}",
        ignore_result=None,  # the task's own setting, as send_task leaves it
    )
    content_type, content_encoding, payload = dumps(body, serializer=SERIALIZER)  # type: ignore[no-untyped-call]
    if isinstance(payload, str):  # a text serializer; msgpack gives bytes
        payload = payload.encode(content_encoding or "utf-8")
    message = {
        "body": base64.b64encode(payload).decode("ascii"),
        "content-encoding": content_encoding,
        "content-type": content_type,
        "headers": headers,
        "properties": {
            **properties,
            "delivery_mode": 2,  # persistent, as for Celery's own queues
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": uuid(),
        },
    }
    return json.dumps(message, separators=(",", ":")).encode()


class Publisher:
    """Pushes infer_batch messages onto the broker's lists with one persistent client."""

    def __init__(self, app: Celery, broker: redis.Redis) -> None:
        self.app = app
        self.broker = broker
        self.last_message = b""  # what the last publish pushed (`withdraw` takes it back)

    def publish(self, queue: str, args: Sequence[Any], rows: int) -> int:
        """Push one batch; returns how many batches wait in the queue right after.

        A connection error is retried once at once (a fresh socket after a Redis
        restart); anything else reaches the caller, which answers the rows itself.
        """
        data = task_message(self.app, queue, args, f"(batch of {rows})")
        self.last_message = data
        try:
            return self._push(queue, data)
        except (redis.ConnectionError, redis.TimeoutError):
            return self._push(queue, data)

    def _push(self, queue: str, data: bytes) -> int:
        pipe = self.broker.pipeline(transaction=False)
        pipe.lpush(queue, data)
        pipe.llen(queue)
        _, waiting = pipe.execute()
        return int(waiting)

    def withdraw(self, sent: Sequence[tuple[str, bytes]]) -> list[bool]:
        """Take messages back off their queues, in one pipeline: True for each that was
        still waiting (no worker will see it now), False for one a worker has taken.

        Redis runs an LREM and a worker's BRPOP one after the other, so exactly one of
        them gets the message. When Redis does not answer, every message counts as taken
        back: its rows are answered by the caller, and PostgreSQL keeps one answer a row.
        """
        if not sent:
            return []
        try:
            pipe = self.broker.pipeline(transaction=False)
            for queue, data in sent:
                pipe.lrem(queue, 1, cast(Any, data))  # bytes, as pushed
            return [int(n) > 0 for n in pipe.execute()]
        except (redis.RedisError, OSError):
            return [True] * len(sent)
