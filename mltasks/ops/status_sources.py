"""Where ``mltasks status`` reads: Redis (level, heartbeats, probe reports, worker counts,
cache hit rates, backlog, canary totals), PostgreSQL (queue and latency) and the models
folder's pointers. Short timeouts, no retries: a status must answer when a server does not.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from mltasks import keys
from mltasks.config import Config
from mltasks.contract import ARCHETYPES, MODEL_TYPES
from mltasks.errors import MLTasksError
from mltasks.fallback.ladder import LEVEL_QUEUE, QUEUES, Level
from mltasks.fallback.levels import LevelStore
from mltasks.fallback.registry import WorkerRegistry
from mltasks.ops.status_snapshot import GpuInfo, LatencyInfo, QueueInfo
from mltasks.sql import query

# The status module's logger, as before this part moved here: log filters know it.
log = logging.getLogger("mltasks.ops.status")


def _redis_client(config: Config, db: int, timeout_s: float) -> redis.Redis:
    """Short timeouts and no retries: a status must answer even when Redis does not."""
    return config.redis.client(
        db,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


def _redis_target(config: Config) -> str:
    """The Redis server without credentials, for the table."""
    from urllib.parse import urlsplit

    from mltasks.redisurl import is_sentinel, sentinel_parts

    if is_sentinel(config.redis.url):
        addresses = sentinel_parts(config.redis.url)[0]
        listed = ",".join(f"{h}:{p}" for h, p in addresses)
        return f"{config.redis.sentinel_master} via sentinel {listed}"
    parts = urlsplit(config.redis.url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname or ''}:{parts.port or 6379}"


def _float(raw: Any) -> float | None:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _json_doc(raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except (TypeError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


@dataclass(slots=True)
class _RedisView:
    """What Redis told: level, heartbeats, probe reports, worker counts, cache, backlog."""

    level: tuple[int, str, float | None]
    beats: dict[str, float | None]  # heartbeat age in s per queue; None when absent
    counts: dict[str, int | None]
    health: dict[str, dict[str, Any]]
    cache: dict[str, float]
    broker: dict[str, int]
    members: dict[str, list[str]] = field(default_factory=dict)  # live processes per queue
    problems: dict[str, dict[str, str]] = field(default_factory=dict)


def _read_redis(config: Config, timeout_s: float, window_s: int, now: float) -> _RedisView:
    """One short session per db; raises redis.RedisError or OSError when Redis is away."""
    from mltasks.cache.stats import hit_rates, stats_scope

    client = _redis_client(config, config.redis.cache_db, timeout_s)
    try:
        client.ping()
        store = LevelStore(config, client)
        state = store.read()
        ttl_s = config.fallback.heartbeat_ttl_ms / 1000
        pipe = client.pipeline(transaction=False)
        pipe.exists(keys.LEVEL)
        pipe.mget([keys.heartbeat(q) for q in QUEUES])
        pipe.mget([keys.probes(q) for q in QUEUES])
        replies: list[Any] = pipe.execute()
        rates = {
            str(layer): rate
            for layer, rate in hit_rates(client, window_s, now, scope=stats_scope(config)).items()
        }
        registry = WorkerRegistry(client)
        live = registry.members(QUEUES, ttl_s)
        problems = {q: registry.problems(q) for q in QUEUES}
    finally:
        client.close()
    recorded, beats_raw, probes_raw = replies[0], replies[1], replies[2]
    beats: dict[str, float | None] = {}
    counts: dict[str, int | None] = {}
    health: dict[str, dict[str, Any]] = {}
    members: dict[str, list[str]] = {}
    for i, q in enumerate(QUEUES):
        beat = _float(beats_raw[i]) if beats_raw[i] is not None else None
        beats[q] = None if beats_raw[i] is None else max(0.0, now - (beat or now))
        names = live[q]
        members[q] = names or []
        counts[q] = None if names is None else len(names)
        doc = _json_doc(probes_raw[i])
        if doc is not None:
            health[q] = doc
    since = state.since if recorded else None
    broker: dict[str, int] = {}
    bclient = _redis_client(config, config.redis.broker_db, timeout_s)
    try:
        bpipe = bclient.pipeline(transaction=False)
        for q in QUEUES:
            bpipe.llen(q)
        broker = {q: int(n) for q, n in zip(QUEUES, bpipe.execute(), strict=True)}
    except (redis.RedisError, OSError) as exc:  # the broker may sit elsewhere: not fatal
        log.info(
            "broker backlog unavailable: %s", exc, extra={"event": "status_broker_unavailable"}
        )
    finally:
        bclient.close()
    return _RedisView(
        (state.level, state.reason, since),
        beats,
        counts,
        health,
        rates,
        broker,
        members,
        problems,
    )


def _read_postgres(
    config: Config, timeout_s: float, window_s: int
) -> tuple[QueueInfo, LatencyInfo]:
    """Queue and latency in one short connection; raises psycopg.Error when it is away."""
    latency = LatencyInfo(window_s=window_s, deadline_ms=config.inference.max_latency_ms)
    statement_ms = max(100, int(timeout_s * 1000))
    with psycopg.connect(
        config.database.conninfo,
        autocommit=True,
        connect_timeout=max(2, math.ceil(timeout_s)),
        options=f"-c statement_timeout={statement_ms}",
    ) as conn:
        q = conn.execute(query("status_queue")).fetchone()
        lat = conn.execute(query("status_latency"), {"window_s": window_s}).fetchone()
    queue = QueueInfo()
    if q is not None:
        queue.pending, queue.processing = int(q[0]), int(q[1])
        queue.lag_ms = float(q[2] or 0.0) * 1000
    if lat is not None:
        latency.answered, latency.answered_255 = int(lat[0]), int(lat[1])
        for name, value in zip(("avg_ms", "p99_ms", "max_ms"), lat[2:5], strict=True):
            if value is not None:
                setattr(latency, name, float(value) * 1000)
    return queue, latency


def _gpu(health: Mapping[str, Mapping[str, Any]]) -> GpuInfo:
    """VRAM and presence from the gpu queue's probe report (else any report)."""
    doc = health.get(LEVEL_QUEUE[Level.GPU_FP16]) or next(iter(health.values()), None)
    if doc is None:
        return GpuInfo(None, "no probe report")

    def as_int(v: Any) -> int | None:
        return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    return GpuInfo(
        bool(doc.get("gpu_present")),
        str(doc.get("gpu_status") or ""),
        as_int(doc.get("vram_used_bytes")),
        as_int(doc.get("vram_total_bytes")),
    )


