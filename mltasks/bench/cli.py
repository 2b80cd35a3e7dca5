"""``mltasks bench``: gateway, bulk, cache and precisions benchmarks.

- ``gateway``: emulated map servers (the game's exact statements, closed loop) against
  the service and, with ``--floor``, against the floor, alternating at each client count.
- ``bulk``: open-loop fixed-rate load written with COPY, latency from the database's
  clocks; ``--find-sustained`` steps the rate up until a step fails.
- ``cache``: bulk load drawn from a small pool of states (repeats), cache on then off,
  with the hit rate of each cache layer.
- ``precisions``: fp32 / int8 / fp16 inference time on the CPU.

Every run starts its responder fresh, on emptied tables and flushed Redis databases
(9 broker, 10 cache: whatever else they hold is lost, so give --redis-url a Redis that is
not the game's), so the runs of one report differ only in what they compare.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import redis

from mltasks.bench import BenchError, bulkreport
from mltasks.bench import inserts as inserts_mod
from mltasks.bench import models as models_mod
from mltasks.bench import precisions as precisions_mod
from mltasks.bench.bulkrun import (
    StepOptions,
    find_sustained,
    fixed_rates,
    guarded_step,
    ours_markers_for,
)
from mltasks.bench.capacity import OpsMeter
from mltasks.bench.database import (
    DEFAULT_BENCH_URL,
    recreate_database,
    reset_tables,
    run_stats,
    server_version,
)
from mltasks.bench.gateway import DEFAULT_POLL_MS, GatewaySpec, run_gateway
from mltasks.bench.report import (
    CpuMeter,
    OthersMeter,
    gateway_plots,
    machine,
    markdown,
    ratios,
    summarize,
)
from mltasks.bench.responders import (
    Responder,
    Running,
    floor_responder,
    model_floor_responder,
    service_responder,
)
from mltasks.bench.service import LEVELS, POOLS, Pool, ServiceSettings, default_pool
from mltasks.errors import MLTasksError
from mltasks.state import DEFAULT_LAYOUT, LAYOUT_NAMES

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379"


def _counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,8,32, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("the numbers must be positive")
    return counts


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected rates like 500,1000, got {text!r}") from None
    if not rates or min(rates) <= 0:
        raise argparse.ArgumentTypeError("rates must be positive")
    return rates


def _level(text: str) -> int:
    levels = _levels(text)
    if len(levels) != 1:
        raise argparse.ArgumentTypeError(f"one level, got {text!r}")
    return levels[0]


def _levels(text: str) -> list[int]:
    levels = _counts(text)
    bad = [lv for lv in levels if lv not in LEVELS]
    if bad:
        raise argparse.ArgumentTypeError(f"levels must be among {LEVELS}, got {bad}")
    return levels


def _pool(text: str) -> Pool:
    for pool in POOLS:
        if text == pool:
            return pool
    raise argparse.ArgumentTypeError(f"a pool is one of {POOLS}, got {text!r}")


def _pools(text: str) -> list[Pool]:
    return [_pool(x.strip()) for x in text.split(",") if x.strip()]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, help="report directory (default bench-results/<time>)")
    p.add_argument("--models-dir", type=Path, help="demo models are written here if missing")
    p.add_argument(
        "--database-url",
        default=DEFAULT_BENCH_URL,
        help="benchmark database (dropped and recreated; its name must say bench)",
    )
    p.add_argument(
        "--redis-url",
        default=DEFAULT_REDIS_URL,
        help="Redis server; every run flushes (empties) its db 9 (broker) and 10 (cache): "
        "never the game's Redis",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--layout",
        choices=LAYOUT_NAMES,
        default=DEFAULT_LAYOUT,
        help="state layout the emulated game sends and the service reads (default: %(default)s)",
    )


def _service_options(p: argparse.ArgumentParser, *, level_list: bool) -> None:
    g = p.add_argument_group("service configuration")
    g.add_argument(
        "--pool",
        type=_pools if level_list else _pool,
        default=[default_pool()] if level_list else default_pool(),
        help=f"Celery worker pool, one of {', '.join(POOLS)} (default: solo, "
        "one solo worker per --concurrency)" + (", several as solo,prefork" if level_list else ""),
    )
    g.add_argument(
        "--concurrency",
        type=int,
        default=2,
        help="worker pool size; with --pool solo, the number of solo worker processes",
    )
    g.add_argument(
        "--cache",
        choices=("on", "off"),
        default="on",
        help="caching.enabled of the service",
    )
    g.add_argument(
        "--level",
        type=_levels if level_list else _level,
        default=[None] if level_list else None,
        help="fallback level forced and held: 3 cpu worker, 4 '-Q rules' worker, 5 bridge "
        "only (answers 255)" + (", several as 3,4,5" if level_list else "") + "; default: "
        "none forced, the service as deployed (its probes may move the level)",
    )
    g.add_argument(
        "--degrade",
        action="store_true",
        help="with --level: still let the probes and failure counters move the level",
    )


def _bulk_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mobs",
        type=int,
        default=1,
        help="with --states: mob ids per state, one drawn per request (L2 keys on the mob, "
        "L3 on the archetype)",
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load per step")
    p.add_argument("--tick-ms", type=float, default=5.0, help="one COPY batch per tick")
    p.add_argument(
        "--timeout-ms", type=int, default=100, help="the bridge's deadline (the game's timeout)"
    )
    p.add_argument("--p99-ms", type=float, default=50.0, help="a step holds with p99 within")
    p.add_argument("--min-answered", type=float, default=0.99, help="... and this share answered")
    p.add_argument(
        "--drain-s", type=float, default=20.0, help="wait at most this for the last answers"
    )


def add_parser(subparsers: Any) -> None:
    """Add ``bench gateway|bulk|cache|precisions`` to the ``mltasks`` command."""
    bench = subparsers.add_parser(
        "bench",
        help="benchmarks (they recreate their database and flush Redis dbs 9 and 10)",
        description=__doc__,
    )
    sub = bench.add_subparsers(dest="bench_cmd", required=True)
    raw = argparse.RawDescriptionHelpFormatter

    gw = sub.add_parser(
        "gateway",
        help="emulated map servers against the service (and the floor)",
        description="Emulated map servers (closed loop, the game's statements) against "
        "the service and, with --floor, the floor, alternating at each client count.",
        formatter_class=raw,
    )
    gw.add_argument("--clients", type=_counts, default=[1, 8, 32], help="e.g. 1,8,32")
    gw.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    gw.add_argument("--timeout-ms", type=int, default=100, help="the game's ml_max_latency_ms")
    gw.add_argument(
        "--floor",
        nargs="?",
        const="plain",
        choices=("plain", "model", "both"),
        help="also run a floor: plain (a fixed answer in one statement; the default), model "
        "(the same models and fusion in one process, no broker), or both",
    )
    gw.add_argument("--no-service", action="store_true", help="skip the service runs")
    gw.add_argument(
        "--bridges", type=int, default=1, help="bridge processes of the service (default: 1)"
    )
    gw.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes of the service, each with --pool/--concurrency (default: "
        "--concurrency solo workers, or one prefork worker)",
    )
    gw.add_argument("--processes", type=int, default=2, help="client processes")
    gw.add_argument(
        "--literal-sql",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="poll with unprepared text, as the C++ client does (the default); "
        "--no-literal-sql prepares the statements (costs the client less)",
    )
    _common(gw)
    _service_options(gw, level_list=False)
    gw.set_defaults(func=gateway_command)

    bulk = sub.add_parser(
        "bulk",
        help="open-loop fixed-rate load with COPY; the sustained rate",
        description=__doc__,
        formatter_class=raw,
    )
    bulk.add_argument(
        "--rate",
        type=_rates,
        default=[500.0],
        help="requests/s, several as 500,1000; with --find-sustained the first is where "
        "the search starts (several: the rates to climb)",
    )
    bulk.add_argument(
        "--find-sustained",
        action="store_true",
        help="step the rate up until p99 > --p99-ms or answered < --min-answered",
    )
    bulk.add_argument("--step-factor", type=float, default=1.5, help="rate multiplier per step")
    bulk.add_argument("--refine", type=int, default=2, help="bisection steps after a failure")
    bulk.add_argument(
        "--retries",
        type=int,
        default=1,
        help="run a failed step again this often; it holds if any attempt held",
    )
    bulk.add_argument("--max-rate", type=float, default=40000.0, help="stop climbing here")
    bulk.add_argument(
        "--floor",
        nargs="?",
        const="plain",
        choices=("plain", "model", "both"),
        help="also run a floor, alternating: plain (the default), model (the same models in "
        "one process, no broker; compared to the plain floor like a service), or both",
    )
    bulk.add_argument("--no-service", action="store_true", help="skip the service runs")
    bulk.add_argument(
        "--states",
        type=int,
        default=0,
        help="0: every request a distinct state; N: drawn from N states (repeats)",
    )
    _bulk_options(bulk)
    _common(bulk)
    _service_options(bulk, level_list=True)
    bulk.set_defaults(func=bulk_command)

    cache = sub.add_parser(
        "cache",
        help="load from a small pool of states: cache on, then off, hit rate per layer",
        description="Open-loop load drawn from --states distinct states (repeats, so caches "
        "can hit) against the service with caching on, then off (and the floor with "
        "--floor), alternating; hit rate per cache layer from the workers' counters.",
    )
    cache.add_argument("--states", type=int, default=500, help="distinct states drawn from")
    cache.add_argument("--rate", type=_rates, default=[1000.0], help="requests/s")
    cache.add_argument("--floor", action="store_true", help="also run the floor")
    _bulk_options(cache)
    _common(cache)
    g = cache.add_argument_group("service configuration")
    g.add_argument("--pool", choices=POOLS, default=default_pool())
    g.add_argument("--concurrency", type=int, default=2)
    g.add_argument(
        "--level",
        type=int,
        choices=(3,),
        default=None,
        help="force and hold level 3 (default: the service as deployed)",
    )
    g.add_argument("--degrade", action="store_true", help="with --level: let it move")
    cache.set_defaults(func=cache_command)

    prec = sub.add_parser(
        "precisions",
        help="fp32 / int8 / fp16 inference time on the CPU",
        description=precisions_mod.__doc__,
        formatter_class=raw,
    )
    prec.add_argument("--batch", type=_counts, default=[1, 32, 128], help="batch sizes")
    prec.add_argument("--repeats", type=int, default=100, help="calls per model and batch")
    prec.add_argument("--threads", type=int, default=1, help="intra-op threads per session")
    prec.add_argument("--out", type=Path, help="report directory (default bench-results/<time>)")
    prec.add_argument("--models-dir", type=Path, help="demo models are written here if missing")
    prec.set_defaults(func=precisions_command)

    mod = sub.add_parser(
        "models",
        help="cost of each model type and each level's fusion (CPU; GPU where present)",
        description=models_mod.__doc__,
        formatter_class=raw,
    )
    mod.add_argument("--models-dir", type=Path, help="default: the config's models.dir")
    mod.add_argument(
        "--profile",
        choices=("demo", "phase11"),
        default="demo",
        help="written into --models-dir when it holds no models (default: %(default)s)",
    )
    mod.add_argument("--archetype", default="aggressive", help="(default: %(default)s)")
    mod.add_argument("--batch", type=_counts, default=[1, 8, 32, 128], help="(default: 1,8,32,128)")
    mod.add_argument("--threads", type=_counts, default=[1, 2], help="(default: 1,2)")
    mod.add_argument(
        "--precision",
        default="fp16,fp32,int8",
        help="CPU precisions to time (default: %(default)s)",
    )
    mod.add_argument("--repeats", type=int, default=30, help="calls per cell at most")
    mod.add_argument("--budget-s", type=float, default=2.0, help="seconds per cell at most")
    mod.add_argument("--out", type=Path, help="report directory (default bench-results/<time>)")
    mod.set_defaults(func=models_command)

    from mltasks.bench import chaos as chaos_mod

    ch = sub.add_parser(
        "chaos",
        help="the whole service under kill -9 and SIGSTOP faults, bounded in time",
        description=chaos_mod.__doc__,
        formatter_class=raw,
    )
    ch.add_argument("--duration", type=float, default=120.0, help="seconds of load and faults")
    ch.add_argument("--clients", type=int, default=4, help="emulated map servers")
    ch.add_argument("--timeout-ms", type=int, default=100, help="the game's timeout (deadline)")
    ch.add_argument("--fault-every", type=float, default=5.0, help="seconds between faults")
    ch.add_argument("--stop-s", type=float, default=3.0, help="how long SIGSTOP lasts")
    ch.add_argument(
        "--faults",
        default=",".join(chaos_mod.FAULTS),
        help="faults, in turn (default: %(default)s)",
    )
    ch.add_argument("--keep-database", action="store_true", help="leave the database behind")
    ch.add_argument(
        "--cpu-load-per-core",
        type=float,
        default=None,
        help="the service's fallback.cpu_load_per_core (default: its configured 2); a "
        "shared host's own load moves the level otherwise",
    )
    ch.add_argument("--out", type=Path, help="report directory (default bench-results/<time>)")
    ch.add_argument("--models-dir", type=Path, help="demo models are written here if missing")
    ch.add_argument(
        "--database-url",
        default=DEFAULT_BENCH_URL.replace("mltasks_bench", "mltasks_bench_chaos"),
        help="the run's database (dropped and recreated; its name must say bench)",
    )
    ch.add_argument("--seed", type=int, default=0)
    ch.set_defaults(func=chaos_command)

    ins = sub.add_parser(
        "inserts",
        help="the game's INSERT rate and latency with and without the NOTIFY trigger",
        description=inserts_mod.__doc__,
        formatter_class=raw,
    )
    ins.add_argument("--clients", type=_counts, default=[8, 32], help="(default: 8,32)")
    ins.add_argument("--duration", type=float, default=5.0, help="seconds per run (default: 5)")
    ins.add_argument("--rounds", type=int, default=2, help="on/off pairs per client count")
    ins.add_argument(
        "--database-url",
        default=DEFAULT_BENCH_URL,
        help="benchmark database (dropped and recreated; its name must say bench)",
    )
    ins.add_argument("--out", type=Path, help="report directory (default bench-results/<time>)")
    ins.set_defaults(func=inserts_command)


def ensure_models(models_dir: Path, layout: str = DEFAULT_LAYOUT) -> Path:
    """The demo models in ``models_dir``, written only into a folder that holds none (any
    model a discovery finds, in either name, counts: never write over someone's models)."""
    from mltasks.models.discovery import discover

    found, _ = discover(models_dir)
    if found:
        return models_dir
    from mltasks.models.demo import write_demo_models

    t0 = time.perf_counter()
    write_demo_models(models_dir, layout=layout)
    _say(f"wrote 54 demo models into {models_dir} in {time.perf_counter() - t0:.1f}s")
    return models_dir


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _command_line() -> str:
    """The command as typed, for the report (when run through the ``mltasks`` script)."""
    if Path(sys.argv[0]).name == "mltasks":
        return shlex.join(["mltasks", *sys.argv[1:]])
    return shlex.join(["python", "-m", "mltasks", *sys.argv[1:]])


def _out_dir(args: argparse.Namespace, started: datetime) -> Path:
    out: Path = args.out or Path("bench-results") / started.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    return out


@contextmanager
def _workspace(args: argparse.Namespace) -> Iterator[tuple[Path, Path]]:
    """A temporary work directory and the models directory (written there if not given)."""
    with tempfile.TemporaryDirectory(prefix="mltasks-bench-") as tmp:
        work = Path(tmp)
        models = args.models_dir or work / "models"
        yield work, ensure_models(models, getattr(args, "layout", DEFAULT_LAYOUT))


def _settings(
    args: argparse.Namespace,
    work: Path,
    models_dir: Path,
    logs: Path,
    *,
    level: int | None,
    caching: bool,
    pool: Pool | None = None,
) -> ServiceSettings:
    return ServiceSettings(
        database_url=args.database_url,
        redis_url=args.redis_url,
        models_dir=models_dir,
        work_dir=work,
        log_dir=logs,
        timeout_ms=args.timeout_ms,
        concurrency=args.concurrency,
        pool=pool or args.pool,
        caching=caching,
        level=level,
        hold_level=not args.degrade,
        layout=args.layout,
        bridges=getattr(args, "bridges", 1),
        workers=getattr(args, "workers", None),
    )


# -- gateway ------------------------------------------------------------------------------


def _one_run(
    responder: str,
    start: Callable[[], AbstractContextManager[Running]],
    spec: GatewaySpec,
    markers: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Start a responder, run the clients on an empty table, read what the table saw."""
    reset_tables(spec.conninfo)
    with start() as running:
        reset_tables(spec.conninfo)  # the warm-up request is not part of the run
        load_before = os.getloadavg()[0]
        machine_cpu = CpuMeter()
        others = OthersMeter(markers)
        responder_cpu = running.cpu_seconds()
        svc = running.service
        ops = OpsMeter(spec.conninfo, svc.settings.redis_url if svc else None, running.procs)
        result = run_gateway(spec)
        responder_cpu = running.cpu_seconds() - responder_cpu
        per_decision = ops.per_decision(len(result.latencies_ms))
        machine_busy = machine_cpu.busy_share()
        others_share = others.share()
        stats = run_stats(spec.conninfo)
        level_after = running.service.level_now() if running.service is not None else None
    cores = os.cpu_count() or 1
    run: dict[str, Any] = {
        "responder": responder,
        **summarize(result),
        "responder_cpu_s": round(responder_cpu, 2),
        "responder_cpu_share_of_machine": round(responder_cpu / (result.elapsed_s * cores), 3),
        # Everything on the machine: clients, responder, PostgreSQL, Redis, and anyone else.
        "machine_cpu_busy_share": machine_busy,
        "others_cpu_share": others_share,
        "load_average_before": round(load_before, 2),
        "database": stats,
        # docs/SCALING.md's inputs: CPU per role, Redis commands, PostgreSQL work
        "per_decision": per_decision,
        **running.info,
    }
    if level_after is not None:
        run["level_after"] = level_after
    lat = run["latency_ms"]
    _say(
        f"{responder:>7} x{spec.clients:<3} {run['decisions_per_s']:>8} decisions/s, "
        f"{run['in_time_share'] * 100:5.1f}% in time, p50 {lat['p50']} ms, p99 {lat['p99']} ms, "
        f"255 {run['share_255'] * 100:.1f}%, parse failures {run['parse_failures']}, "
        f"errors {run['errors']}, load {run['load_average_before']}, "
        f"others {run['others_cpu_share'] * 100:.0f}%"
    )
    return run


def _guarded_run(
    responder: str,
    start: Callable[[], AbstractContextManager[Running]],
    spec: GatewaySpec,
    markers: tuple[str, ...] = (),
) -> dict[str, Any]:
    """A run that fails is reported as failed; the other runs still count."""
    try:
        return _one_run(responder, start, spec, markers)
    except (MLTasksError, psycopg.Error, redis.RedisError, OSError) as exc:
        _say(f"{responder:>7} x{spec.clients:<3} FAILED: {exc}")
        return {"responder": responder, "clients": spec.clients, "failed": str(exc)}


def gateway_command(args: argparse.Namespace) -> int:
    """Run the benchmark, write report.json, report.md and the plots, print the table."""
    started = datetime.now().astimezone()
    if args.no_service and not args.floor:
        raise BenchError("nothing to run: --no-service without --floor")
    out = _out_dir(args, started)
    url = args.database_url
    logs = out / "logs"
    runs: list[dict[str, Any]] = []
    recreate_database(url)
    with _workspace(args) as (work, models_dir):
        settings = _settings(
            args, work, models_dir, logs, level=args.level, caching=args.cache == "on"
        )
        responders: list[Responder] = []
        if args.floor in ("plain", "both"):
            responders.append(floor_responder(url, logs))
        if args.floor in ("model", "both"):
            responders.append(model_floor_responder(settings, logs))
        if not args.no_service:
            responders.append(service_responder(settings))
        for clients in args.clients:
            spec = GatewaySpec(
                conninfo=url,
                clients=clients,
                duration_s=args.duration,
                timeout_ms=args.timeout_ms,
                processes=args.processes,
                seed=args.seed,
                literal_sql=args.literal_sql,
                layout=args.layout,
            )
            for r in responders:
                name = r.name if r.name in ("floor", "model floor") else "service"
                runs.append(
                    _guarded_run(name, r.start, spec, ours_markers_for(url, args.redis_url))
                )
    report: dict[str, Any] = {
        "started_at": started.isoformat(timespec="seconds"),
        "command": _command_line(),
        "duration_s": args.duration,
        "timeout_ms": args.timeout_ms,
        "poll_ms": DEFAULT_POLL_MS,
        "literal_sql": args.literal_sql,
        "client_processes": args.processes,
        "service": settings.describe(),
        "machine": machine(),
        "postgres": server_version(url),
        "runs": runs,
        "ratios": ratios(runs),
    }
    report["plots"] = gateway_plots(report, out)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (out / "report.md").write_text(md)
    print(md)
    _say(f"report written to {out}/report.md and report.json")
    return 0


# -- bulk and cache -----------------------------------------------------------------------


def _bulk_report(
    kind: str,
    args: argparse.Namespace,
    started: datetime,
    load_start: tuple[float, float, float],
    responders: list[Responder],
    runs: list[dict[str, Any]],
    sustained: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    return {
        "schema_version": bulkreport.SCHEMA_VERSION,
        "kind": kind,
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": _command_line(),
        "settings": {
            "duration_s": args.duration,
            "tick_ms": args.tick_ms,
            "timeout_ms": args.timeout_ms,
            "states": args.states,
            "mobs": args.mobs,
            "p99_limit_ms": args.p99_ms,
            "min_answered_share": args.min_answered,
            "drain_s": args.drain_s,
            "find_sustained": bool(getattr(args, "find_sustained", False)),
            "retries": getattr(args, "retries", 0),
            "rates": args.rate,
            "seed": args.seed,
        },
        "machine": machine(),
        "postgres": server_version(args.database_url),
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "responders": [{"name": r.name, **r.config} for r in responders],
        "runs": runs,
        "ratios": bulkreport.ratios(runs),
        "sustained": sustained,
        "plots": [],
    }


def _step_options(args: argparse.Namespace) -> StepOptions:
    return StepOptions(
        conninfo=args.database_url,
        duration_s=args.duration,
        tick_ms=args.tick_ms,
        states=args.states,
        mobs=args.mobs,
        seed=args.seed,
        drain_s=args.drain_s,
        p99_limit_ms=args.p99_ms,
        min_answered_share=args.min_answered,
        redis_url=args.redis_url,
        layout=args.layout,
    )


def _finish(
    report: dict[str, Any],
    out: Path,
    write: Callable[[dict[str, Any], Path], str] = bulkreport.write,
) -> int:
    """Write report.json and report.md (and plots) with ``write``, print the Markdown."""
    md = write(report, out)
    print(md)
    _say(f"report written to {out}/report.md and report.json")
    return 0


def _report(kind: str, started: datetime, **body: Any) -> dict[str, Any]:
    """A report's common head (what ran, when, where) and its body."""
    return {
        "kind": kind,
        "started_at": started.isoformat(timespec="seconds"),
        "command": _command_line(),
        "machine": machine(),
        **body,
    }


def bulk_command(args: argparse.Namespace) -> int:
    """Fixed rates, or the sustained rate, for the floor and each service configuration."""
    started = datetime.now().astimezone()
    load_start = os.getloadavg()
    if args.no_service and not args.floor:
        raise BenchError("nothing to run: --no-service without --floor")
    out = _out_dir(args, started)
    logs = out / "logs"
    recreate_database(args.database_url)
    with _workspace(args) as (work, models_dir):
        responders: list[Responder] = []
        if args.floor in ("plain", "both"):
            responders.append(floor_responder(args.database_url, logs))
        if args.floor in ("model", "both"):
            first = _settings(args, work, models_dir, logs, level=args.level[0], caching=False)
            responders.append(model_floor_responder(first, logs))
        if not args.no_service:
            seen: set[str] = set()
            for level in args.level:
                for pool in args.pool:
                    s = _settings(
                        args,
                        work,
                        models_dir,
                        logs,
                        level=level,
                        caching=args.cache == "on",
                        pool=pool,
                    )
                    if s.label() not in seen:  # level 5 has no pool: once
                        seen.add(s.label())
                        responders.append(service_responder(s))
        step = partial(guarded_step, opts=_step_options(args))
        sustained: dict[str, dict[str, Any]] = {}
        if args.find_sustained:
            runs, sustained = find_sustained(
                responders,
                start=args.rate[0],
                factor=args.step_factor,
                max_rate=args.max_rate,
                refine=args.refine,
                step=step,
                ladder=args.rate if len(args.rate) > 1 else (),
                retries=args.retries,
            )
        else:
            runs = fixed_rates(responders, args.rate, step)
    report = _bulk_report("bulk", args, started, load_start, responders, runs, sustained)
    return _finish(report, out)


def cache_command(args: argparse.Namespace) -> int:
    """The same repeated load against the service with caching on, then off."""
    started = datetime.now().astimezone()
    load_start = os.getloadavg()
    if args.states < 1:
        raise BenchError("--states must be at least 1: the load repeats states from a pool")
    out = _out_dir(args, started)
    logs = out / "logs"
    recreate_database(args.database_url)
    with _workspace(args) as (work, models_dir):
        responders: list[Responder] = []
        if args.floor:
            responders.append(floor_responder(args.database_url, logs))
        for caching in (True, False):
            s = _settings(args, work, models_dir, logs, level=args.level, caching=caching)
            responders.append(service_responder(s))
        runs = fixed_rates(responders, args.rate, partial(guarded_step, opts=_step_options(args)))
    report = _bulk_report("cache", args, started, load_start, responders, runs, {})
    return _finish(report, out)


# -- precisions ---------------------------------------------------------------------------


def inserts_command(args: argparse.Namespace) -> int:
    started = datetime.now().astimezone()
    out = _out_dir(args, started)
    rows = inserts_mod.run(args.database_url, args.clients, args.duration, args.rounds)
    return _finish(_report("inserts", started, runs=rows), out, inserts_mod.write)


def models_command(args: argparse.Namespace) -> int:
    import dataclasses
    import os

    from mltasks.config import get_config
    from mltasks.models.demo import write_demo_models

    started = datetime.now().astimezone()
    out = _out_dir(args, started)
    cfg = get_config()
    if args.models_dir is not None:
        cfg = dataclasses.replace(cfg, models=dataclasses.replace(cfg.models, dir=args.models_dir))
    if not any(cfg.models.dir.glob("*/*.onnx")):
        t0 = time.perf_counter()
        write_demo_models(cfg.models.dir, layout=cfg.state.layout, profile=args.profile)
        took = time.perf_counter() - t0
        _say(f"wrote the {args.profile} models into {cfg.models.dir} in {took:.0f}s")
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    config_file = os.environ.get("MLTASKS_CONFIG")
    results = models_mod.run(
        cfg,
        Path(config_file) if config_file else None,
        args.archetype,
        args.batch,
        args.threads,
        precisions,
        args.repeats,
        args.budget_s,
    )
    report = _report("models", started, schema_version=models_mod.SCHEMA_VERSION, results=results)
    return _finish(report, out, models_mod.write)


def precisions_command(args: argparse.Namespace) -> int:
    started = datetime.now().astimezone()
    out = _out_dir(args, started)
    with tempfile.TemporaryDirectory(prefix="mltasks-bench-") as tmp:
        models_dir = ensure_models(args.models_dir or Path(tmp) / "models")
        timings = precisions_mod.measure(models_dir, args.batch, args.repeats, args.threads)
    report = _report(
        "precisions", started, schema_version=precisions_mod.SCHEMA_VERSION, timings=timings
    )
    return _finish(report, out, precisions_mod.write)


# -- chaos --------------------------------------------------------------------------------


def chaos_command(args: argparse.Namespace) -> int:
    from mltasks.bench import chaos as chaos_mod

    faults = tuple(f for f in args.faults.split(",") if f)
    unknown = sorted(set(faults) - set(chaos_mod.FAULTS))
    if unknown:
        raise BenchError(f"--faults: unknown {unknown}; known: {', '.join(chaos_mod.FAULTS)}")
    if args.duration <= 0 or args.clients < 1:
        raise BenchError("--duration must be positive and --clients at least 1")
    started = datetime.now().astimezone()
    out = _out_dir(args, started)
    with _workspace(args) as (work, models_dir):
        opts = chaos_mod.ChaosOptions(
            database_url=args.database_url,
            models_dir=models_dir,
            duration_s=args.duration,
            clients=args.clients,
            timeout_ms=args.timeout_ms,
            fault_every_s=args.fault_every,
            stop_s=args.stop_s,
            faults=faults,
            seed=args.seed,
            keep_database=args.keep_database,
            cpu_load_per_core=args.cpu_load_per_core,
        )
        report = chaos_mod.run_chaos(opts, work, _say)
        logs = out / "logs"
        shutil.copytree(work / "logs", logs, dirs_exist_ok=True)
    report["command"] = _command_line()
    report["started_at"] = started.isoformat(timespec="seconds")
    chaos_mod.write_report(report, out)
    print(chaos_mod.summary(report))
    _say(f"report written to {out}/chaos.json and chaos.txt")
    return 0 if chaos_mod.passed(report) else 1
