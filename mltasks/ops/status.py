"""``mltasks status``: is the service answering as well as this deployment can?

One snapshot of the indicators an operator looks at first (models loaded, fallback level,
cache hit rates, latency, VRAM, queue depth and lag, live workers), read from where the
service already keeps them: the workers' probe reports and heartbeats in Redis, and the
game's tables in PostgreSQL. Every source may be missing; a missing one is shown as
unknown, never a crash.

Exit codes (for scripts and health checks):

- 2: PostgreSQL or Redis cannot be reached (the table still shows what could be read).
- 1: degraded, when any of these holds:
  - the level is 5: every request gets 255, the game's traditional AI;
  - the level's queue has no live worker, so batches are served at a lower level or 255;
  - the level is worse than the best this deployment can reach: 1 with a live ``gpu``
    worker whose probe sees a GPU, else 3 with a live ``gpu`` or ``cpu`` worker (model
    levels run on the CPU), else 4 with a live ``rules`` worker;
  - fewer models load than configured (54, or 6 with ``models.preload: serving``);
  - the p99 latency of recent answers, or the age of the oldest pending row, is above
    ``inference.max_latency_ms`` (the game has given up on those requests by then).
- 0: healthy.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import psycopg
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from mltasks import keys
from mltasks.config import Config, get_config
from mltasks.contract import ARCHETYPES, MODEL_TYPES
from mltasks.errors import MLTasksError
from mltasks.fallback.levels import LEVEL_QUEUE, Level, LevelStore, route
from mltasks.sql import query

log = logging.getLogger(__name__)

HEALTHY: Final = 0
DEGRADED: Final = 1
UNREACHABLE: Final = 2

QUEUES: Final[tuple[str, ...]] = ("gpu", "cpu", "rules")
LEVEL_NAMES: Final[dict[int, str]] = {
    1: "GPU FP16",
    2: "GPU INT8",
    3: "CPU",
    4: "rules",
    5: "traditional AI (255)",
}
# --- what a snapshot holds ----------------------------------------------------------------


@dataclass(slots=True)
class Reach:
    """Whether a server answered, and the error when it did not."""

    target: str
    reachable: bool = False
    error: str | None = None


@dataclass(slots=True)
class LevelInfo:
    level: int
    name: str
    reason: str
    since: float | None  # None: no level recorded, the start level applies
    serving: int  # the level batches are actually served at (the next one with a worker)
    ceiling: int  # the best level this deployment can reach now


@dataclass(slots=True)
class ModelsInfo:
    loaded: int | None
    expected: int
    # "workers" (their reports), "files" (loaded here: live workers that do not report),
    # "no live model worker", "unknown" (the files could not be checked here)
    source: str
    level: int = 3  # the model level whose fusion the counts are for (1 with a GPU worker)
    # Archetypes loaded per model type of that fusion (from the files; {} when not counted).
    by_type: dict[str, int] = field(default_factory=dict)
    # Per model level, the fusion in force: type -> weight.
    fusion: dict[int, dict[str, float]] = field(default_factory=dict)


@dataclass(slots=True)
class LatencyInfo:
    window_s: int
    deadline_ms: int
    answered: int = 0
    answered_255: int = 0
    avg_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None


@dataclass(slots=True)
class QueueInfo:
    pending: int | None = None
    processing: int | None = None
    lag_ms: float | None = None
    broker: dict[str, int] = field(default_factory=dict)  # messages waiting per Celery queue


@dataclass(slots=True)
class WorkerInfo:
    live: bool
    count: int | None  # None: the workers do not publish a count (only the heartbeat)
    heartbeat_age_ms: float | None
    processes: list[str] = field(default_factory=list)  # live "<host>:<pid>" on the queue
    # Workers of this queue that do not serve, and why (no database, no model): <host:pid>
    not_serving: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class GpuInfo:
    present: bool | None  # None: no probe report
    status: str
    vram_used_bytes: int | None = None
    vram_total_bytes: int | None = None


@dataclass(slots=True)
class Status:
    checked_at: float
    postgres: Reach
    redis: Reach
    level: LevelInfo | None = None
    models: ModelsInfo | None = None
    cache: dict[str, float] = field(default_factory=dict)
    latency: LatencyInfo | None = None
    queue: QueueInfo | None = None
    workers: dict[str, WorkerInfo] = field(default_factory=dict)
    gpu: GpuInfo | None = None
    # Deployed models (mltasks models deploy): active version, candidate, canary, rollback.
    versions: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # The indicators the problems are about: level, models, latency, queue.
    failing: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if not (self.postgres.reachable and self.redis.reachable):
            return UNREACHABLE
        return DEGRADED if self.problems else HEALTHY

    @property
    def verdict(self) -> str:
        return {HEALTHY: "healthy", DEGRADED: "degraded", UNREACHABLE: "unreachable"}[
            self.exit_code
        ]

    def to_dict(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["exit_code"] = self.exit_code
        doc["verdict"] = self.verdict
        return doc


# --- reading the sources ------------------------------------------------------------------


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
    from mltasks.cache import hit_rates, stats_scope

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
        for q in QUEUES:
            pipe.exists(keys.workers(q))
            pipe.zcount(keys.workers(q), now - ttl_s, "+inf")
        for q in QUEUES:
            pipe.zrangebyscore(keys.workers(q), now - ttl_s, "+inf")
        replies: list[Any] = pipe.execute()
        rates = {
            str(layer): rate
            for layer, rate in hit_rates(client, window_s, now, scope=stats_scope(config)).items()
        }
        problems = {q: store.problems(q) for q in QUEUES}
    finally:
        client.close()
    recorded, beats_raw, probes_raw = replies[0], replies[1], replies[2]
    beats: dict[str, float | None] = {}
    counts: dict[str, int | None] = {}
    health: dict[str, dict[str, Any]] = {}
    for i, q in enumerate(QUEUES):
        beat = _float(beats_raw[i]) if beats_raw[i] is not None else None
        beats[q] = None if beats_raw[i] is None else max(0.0, now - (beat or now))
        has_set, n = replies[3 + 2 * i], replies[4 + 2 * i]
        counts[q] = int(n) if has_set else None
        doc = _json_doc(probes_raw[i])
        if doc is not None:
            health[q] = doc
    members = {
        q: sorted(m.decode(errors="replace") if isinstance(m, bytes) else str(m) for m in ms)
        for q, ms in zip(QUEUES, replies[3 + 2 * len(QUEUES) :], strict=True)
    }
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


def serving_types(config: Config, level: int = 3) -> tuple[str, ...]:
    """The types a worker of a model level loads: its fusion's, or all with preload: all."""
    if config.models.preload == "all":
        return MODEL_TYPES
    return tuple(config.models.fusion.for_level(level))


def expected_models(config: Config, level: int = 3) -> int:
    """Models each worker process of a model level loads: its fusion's types x 6."""
    return len(ARCHETYPES) * len(serving_types(config, level))


_files_cache: dict[tuple[Any, ...], dict[str, int]] = {}


def loadable_by_type(config: Config, level: int = 3) -> dict[str, int]:
    """Per type of the level's fusion, how many archetypes' files load and pass the
    family's checks, here. Cached per folder state (names, sizes, times), so a live screen
    refreshing every second loads them once."""
    from mltasks.errors import ModelError
    from mltasks.models.discovery import find
    from mltasks.models.loaded import load_model

    types = serving_types(config, level)
    present = []
    for a in ARCHETYPES:
        for t in types:
            found = find(config.models.dir, a, t)
            if found is None:
                continue
            try:
                st = found.path.stat()
            except OSError:
                continue
            present.append((a, t, found.path, st.st_size, st.st_mtime_ns))
    key = (str(config.models.dir.resolve()), *((str(p), s, m) for _, _, p, s, m in present))
    cached = _files_cache.get(key)
    if cached is not None:
        return dict(cached)
    counts = dict.fromkeys(types, 0)
    for a, t, p, _, _ in present:
        try:
            load_model(p, a, t, ["CPUExecutionProvider"])
        except ModelError:
            continue
        counts[t] += 1
    _files_cache.clear()
    _files_cache[key] = counts
    return dict(counts)


def count_loadable_models(config: Config, level: int = 3) -> int:
    """How many of a level's fusion files load here (used when no worker reports)."""
    return sum(loadable_by_type(config, level).values())


