"""What each worker process serves, version by version, for ``mltasks status``.

A deploy is judged by what the workers answer with, not by what the pointer says: a worker
that missed a swap, or a prefork child that loads slowly, serves another version than its
neighbours. So each process writes, per model level it serves, the version of every model
it holds and the candidates it shadows into one hash (``keys.SERVED``), when it loads and
after each swap; its worker's monitor keeps the hash alive and drops the processes that
are gone. Never raises: status shows what it could read.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from mltasks import keys

if TYPE_CHECKING:
    from mltasks.models.engine import Engine

log = logging.getLogger(__name__)


def _field(level: int, pid: int | None = None) -> str:
    from mltasks.fallback.registry import worker_member

    return f"{worker_member(pid)}/{level}"


def doc_of(engine: Engine) -> dict[str, Any]:
    """The versions an engine answers with, and the candidates it shadows."""
    return {
        "at": time.time(),
        "level": engine.level,
        "versions": {m.name: m.version for m in engine.models.values()},
        "candidates": {m.name: m.version for m in engine.candidates.values()},
    }


_clients: dict[int, Any] = {}  # per process (a prefork child makes its own)


def publish(engine: Engine, r: Any = None) -> None:
    """This process's versions at the engine's level (after a load or a swap)."""
    import os

    from mltasks.redisurl import cache_client

    try:
        client = r
        if client is None:
            client = _clients.get(os.getpid())
            if client is None:
                client = _clients[os.getpid()] = cache_client(engine.config)
        pipe = client.pipeline(transaction=False)
        pipe.hset(keys.SERVED, _field(engine.level), json.dumps(doc_of(engine)))
        pipe.expire(keys.SERVED, keys.PROBES_TTL_S)
        pipe.execute()
    except Exception as exc:  # status shows the process as unknown
        log.warning(
            "cannot publish the versions served: %s", exc, extra={"event": "served_publish_failed"}
        )


def prune(r: Any, alive: Iterable[int]) -> None:
    """Drop this host's processes that are not in ``alive``; keep the hash from expiring."""
    import socket

    host, live = socket.gethostname(), {int(p) for p in alive}
    raw: Any = r.hgetall(keys.SERVED)
    dead = []
    for field in raw:
        name, _, rest = field.decode().rpartition(":")
        pid = rest.partition("/")[0]
        if name == host and (not pid.isdigit() or int(pid) not in live):
            dead.append(field)
    pipe = r.pipeline(transaction=False)
    if dead:
        pipe.hdel(keys.SERVED, *dead)
    pipe.expire(keys.SERVED, keys.PROBES_TTL_S)
    pipe.execute()


def read(r: Any) -> list[dict[str, Any]]:
    """Every process's report: ``worker`` (host:pid), ``level``, ``versions``, ``candidates``."""
    out = []
    for field, raw in sorted(r.hgetall(keys.SERVED).items()):
        try:
            doc = json.loads(raw)
        except ValueError:
            continue
        if isinstance(doc, dict):
            name = field.decode() if isinstance(field, bytes) else str(field)
            out.append({"worker": name.rpartition("/")[0], **doc})
    return out
