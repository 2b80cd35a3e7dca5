"""kombu's Redis transport, with one client object per channel instead of one per command.

kombu builds a new ``redis.Redis`` around its connection pool for every publish, every
unacked-message bookkeeping step and every ack (``Channel._create_client``). With
redis-py 6 that constructor fills a dict of ~170 response callbacks: about 0.2 ms of CPU
each time on the benchmark machine, twice per task in the worker. The client holds no
connection of its own (the pool does), so one per pool serves every call just the same.

Selected with Celery's ``broker_transport`` (mltasks.celery_app): ``Transport`` for a
``redis://`` broker URL, ``SentinelTransport`` for a ``sentinel://`` list.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis


class _OneClient:
    """The channel's synchronous client, made once per connection pool."""

    _mltasks_client: Any = None
    pool: Any

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
    pass


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(_OneClient, kombu_redis.SentinelChannel):
    """The same on kombu's Sentinel channel (a ``sentinel://`` broker URL): its pool finds
    the master through the sentinels and follows a failover."""


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel
