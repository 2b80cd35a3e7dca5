"""kombu's Redis transport, with one client object per channel instead of one per command.

kombu builds a new ``redis.Redis`` around its connection pool for every publish, every
unacked-message bookkeeping step and every ack (``Channel._create_client``). With
redis-py 6 that constructor fills a dict of ~170 response callbacks: about 0.2 ms of CPU
each time on the benchmark machine, twice per task in the worker. The client holds no
connection of its own (the pool does), so one per pool serves every call just the same.

Selected with Celery's ``broker_transport`` (mltasks.celery_app); the broker URL stays a
plain ``redis://`` URL.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    _mltasks_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[no-untyped-call]
        client = self._mltasks_client
        # A new pool (kombu drops it after a connection error) gets a new client.
        if client is None or client.connection_pool is not self.pool:
            client = self._mltasks_client = super()._create_client()  # type: ignore[no-untyped-call]
        return client


class Transport(kombu_redis.Transport):
    Channel = Channel