def _models(
    config: Config,
    health: Mapping[str, Mapping[str, Any]],
    live: Mapping[str, bool],
    count_files: Callable[[Config, int], int],
    serving: int = 3,
) -> ModelsInfo:
    """What the live model workers loaded.

    Their reports when they publish them (the fewest of them); when live workers do not
    report, the model files that load here; with no live model worker, nothing is loaded
    (the level's verdict says so already).
    """
    level = serving if serving in (1, 2, 3) else 3  # the models of the level in force
    expected = expected_models(config, level)
    fusion = {lv: dict(config.models.fusion.for_level(lv)) for lv in (1, 2, 3)}
    info = _models_count(config, health, live, count_files, expected, level)
    info.level, info.fusion = level, fusion
    if info.source == "files":
        with contextlib.suppress(Exception):  # onnxruntime missing here: counts unknown
            info.by_type = loadable_by_type(config, level)
    return info


def _models_count(
    config: Config,
    health: Mapping[str, Mapping[str, Any]],
    live: Mapping[str, bool],
    count_files: Callable[[Config, int], int],
    expected: int,
    level: int,
) -> ModelsInfo:
    model_queues = [q for q in ("gpu", "cpu") if live.get(q)]
    if not model_queues:
        return ModelsInfo(None, expected, "no live model worker")
    reported = [
        int(doc["models_loaded"])
        for q, doc in health.items()
        if q in model_queues and isinstance(doc.get("models_loaded"), int)
    ]
    if reported:
        return ModelsInfo(min(reported), expected, "workers")
    try:
        return ModelsInfo(count_files(config, level), expected, "files")
    except Exception as exc:  # onnxruntime missing or broken here: unknown, not a crash
        log.warning(
            "cannot count the model files: %s", exc, extra={"event": "status_models_unknown"}
        )
        return ModelsInfo(None, expected, "unknown")


def _gpu(health: Mapping[str, Mapping[str, Any]]) -> GpuInfo:
    """VRAM and presence from the gpu queue's probe report (else any report)."""
    doc = health.get("gpu") or next(iter(health.values()), None)
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


def best_reachable(live: Mapping[str, bool], gpu_present: bool | None) -> int:
    """The best level this deployment can serve at now (see the module's docstring)."""
    if live.get("gpu") and gpu_present:
        return Level.GPU_FP16
    if live.get("gpu") or live.get("cpu"):
        return Level.CPU
    if live.get("rules"):
        return Level.RULES
    return Level.TRADITIONAL


def assess(status: Status, config: Config) -> list[tuple[str, str]]:
    """(indicator, why) per reason the service is degraded. Pure: reads the snapshot only."""
    problems: list[tuple[str, str]] = []
    lv = status.level
    if lv is not None:
        if lv.level >= Level.TRADITIONAL:
            problems.append(("level", "level 5: every request gets 255 (traditional AI)"))
        elif lv.serving != lv.level:
            queue = LEVEL_QUEUE[lv.level]
            problems.append(
                (
                    "level",
                    f"no live worker on queue {queue!r} for level {lv.level}: "
                    f"served at level {lv.serving}",
                )
            )
        if lv.level < Level.TRADITIONAL and lv.level > lv.ceiling:
            problems.append(
                ("level", f"level {lv.level} is worse than the reachable level {lv.ceiling}")
            )
    for queue, w in status.workers.items():
        for member, why in sorted(w.not_serving.items()):
            problems.append(("workers", f"worker {member} does not serve {queue!r}: {why}"))
    m = status.models
    if m is not None and m.loaded is not None and m.loaded < m.expected:
        problems.append(("models", f"{m.loaded}/{m.expected} models load ({m.source})"))
    deadline = config.inference.max_latency_ms
    lat = status.latency
    if lat is not None and lat.p99_ms is not None and lat.p99_ms > deadline:
        problems.append(
            ("latency", f"p99 latency {lat.p99_ms:.0f} ms above the {deadline} ms deadline")
        )
    q = status.queue
    if q is not None and q.lag_ms is not None and q.lag_ms > deadline:
        problems.append(("queue", f"queue lag {q.lag_ms:.0f} ms above the {deadline} ms deadline"))
    return problems


