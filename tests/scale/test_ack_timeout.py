"""An acknowledgement that times out (the broker unreachable for a moment, as across a
partition) must not stop the worker from taking the next batch.

kombu's Redis QoS forgets a delivery only after its Redis bookkeeping succeeded: with
prefetch 1, one failed ack left the worker alive (heartbeats) but never consuming again,
as tests/scale/test_partitions.py found. mltasks.broker.transport.QoS frees the slot regardless.
Here on a real redis-server, made unresponsive with CLIENT PAUSE for longer than the
socket timeout while the ack runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Exchange, Queue  # type: ignore[attr-defined]

from tests.scale.servers import RedisProc

pytestmark = pytest.mark.scale


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisProc]:
    s = RedisProc(tmp_path / "redis")
    s.start()
    try:
        yield s
    finally:
        s.stop()


def test_a_timed_out_ack_frees_the_prefetch_slot(server: RedisProc) -> None:
    queue = Queue("cpu", Exchange("cpu", type="direct"), routing_key="cpu")
    options = {"socket_timeout": 0.5, "socket_connect_timeout": 0.5, "visibility_timeout": 30}
    url = f"redis://{server.host}:{server.port}/1"
    transport = "mltasks.broker.transport:Transport"
    with Connection(url, transport=transport, transport_options=options) as conn:
        conn.Producer().publish(
            {"batch": 1}, exchange=queue.exchange, routing_key="cpu", declare=[queue]
        )
        got: list[Any] = []
        channel = conn.channel()
        consumer = conn.Consumer(
            queue, channel=channel, callbacks=[lambda body, msg: got.append(msg)]
        )
        consumer.qos(prefetch_count=1)
        with consumer:
            conn.drain_events(timeout=5)
            assert len(got) == 1
            assert not channel.qos.can_consume()  # the one slot is taken
            pauser = server.client()
            pauser.client_pause(2000, all=True)
            try:
                with pytest.raises(Exception, match=r"(?i)timeout"):
                    got[0].ack()
            finally:
                pauser.client_unpause()
                pauser.close()
            # The slot is free: the worker takes its next batch.
            assert channel.qos.can_consume()
