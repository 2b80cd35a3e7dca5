"""kombu's Redis transport, with one client object per channel instead of one per command,
and no unacked bookkeeping for the tasks that do not want it.

kombu builds a new ``redis.Redis`` around its connection pool for every publish, every
unacked-message bookkeeping step and every ack (``Channel._create_client``). With
redis-py 6 that constructor fills a dict of ~170 response callbacks: about 0.2 ms of CPU
each time on the benchmark machine, twice per task in the worker. The client holds no
connection of its own (the pool does), so one per pool serves every call just the same.

kombu's ack emulation records every delivered message in Redis (a MULTI/EXEC writing the
``unacked`` hash and its index) and removes it on the ack (another MULTI/EXEC), so that a
message lost with its worker comes back after the visibility timeout. For ``infer_batch`` that
is two round trips on the path to every answer, bought to redeliver a batch whose rows the
game gave up on thousands of times earlier: a lost batch is answered by the bridge (255
``lost``) and its rows claimed again after their lease. The messages of the tasks named in the
transport option ``untracked_tasks`` skip both; every other task (cleanup, canary) keeps them.

Selected with Celery's ``broker_transport`` (mltasks.broker.celery_app): ``Transport`` for a
``redis://`` broker URL, ``SentinelTransport`` for a ``sentinel://`` list.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.transport.virtual import base as virtual_base


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS, except that an acknowledgement whose Redis bookkeeping fails (a
    timeout across a partition) still frees the prefetch slot.

    kombu removes the message from its ``unacked`` index in Redis first and forgets the
    delivery only if that worked. When the broker does not answer in time, the delivery
    stays counted against the prefetch limit (1 here) and the worker never takes another
    batch, while its heartbeat says it is alive (found by tests/scale/test_partitions.py).
    Here the slot is freed whatever Redis said; the error still reaches Celery, which logs
    it. The message left in ``unacked`` is restored after the visibility timeout and
    answered again, which the idempotent answer write makes harmless.
    """

    def _untracked(self, message: Any) -> bool:
        """Whether ``message`` (None: not delivered here) is kept only in this process."""
        return message is not None and message.headers.get("task") in self.channel.untracked_tasks

    def append(self, message: Any, delivery_tag: Any) -> None:
        if self._untracked(message):
            virtual_base.QoS.append(self, message, delivery_tag)  # type: ignore[no-untyped-call]
            return
        super().append(message, delivery_tag)  # type: ignore[no-untyped-call]

    def ack(self, delivery_tag: Any) -> None:
        if self._untracked(self._delivered.get(delivery_tag)):
            virtual_base.QoS.ack(self, delivery_tag)  # type: ignore[no-untyped-call]
            return
        try:
            self._remove_from_indices(delivery_tag).execute()  # type: ignore[no-untyped-call]
        finally:
            virtual_base.QoS.ack(self, delivery_tag)  # type: ignore[no-untyped-call]

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        message = self._delivered.get(delivery_tag)
        if self._untracked(message):
            if requeue:  # back on its queue from this process's copy (Redis has none)
                restore: Any = virtual.Channel._restore
                restore(self.channel, message)
            virtual_base.QoS.ack(self, delivery_tag)  # type: ignore[no-untyped-call]
            return
        try:
            super().reject(delivery_tag, requeue=requeue)  # type: ignore[no-untyped-call]
        except Exception:
            virtual_base.QoS.ack(self, delivery_tag)  # type: ignore[no-untyped-call]
            raise


class _OneClient:
    """The channel's synchronous client, made once per connection pool; and the channel's
    ``untracked_tasks`` (a transport option, read by ``QoS``)."""

    _mltasks_client: Any = None
    pool: Any
    untracked_tasks: frozenset[str] | tuple[str, ...] = ()

    def _create_client(self, asynchronous: bool = False) -> Any:
        base: Any = super()
        if asynchronous:
            return base._create_client(asynchronous=True)
        client = self._mltasks_client
        # A new pool (kombu drops it after a connection error) gets a new client.
        if client is None or client.connection_pool is not self.pool:
            client = self._mltasks_client = base._create_client()
        return client


class Channel(_OneClient, kombu_redis.Channel):
    QoS = QoS
    from_transport_options: Any = (*kombu_redis.Channel.from_transport_options, "untracked_tasks")


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(_OneClient, kombu_redis.SentinelChannel):
    """The same on kombu's Sentinel channel (a ``sentinel://`` broker URL): its pool finds
    the master through the sentinels and follows a failover."""

    QoS = QoS
    from_transport_options: Any = (
        *kombu_redis.SentinelChannel.from_transport_options,
        "untracked_tasks",
    )


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel
