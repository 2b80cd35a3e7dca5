"""The worker registry in Redis: which worker processes consume which queues.

Every worker refreshes a heartbeat key per queue it consumes (the bridge routes past a
queue whose key lapsed: `mltasks.fallback.levels.LevelStore.snapshot`), counts itself
among the queue's live workers, says why it does not serve when it cannot, and how many
models it loaded. `mltasks status` reads all of it back.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterable
from typing import Any

import redis

from mltasks import keys


def worker_member(pid: int | None = None) -> str:
    """How a worker process is named in the live-worker and models-loaded keys."""
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}"


class WorkerRegistry:
    """Heartbeats, live workers, their problems and their model counts, per queue."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def beat(self, queues: Iterable[str], ttl_ms: int, member: str | None = None) -> None:
        """This worker consumes ``queues`` and is alive (``member``: counted among the live)."""
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        for q in queues:
            pipe.set(keys.heartbeat(q), str(now), px=ttl_ms)
            if member:
                pipe.zadd(keys.workers(q), {member: now})
                pipe.zremrangebyscore(keys.workers(q), "-inf", now - ttl_ms / 1000)
                pipe.pexpire(keys.workers(q), ttl_ms)
        pipe.execute()

    def live(self, queues: Iterable[str], max_age_s: float) -> set[str]:
        """The workers that beat on any of ``queues`` within ``max_age_s``; one round trip."""
        return {m for names in self.members(queues, max_age_s).values() for m in names or ()}

    def members(self, queues: Iterable[str], max_age_s: float) -> dict[str, list[str] | None]:
        """The live workers of each queue, sorted; None where no worker ever beat (or all
        lapsed past the TTL): `mltasks status` shows the count as unknown. One round trip."""
        qs = list(queues)
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        for q in qs:
            pipe.exists(keys.workers(q))
            pipe.zrangebyscore(keys.workers(q), now - max_age_s, "+inf")
        replies = pipe.execute()
        found: dict[str, list[str] | None] = {}
        for i, q in enumerate(qs):
            has_set, live = replies[2 * i], replies[2 * i + 1]
            names = sorted(
                m.decode(errors="replace") if isinstance(m, bytes) else str(m) for m in live
            )
            found[q] = names if has_set else None
        return found

    def publish_problem(self, queues: Iterable[str], member: str, problem: str | None) -> None:
        """Why the worker ``member`` does not serve ``queues`` (None: it does), for status."""
        pipe = self.redis.pipeline(transaction=False)
        for q in queues:
            key = keys.problems(q)
            if problem is None:
                pipe.hdel(key, member)
            else:
                pipe.hset(key, member, json.dumps({"at": time.time(), "problem": problem}))
                pipe.expire(key, keys.PROBES_TTL_S)
        pipe.execute()

    def problems(self, queue: str, max_age_s: float = keys.PROBES_TTL_S) -> dict[str, str]:
        """Workers that said, within ``max_age_s``, why they do not serve ``queue``."""
        raw: Any = self.redis.hgetall(keys.problems(queue))
        now, out = time.time(), {}
        for member, doc in raw.items():
            try:
                d = json.loads(doc)
                if now - float(d["at"]) <= max_age_s:
                    out[member.decode()] = str(d["problem"])
            except (ValueError, KeyError, TypeError):
                continue
        return out

    def publish_models(self, queue: str, count: int, member: str | None = None) -> None:
        """This process loaded ``count`` models to serve ``queue``."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(keys.models(queue), member or worker_member(), int(count))
        pipe.expire(keys.models(queue), keys.PROBES_TTL_S)
        pipe.execute()

    def models_loaded(self, queue: str, alive: Iterable[int]) -> int | None:
        """The fewest models a live process of this host loaded for ``queue`` (None: none said).

        Entries of this host's processes not in ``alive`` are dropped (a child that died
        or was recycled); the others' are left to their own hosts' monitors.
        """
        key = keys.models(queue)
        host, live = socket.gethostname(), {int(p) for p in alive}
        raw: Any = self.redis.hgetall(key)
        counts, dead = [], []
        for field, value in raw.items():
            name, _, pid = field.decode().rpartition(":")
            if name != host:
                continue
            if not pid.isdigit() or int(pid) not in live:
                dead.append(field)
                continue
            try:
                counts.append(int(value))
            except ValueError:
                dead.append(field)
        pipe = self.redis.pipeline(transaction=False)
        if dead:
            pipe.hdel(key, *dead)
        pipe.expire(key, keys.PROBES_TTL_S)
        pipe.execute()
        return min(counts) if counts else None