def collect(
    config: Config | None = None,
    *,
    window_s: int = 300,
    timeout_s: float = 2.0,
    count_files: Callable[[Config, int], int] = count_loadable_models,
) -> Status:
    """Read every source once; a source that fails is recorded, never raised."""
    cfg = config or get_config()
    now = time.time()
    status = Status(
        checked_at=now,
        postgres=Reach(cfg.database.safe_dsn),
        redis=Reach(_redis_target(cfg)),
    )
    view: _RedisView | None = None
    try:
        view = _read_redis(cfg, timeout_s, window_s, now)
        status.redis.reachable = True
    except (redis.RedisError, OSError) as exc:
        status.redis.error = f"{type(exc).__name__}: {exc}"
    try:
        status.queue, status.latency = _read_postgres(cfg, timeout_s, window_s)
        status.postgres.reachable = True
    except (psycopg.Error, OSError) as exc:
        status.postgres.error = f"{type(exc).__name__}: {str(exc).strip()}"
    live: dict[str, bool] = {}
    health: dict[str, dict[str, Any]] = {}
    if view is not None:
        live = {q: view.beats[q] is not None for q in QUEUES}
        health = {q: doc for q, doc in view.health.items() if live.get(q)}
        status.workers = {
            q: WorkerInfo(
                live[q],
                view.counts[q],
                None if view.beats[q] is None else round((view.beats[q] or 0.0) * 1000, 1),
                view.members.get(q, []) if live[q] else [],
                view.problems.get(q, {}),
            )
            for q in QUEUES
        }
        status.cache = view.cache
        if status.queue is None:
            status.queue = QueueInfo()
        status.queue.broker = view.broker
        status.gpu = _gpu(health)
        level, reason, since = view.level
        status.level = LevelInfo(
            level=level,
            name=LEVEL_NAMES.get(level, "?"),
            reason=reason,
            since=since,
            serving=route(level, live),
            ceiling=best_reachable(live, status.gpu.present),
        )
    serving = status.level.serving if status.level is not None else 3
    status.models = _models(cfg, health, live, count_files, serving)
    status.versions = _versions(cfg, timeout_s if status.redis.reachable else None)
    if status.exit_code != UNREACHABLE or any(w.not_serving for w in status.workers.values()):
        found = assess(status, cfg)
        status.problems = [why for _, why in found]
        status.failing = sorted({what for what, _ in found})
    log.debug(
        "status %s",
        status.verdict,
        extra={"event": "status_collected", "verdict": status.verdict},
    )
    return status


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


def version_rows(status: Status) -> list[tuple[str, str, str]]:
    """One line per deployed model: what serves, the candidate and its canary, the last
    rollback."""
    out: list[tuple[str, str, str]] = []
    now = status.checked_at
    for v in status.versions:
        if "error" in v:
            out.append((v["model"], v["error"], "fail"))
            continue
        a = v["active"]
        value = f"{a['version']} active since {_ago(now - float(a['since']))} ({a['via']})"
        c = v.get("candidate")
        if c:
            value += f"; candidate {c['version']} {c['state']}"
            rows_seen = (c.get("progress") or {}).get("rows")
            if c["state"] == "canary" and rows_seen is not None:
                value += f" {rows_seen:.0f}/{v['min_rows']} rows"
        rb = v.get("last_rollback")
        if rb:
            value += (
                f"; last rollback {rb['from']} -> {rb['to']} {_ago(now - float(rb['at']))}"
                f" ({rb['reason']})"
            )
        out.append((f"model {v['model']}", value, "-"))
    return out


