"""``mltasks bench gateway``, ``bulk`` and ``cache``: responders (the service as deployed,
the floors) compared under the same load, alternating."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import redis

from mltasks.bench import BenchError, bulkreport
from mltasks.bench.bulkrun import (
    StepOptions,
    find_sustained,
    fixed_rates,
    guarded_step,
    ours_markers_for,
)
from mltasks.bench.capacity import OpsMeter
from mltasks.bench.cli_common import command_line, finish, out_dir, say, workspace
from mltasks.bench.database import (
    recreate_database,
    reset_tables,
    run_stats,
    server_version,
)
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
    broker_floor_responder,
    floor_responder,
    model_floor_responder,
    plumbing_floor_responder,
    service_responder,
)
from mltasks.bench.service import Pool, ServiceSettings
from mltasks.bench.vary import Vary, check_configs, compare, schedule
from mltasks.errors import MLTasksError
from mltasks.game import DEFAULT_POLL_MS, GatewaySpec, run_gateway


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
        overrides=tuple(getattr(args, "overrides", ())),
    )


def _floors(args: argparse.Namespace, settings: ServiceSettings, logs: Path) -> list[Responder]:
    """The floors asked for (``--floor``), in a fixed order: plain, model, broker,
    plumbing."""
    kinds = args.floor or ()
    out: list[Responder] = []
    if "plain" in kinds:
        out.append(floor_responder(args.database_url, logs))
    if "model" in kinds:
        out.append(model_floor_responder(settings, logs))
    if "broker" in kinds:
        out.append(broker_floor_responder(args.database_url, args.redis_url, logs))
    if "plumbing" in kinds:  # the service's own settings, caching as the service has it
        out.append(plumbing_floor_responder(replace(settings, caching=args.cache == "on")))
    return out


# -- gateway ------------------------------------------------------------------------------


def _one_run(
    responder: str,
    start: Callable[[], AbstractContextManager[Running]],
    spec: GatewaySpec,
    markers: tuple[str, ...] = (),
    redis_url: str | None = None,
) -> dict[str, Any]:
    """Start a responder, run the clients on an empty table, read what the table saw."""
    reset_tables(spec.conninfo)
    with start() as running:
        reset_tables(spec.conninfo)  # the warm-up request is not part of the run
        load_before = os.getloadavg()[0]
        machine_cpu = CpuMeter()
        others = OthersMeter(markers)
        responder_cpu = running.cpu_seconds()
        ops = OpsMeter(spec.conninfo, redis_url, running.procs)
        try:
            result = run_gateway(spec)
            responder_cpu = running.cpu_seconds() - responder_cpu
            per_decision = ops.per_decision(len(result.latencies_ms))
        finally:
            ops.close()
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
    say(
        f"{responder:>7} x{spec.clients:<3} {run['decisions_per_s']:>8} decisions/s, "
        f"{run['in_time_share'] * 100:5.1f}% in time, p50 {lat['p50']} ms, p99 {lat['p99']} ms, "
        f"255 {run['share_255'] * 100:.1f}%, parse failures {run['parse_failures']}, "
        f"errors {run['errors']}, load {run['load_average_before']}, "
        f"others {run['others_cpu_share'] * 100:.0f}%, "
        f"CPU {per_decision['cpu_ms_total']:.3f} ms/decision"
    )
    return run


def _guarded_run(
    responder: str,
    start: Callable[[], AbstractContextManager[Running]],
    spec: GatewaySpec,
    markers: tuple[str, ...] = (),
    redis_url: str | None = None,
) -> dict[str, Any]:
    """A run that fails is reported as failed; the other runs still count."""
    try:
        return _one_run(responder, start, spec, markers, redis_url)
    except (MLTasksError, psycopg.Error, redis.RedisError, OSError) as exc:
        say(f"{responder:>7} x{spec.clients:<3} FAILED: {exc}")
        return {"responder": responder, "clients": spec.clients, "failed": str(exc)}


@dataclass(frozen=True, slots=True)
class _Slot:
    """A responder as a gateway run names it; ``variant``: its ``--vary`` value as typed."""

    name: str
    responder: Responder
    variant: str | None = None


def _services(
    args: argparse.Namespace, settings: ServiceSettings, vary: Vary | None, work: Path
) -> list[_Slot]:
    """The service runs: none (``--no-service``), the service (named ``service``, as
    always), or one per ``--vary`` value, each named by its value and checked first."""
    if vary is None:
        return [] if args.no_service else [_Slot("service", service_responder(settings))]
    variants = vary.settings(settings)
    check_configs(vary, variants, work)
    return [
        _Slot(vary.run_name(text), service_responder(s, vary.run_name(text)), text)
        for text, s in zip(vary.texts, variants, strict=True)
    ]


def gateway_command(args: argparse.Namespace) -> int:
    """Run the benchmark, write report.json, report.md and the plots, print the table."""
    started = datetime.now().astimezone()
    if args.no_service and not args.floor:
        raise BenchError("nothing to run: --no-service without --floor")
    vary: Vary | None = getattr(args, "vary", None)
    rounds: int = getattr(args, "rounds", 1)
    if vary is not None and args.no_service:
        raise BenchError("--vary varies the service: drop --no-service")
    out = out_dir(args, started)
    url = args.database_url
    logs = out / "logs"
    runs: list[dict[str, Any]] = []
    recreate_database(url)
    with workspace(args) as (work, models_dir):
        settings = _settings(
            args, work, models_dir, logs, level=args.level, caching=args.cache == "on"
        )
        floors = [_Slot(r.name, r) for r in _floors(args, settings, logs)]
        services = _services(args, settings, vary, work)
        # Runs named as before unless asked for more: no round without --rounds or --vary.
        tagged = vary is not None or rounds > 1
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
            for i, (k, slot) in enumerate(schedule(floors, services, rounds)):
                if rounds > 1 and i % (len(floors) + len(services)) == 0:
                    say(f"x{clients}: round {k} of {rounds}")
                markers = ours_markers_for(url, args.redis_url)
                run = _guarded_run(slot.name, slot.responder.start, spec, markers, args.redis_url)
                if tagged:
                    run["round"] = k
                if slot.variant is not None:
                    run["variant"] = slot.variant
                runs.append(run)
    report: dict[str, Any] = {
        "started_at": started.isoformat(timespec="seconds"),
        "command": command_line(),
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
    if rounds > 1:
        report["rounds"] = rounds
    if vary is not None:
        report["vary"] = vary.describe(rounds)
        report["variants"] = compare(runs, vary.texts)
    report["plots"] = gateway_plots(report, out)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (out / "report.md").write_text(md)
    print(md)
    say(f"report written to {out}/report.md and report.json")
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
        "command": command_line(),
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


def bulk_command(args: argparse.Namespace) -> int:
    """Fixed rates, or the sustained rate, for the floor and each service configuration."""
    started = datetime.now().astimezone()
    load_start = os.getloadavg()
    if args.no_service and not args.floor:
        raise BenchError("nothing to run: --no-service without --floor")
    out = out_dir(args, started)
    logs = out / "logs"
    recreate_database(args.database_url)
    with workspace(args) as (work, models_dir):
        first = _settings(
            args, work, models_dir, logs, level=args.level[0], caching=False, pool=args.pool[0]
        )
        responders = _floors(args, first, logs)
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
            for line in bulkreport.sustained_summary(sustained):
                say(line)
        else:
            runs = fixed_rates(responders, args.rate, step)
    report = _bulk_report("bulk", args, started, load_start, responders, runs, sustained)
    return finish(report, out)


def cache_command(args: argparse.Namespace) -> int:
    """The same repeated load against the service with caching on, then off."""
    started = datetime.now().astimezone()
    load_start = os.getloadavg()
    if args.states < 1:
        raise BenchError("--states must be at least 1: the load repeats states from a pool")
    out = out_dir(args, started)
    logs = out / "logs"
    recreate_database(args.database_url)
    with workspace(args) as (work, models_dir):
        responders: list[Responder] = []
        if args.floor:
            responders.append(floor_responder(args.database_url, logs))
        for caching in (True, False):
            s = _settings(args, work, models_dir, logs, level=args.level, caching=caching)
            responders.append(service_responder(s))
        runs = fixed_rates(responders, args.rate, partial(guarded_step, opts=_step_options(args)))
    report = _bulk_report("cache", args, started, load_start, responders, runs, {})
    return finish(report, out)
