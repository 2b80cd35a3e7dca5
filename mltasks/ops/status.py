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
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import psycopg
import redis

from mltasks.config import Config, get_config
from mltasks.errors import MLTasksError
from mltasks.fallback.ladder import LADDER, LEVEL_QUEUE, QUEUE_TIER, QUEUES, Level, route
from mltasks.ops.status_models import _models, count_loadable_models
from mltasks.ops.status_render import render, rows
from mltasks.ops.status_snapshot import (
    DEGRADED,
    HEALTHY,
    LEVEL_NAMES,
    UNREACHABLE,
    LevelInfo,
    QueueInfo,
    Reach,
    Status,
    WorkerInfo,
)
from mltasks.ops.status_sources import (
    _gpu,
    _read_postgres,
    _read_redis,
    _redis_target,
    _RedisView,
    _served,
    _versions,
)

# What a caller of the command's module reads: the snapshot (`collect`, `Status`), its
# verdict (`assess`, the exit codes) and its table (`rows`, `render`, from status_render).
__all__ = [
    "DEGRADED",
    "HEALTHY",
    "UNREACHABLE",
    "Status",
    "add_parser",
    "assess",
    "best_reachable",
    "collect",
    "main",
    "render",
    "rows",
    "status_command",
]

log = logging.getLogger(__name__)


def best_reachable(live: Mapping[str, bool], gpu_present: bool | None) -> int:
    """The best level this deployment can serve at now (see the module's docstring)."""
    tiers = {QUEUE_TIER[q] for q in QUEUES if live.get(q)}
    if "gpu" in tiers and not gpu_present:
        tiers.add("cpu")  # a GPU worker without a GPU runs the CPU tier's models
    return next(
        (r.level for r in LADDER if r.tier in tiers and (r.tier != "gpu" or gpu_present)),
        Level.TRADITIONAL,
    )


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
    if status.redis.reachable:
        status.served = _served(cfg, timeout_s)
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
    p.set_defaults(func=status_command, yield_cpu=10)  # nice (mltasks.models.deploy)


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