def _served(cfg: Config, timeout_s: float) -> list[dict[str, Any]]:
    """What each live worker process serves (mltasks.models.served); empty if unreadable."""
    from mltasks.models import served

    try:
        r = _redis_client(cfg, cfg.redis.cache_db, timeout_s)
        try:
            return served.read(r)
        finally:
            r.close()
    except (redis.RedisError, OSError):
        return []


def _versions(cfg: Config, timeout_s: float | None) -> list[dict[str, Any]]:
    """The deployed models' pointers, with each candidate's canary totals from Redis."""
    from mltasks.models.versions import read_pointer

    out: list[dict[str, Any]] = []
    for archetype in ARCHETYPES:
        for model_type in MODEL_TYPES:
            try:
                p = read_pointer(cfg.models.dir, archetype, model_type)
            except MLTasksError as exc:
                out.append({"model": f"{archetype}/{model_type}", "error": str(exc)})
                continue
            if p is not None and p.active is not None:
                out.append(p.as_dict())
    candidates = [v for v in out if v.get("candidate")]
    if candidates and timeout_s is not None:
        try:
            r = _redis_client(cfg, cfg.redis.cache_db, timeout_s)
            for v in candidates:
                raw = r.hgetall(keys.canary_stats(v["model"], v["candidate"]["version"]))
                v["candidate"]["progress"] = {
                    (k.decode() if isinstance(k, bytes) else str(k)): float(x)
                    for k, x in raw.items()
                }
        except (redis.RedisError, OSError):
            pass
    for v in out:
        v["min_rows"] = cfg.canary.min_rows
    return out