# --- showing it ---------------------------------------------------------------------------


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s ago"
    if s < 7200:
        return f"{s // 60}m ago"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m ago"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def rows(status: Status) -> list[tuple[str, str, str]]:
    """(indicator, value, state) per line of the table; state is ok, warn, fail or -."""
    out: list[tuple[str, str, str]] = []
    failing = set(status.failing)

    def state(ok: bool | None) -> str:
        return "-" if ok is None else ("ok" if ok else "fail")

    for name, reach in (("PostgreSQL", status.postgres), ("Redis", status.redis)):
        value = reach.target if reach.reachable else f"{reach.target}: {reach.error}"
        out.append((name, value, state(reach.reachable)))

    m = status.models
    if m is not None:
        shown = "-" if m.loaded is None else str(m.loaded)
        ok = None if m.loaded is None else "models" not in failing
        out.append(("models loaded", f"{shown}/{m.expected} ({m.source})", state(ok)))
        if m.by_type:
            types = ", ".join(f"{t} {n}/{len(ARCHETYPES)}" for t, n in m.by_type.items())
            out.append((f"models of level {m.level}", types, "-"))
        for number, weights in sorted(m.fusion.items()):
            members = ", ".join(f"{t} {w:g}" for t, w in weights.items())
            out.append((f"fusion level {number}", members, "-"))

    lv = status.level
    if lv is None:
        out.append(("fallback level", "unknown (Redis unreachable)", "-"))
    else:
        since = (
            "no level recorded: start level"
            if lv.since is None
            else f"since {datetime.fromtimestamp(lv.since):%H:%M:%S} "
            f"({_ago(status.checked_at - lv.since)})"
        )
        value = f"{lv.level} {lv.name}; {since}; reason: {lv.reason or '-'}"
        if lv.serving != lv.level:
            value += f"; served at {lv.serving}"
        value += f"; best reachable {lv.ceiling}"
        ok = "level" not in failing
        out.append(("fallback level", value, state(ok)))

    if status.redis.reachable:
        cache = ", ".join(f"{k} {v:.0%}" for k, v in sorted(status.cache.items()))
        out.append(("cache hit rate", cache or "no lookups yet", "-"))

    lat = status.latency
    if lat is not None:
        label = f"latency ({lat.window_s // 60} min)" if lat.window_s >= 60 else "latency"
        if lat.answered:
            value = (
                f"avg {_ms(lat.avg_ms)}, p99 {_ms(lat.p99_ms)}, max {_ms(lat.max_ms)}; "
                f"{lat.answered} answers, {lat.answered_255} of them 255; "
                f"deadline {lat.deadline_ms} ms"
            )
            ok = "latency" not in failing
            out.append((label, value, state(ok)))
        else:
            out.append((label, "no answers in the window", "-"))

    g = status.gpu
    if g is not None:
        if g.present is None:
            value = "unknown (no probe report)"
        elif not g.present:
            value = f"no GPU ({g.status})" if g.status not in ("", "no GPU") else "no GPU"
        elif g.vram_used_bytes is not None and g.vram_total_bytes:
            used, total = g.vram_used_bytes, g.vram_total_bytes
            value = f"{_gib(used)} / {_gib(total)} ({used / total:.0%})"
        else:
            value = f"GPU present, VRAM unknown ({g.status})"
        out.append(("VRAM", value, "-"))

    q = status.queue
    if q is not None and (q.pending is not None or q.broker):
        parts = []
        if q.pending is not None:
            parts.append(f"{q.pending} pending, {q.processing} processing, lag {_ms(q.lag_ms)}")
        if q.broker:
            parts.append("broker " + ", ".join(f"{k} {v}" for k, v in q.broker.items()))
        ok = None if q.lag_ms is None else "queue" not in failing
        out.append(("queue", "; ".join(parts), state(ok)))

    out += serving_rows(status)
    out += version_rows(status)
    return out


# The tiers of the ladder: (row label, queue, levels) - what serves each level.
TIERS: Final[tuple[tuple[str, str, tuple[int, ...]], ...]] = (
    ("levels 1-2 GPU", "gpu", (1, 2)),
    ("level 3 CPU", "cpu", (3,)),
    ("level 4 rules", "rules", (4,)),
)


