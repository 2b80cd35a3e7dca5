"""Redis clients from the service's URLs, Sentinel included.

``redis.url`` is ``redis://``, ``rediss://``, ``unix://`` or a Sentinel list,
``sentinel://[:PASSWORD@]HOST:PORT[/DB];sentinel://HOST:PORT[/DB];...``, the form kombu's
Sentinel transport reads (its broker_transport_options ``master_name`` is
``redis.sentinel_master``). redis-py's ``from_url`` knows no ``sentinel://``, so every
client the service builds from the configured URL comes from :func:`client_from_url`: a
plain URL goes to ``from_url``, a Sentinel list to ``Sentinel(...).master_for(...)``,
whose pool asks the sentinels for the master again after a connection error (a
failover) instead of holding on to the old address. The service's own clients on the
configured server come from here too (:func:`cache_client`), so every process reaches a
Sentinel deployment's master alike.
"""

from __future__ import annotations

import re
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import redis
from redis.sentinel import Sentinel

SENTINEL_SCHEME = "sentinel://"
DEFAULT_SENTINEL_PORT = 26379


def is_sentinel(url: str) -> bool:
    return url.startswith(SENTINEL_SCHEME)


def with_db(url: str, db: int) -> str:
    """The URL with database `db` (a db number already in it is replaced); every member of
    a Sentinel list gets it, as kombu reads the first and the others must agree."""
    if ";" in url:
        return ";".join(with_db(part.strip(), db) for part in url.split(";") if part.strip())
    base = url.rstrip("/")
    base = re.sub(r"((?:redis|rediss|sentinel)://[^/]*)/\d+$", r"\1", base)
    return f"{base}/{db}"


def sentinel_parts(url: str) -> tuple[list[tuple[str, int]], int, str | None, str | None]:
    """(sentinel addresses, db, username, password) of a ``sentinel://`` list."""
    addresses: list[tuple[str, int]] = []
    db = 0
    username = password = None
    for i, part in enumerate(p.strip() for p in url.split(";")):
        if not part:
            continue
        parsed = urlsplit(part)
        if parsed.scheme != "sentinel" or not parsed.hostname:
            raise ValueError(f"not a sentinel://HOST:PORT URL: {part.split('@')[-1]!r}")
        addresses.append((parsed.hostname, parsed.port or DEFAULT_SENTINEL_PORT))
        if i == 0:
            path = parsed.path.strip("/")
            db = int(path) if path.isdigit() else 0
            username = unquote(parsed.username) if parsed.username else None
            password = unquote(parsed.password) if parsed.password else None
    if not addresses:
        raise ValueError("an empty sentinel:// list")
    return addresses, db, username, password


def client_from_url(url: str, *, master_name: str = "mymaster", **kwargs: Any) -> redis.Redis:
    """A client on `url`; `kwargs` are redis-py's (timeouts, retry, ...). For a Sentinel
    list the master named `master_name`, found through the sentinels with the same
    timeouts (the password, if any, is the data nodes'; sentinels are asked without one).
    """
    if not is_sentinel(url):
        client: redis.Redis = redis.Redis.from_url(url, **kwargs)
        return client
    addresses, db, username, password = sentinel_parts(url)
    timeouts: dict[str, Any] = {
        k: kwargs[k] for k in ("socket_timeout", "socket_connect_timeout") if k in kwargs
    }
    sentinel = Sentinel(addresses, sentinel_kwargs=dict(timeouts), **timeouts)
    node_kwargs = {k: v for k, v in kwargs.items() if k not in timeouts}
    if username:
        node_kwargs["username"] = username
    if password:
        node_kwargs["password"] = password
    master: redis.Redis = sentinel.master_for(master_name, db=db, **timeouts, **node_kwargs)
    return master


class RedisSettings(Protocol):
    """The part of the config's ``redis`` section a client is made from (`mltasks.config`
    imports this module: it is read through this shape, never imported here)."""

    @property
    def socket_timeout_s(self) -> float: ...

    @property
    def cache_db(self) -> int: ...

    @property
    def sentinel_master(self) -> str: ...

    def db_url(self, db: int) -> str: ...


class Configured(Protocol):
    @property
    def redis(self) -> RedisSettings: ...


def cache_client(config: Configured, timeout_s: float | None = None) -> redis.Redis:
    """A client on the cache db with short timeouts: Redis must never stall a hot path."""
    r = config.redis
    t = r.socket_timeout_s if timeout_s is None else timeout_s
    return client_from_url(
        r.db_url(r.cache_db),
        master_name=r.sentinel_master,
        socket_timeout=t,
        socket_connect_timeout=t,
        health_check_interval=0,
    )