def serving_rows(status: Status) -> list[tuple[str, str, str]]:
    """What serves each level, truthfully: a worker listening on ``gpu`` without a GPU does
    not serve levels 1-2 (their batches would run on its CPU); one process listening on
    several queues is one process, and said so."""
    if not status.workers:
        return []
    out: list[tuple[str, str, str]] = []
    current = None if status.level is None else LEVEL_QUEUE.get(status.level.level)
    gpu = status.gpu
    for label, queue, _ in TIERS:
        w = status.workers.get(queue)
        ok = True
        if w is None or not w.live:
            value, ok = f"nothing: no live worker on queue {queue}", False
        else:
            n = w.count if w.count is not None else len(w.processes) or None
            who = "a worker" if n is None else f"{n} worker" + ("s" if n != 1 else "")
            shared = sorted(
                other
                for other, ow in status.workers.items()
                if other != queue and set(ow.processes) & set(w.processes)
            )
            also = ""
            if shared:
                same = "the same process" if len(w.processes) == 1 else "the same processes"
                also = f" ({same} as {' and '.join(shared)})"
            if queue == "gpu" and gpu is not None and gpu.present is False:
                ok = False
                value = f"nothing: {who} on queue gpu{also}, but no GPU"
                if gpu.status not in ("", "no GPU"):
                    value += f" ({gpu.status})"
            else:
                value = f"{who} on queue {queue}{also}, heartbeat {_ms(w.heartbeat_age_ms)} ago"
                if queue == "gpu" and (gpu is None or gpu.present is None):
                    value += "; GPU unknown (no probe report)"
        if w is not None and w.not_serving:
            whys = sorted(set(w.not_serving.values()))
            value += f"; {len(w.not_serving)} not serving: " + "; ".join(whys)
            ok = ok and len(w.not_serving) < (w.count or len(w.processes) or 1)
        needed = current == queue
        out.append((label, value, ("ok" if ok else "fail") if needed else "-"))
    out.append(("level 5 255", "the bridge itself (the game's traditional AI)", "-"))
    return out


def render(status: Status) -> Any:
    """The status as a rich Table (title: the verdict; a line per problem below)."""
    from rich.table import Table
    from rich.text import Text

    colours = {"healthy": "green", "degraded": "yellow", "unreachable": "red"}
    title = Text(f"mltasks status: {status.verdict}", style=f"bold {colours[status.verdict]}")
    table = Table(title=title, show_header=True, header_style="bold", expand=False)
    table.add_column("indicator", no_wrap=True)
    table.add_column("value")
    table.add_column("", no_wrap=True)
    marks = {"ok": Text("ok", "green"), "fail": Text("FAIL", "bold red"), "-": Text("")}
    for name, value, state in rows(status):
        table.add_row(name, value, marks.get(state, Text(state)))
    if status.problems:
        table.caption = "; ".join(status.problems)
        table.caption_style = "yellow"
    return table


def summary_line(status: Status) -> str:
    """One line for logs and non-terminal screens."""
    parts = [status.verdict]
    if status.level is not None:
        parts.append(f"level {status.level.level}")
    if status.models is not None and status.models.loaded is not None:
        parts.append(f"models {status.models.loaded}/{status.models.expected}")
    if status.latency is not None and status.latency.answered:
        parts.append(f"p99 {_ms(status.latency.p99_ms)} over {status.latency.answered}")
    if status.queue is not None and status.queue.pending is not None:
        parts.append(f"pending {status.queue.pending}")
    if status.problems:
        parts.append("; ".join(status.problems))
    return ", ".join(parts)


# --- the command --------------------------------------------------------------------------


def add_parser(subparsers: Any) -> None:
    """Add ``status`` to the ``mltasks`` command."""
    p = subparsers.add_parser(
        "status",
        help="healthy or degraded, and why (exit 0 healthy, 1 degraded, 2 unreachable)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    p.add_argument(
        "--window",
        type=float,
        default=5.0,
        metavar="MINUTES",
        help="latency and cache hit rates over this many minutes (default 5)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="per server: connect and statement timeout (default 2)",
    )
    p.set_defaults(func=status_command)


def status_command(args: argparse.Namespace, out: Any = None) -> int:
    """Print the status (a table, or JSON with ``--json``); the exit code says the verdict."""
    stream = out or sys.stdout
    window_s = max(1, int(args.window * 60))
    status = collect(get_config(), window_s=window_s, timeout_s=max(0.1, args.timeout))
    if args.json:
        stream.write(json.dumps(status.to_dict(), indent=2) + "\n")
    else:
        from rich.console import Console

        Console(file=stream, width=max(100, _width(stream))).print(render(status))
    return status.exit_code


def _width(stream: Any) -> int:
    import shutil

    return shutil.get_terminal_size((120, 24)).columns if stream.isatty() else 120


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mltasks.ops.status`` (the same as ``mltasks status``)."""
    parser = argparse.ArgumentParser(prog="mltasks")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["status", *(sys.argv[1:] if argv is None else argv)])
    try:
        result: int = args.func(args)
    except MLTasksError as exc:  # an invalid configuration: one line, as from `mltasks`
        print(f"mltasks: {exc}", file=sys.stderr)
        return UNREACHABLE
    return result


if __name__ == "__main__":
    sys.exit(main())
