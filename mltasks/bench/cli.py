"""``mltasks bench gateway``: emulated map servers against the service and the floor.

For each client count the floor (with ``--floor``) and then the service answer the same
load, each on a freshly emptied table, so the pair differs only in the responder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import redis

from mltasks.bench import BenchError
from mltasks.bench.database import (
    DEFAULT_BENCH_URL,
    recreate_database,
    reset_tables,
    run_stats,
    server_version,
)
from mltasks.bench.gateway import DEFAULT_POLL_MS, GatewaySpec, run_gateway
from mltasks.bench.procs import ManagedProcess, stop_all, wait_until_answering
from mltasks.bench.report import CpuMeter, machine, markdown, ratios, summarize
from mltasks.bench.service import Service, ServiceSettings
from mltasks.contract import ARCHETYPES, MODEL_TYPES
from mltasks.errors import MLTasksError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379"


def _counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,8,32, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("client counts must be positive")
    return counts


def add_parser(subparsers: Any) -> None:
    """Add ``bench gateway`` to the ``mltasks`` command."""
    bench = subparsers.add_parser("bench", help="benchmarks")
    sub = bench.add_subparsers(dest="bench_cmd", required=True)
    gw = sub.add_parser(
        "gateway",
        help="emulated map servers against the service (and the floor)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gw.add_argument("--clients", type=_counts, default=[1, 8, 32], help="e.g. 1,8,32")
    gw.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    gw.add_argument("--timeout-ms", type=int, default=100, help="the game's ml_max_latency_ms")
    gw.add_argument("--floor", action="store_true", help="also run the floor responder")
    gw.add_argument("--no-service", action="store_true", help="skip the service runs")
    gw.add_argument("--out", type=Path, help="report directory (default bench-results/<time>)")
    gw.add_argument("--models-dir", type=Path, help="demo models are written here if missing")
    gw.add_argument(
        "--database-url",
        default=DEFAULT_BENCH_URL,
        help="benchmark database (dropped and recreated; its name must say bench)",
    )
    gw.add_argument(
        "--redis-url",
        default=DEFAULT_REDIS_URL,
        help="Redis server; the run uses its db 9 (broker) and 10 (cache)",
    )
    gw.add_argument("--processes", type=int, default=2, help="client processes")
    gw.add_argument(
        "--literal-sql",
        action="store_true",
        help="poll with unprepared text like the C++ (costs the client more)",
    )
    gw.add_argument("--seed", type=int, default=0)
    gw.set_defaults(func=gateway_command)


def ensure_models(models_dir: Path) -> Path:
    """The 54 demo models in ``models_dir``, written only when some are missing."""
    expected = [models_dir / a / f"{m}.onnx" for a in ARCHETYPES for m in MODEL_TYPES]
    if all(p.is_file() for p in expected):
        return models_dir
    from mltasks.demo_models import write_demo_models

    t0 = time.perf_counter()
    write_demo_models(models_dir)
    _say(f"wrote 54 demo models into {models_dir} in {time.perf_counter() - t0:.1f}s")
    return models_dir


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass(slots=True)
class _Running:
    """A responder that answers: its processes (for their CPU time) and what it reported."""

    procs: list[ManagedProcess]
    info: dict[str, Any] = field(default_factory=dict)

    def cpu_seconds(self) -> float:
        return sum(p.cpu_seconds() for p in self.procs)


@contextmanager
def _floor(url: str, log_dir: Path) -> Iterator[_Running]:
    """The floor responder as a subprocess, answering before the run starts."""
    proc = ManagedProcess(
        "floor",
        [sys.executable, "-m", "mltasks.bench.floor", "--database-url", url],
        log_path=log_dir / "floor.log",
    )
    try:
        proc.start()
        wait_until_answering(url, [proc], timeout_s=60)
        yield _Running([proc])
    finally:
        stop_all([proc])


@contextmanager
def _service(settings: ServiceSettings, label: str) -> Iterator[_Running]:
    """The service as subprocesses; the worker's memory is read once it is ready."""
    with Service(settings, label=label) as svc:
        ready_s = svc.wait_ready()
        running = _Running(list(svc.procs), {"ready_s": round(ready_s, 1)})
        memory = {"after warm-up": svc.worker_memory()}
        running.info["worker_memory"] = memory
        yield running
        memory["after the run"] = svc.worker_memory()


def _one_run(
    responder: str,
    start: Callable[[], AbstractContextManager[_Running]],
    spec: GatewaySpec,
) -> dict[str, Any]:
    """Start a responder, run the clients on an empty table, read what the table saw."""
    reset_tables(spec.conninfo)
    with start() as running:
        reset_tables(spec.conninfo)  # the warm-up request is not part of the run
        load_before = os.getloadavg()[0]
        machine_cpu = CpuMeter()
        responder_cpu = running.cpu_seconds()
        result = run_gateway(spec)
        responder_cpu = running.cpu_seconds() - responder_cpu
        machine_busy = machine_cpu.busy_share()
        stats = run_stats(spec.conninfo)
    cores = os.cpu_count() or 1
    run = {
        "responder": responder,
        **summarize(result),
        "responder_cpu_s": round(responder_cpu, 2),
        "responder_cpu_share_of_machine": round(responder_cpu / (result.elapsed_s * cores), 3),
        # Everything on the machine: clients, responder, PostgreSQL, Redis, and anyone else.
        "machine_cpu_busy_share": machine_busy,
        "load_average_before": round(load_before, 2),
        "database": stats,
        **running.info,
    }
    lat = run["latency_ms"]
    _say(
        f"{responder:>7} x{spec.clients:<3} {run['decisions_per_s']:>8} decisions/s, "
        f"{run['in_time_share'] * 100:5.1f}% in time, p50 {lat['p50']} ms, p99 {lat['p99']} ms, "
        f"255 {run['share_255'] * 100:.1f}%, parse failures {run['parse_failures']}, "
        f"errors {run['errors']}"
    )
    return run


def _guarded_run(
    responder: str, start: Callable[[], AbstractContextManager[_Running]], spec: GatewaySpec
) -> dict[str, Any]:
    """A run that fails is reported as failed; the other runs still count."""
    try:
        return _one_run(responder, start, spec)
    except (MLTasksError, psycopg.Error, redis.RedisError, OSError) as exc:
        _say(f"{responder:>7} x{spec.clients:<3} FAILED: {exc}")
        return {"responder": responder, "clients": spec.clients, "failed": str(exc)}


def gateway_command(args: argparse.Namespace) -> int:
    """Run the benchmark, write report.json and report.md, print the table."""
    started = datetime.now().astimezone()
    out: Path = args.out or Path("bench-results") / started.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    if args.no_service and not args.floor:
        raise BenchError("nothing to run: --no-service without --floor")
    url = args.database_url
    logs = out / "logs"
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mltasks-bench-") as tmp:
        work = Path(tmp)
        recreate_database(url)
        models_dir = ensure_models(args.models_dir or work / "models")
        settings = ServiceSettings(
            database_url=url,
            redis_url=args.redis_url,
            models_dir=models_dir,
            work_dir=work,
            log_dir=logs,
            timeout_ms=args.timeout_ms,
        )
        for clients in args.clients:
            spec = GatewaySpec(
                conninfo=url,
                clients=clients,
                duration_s=args.duration,
                timeout_ms=args.timeout_ms,
                processes=args.processes,
                seed=args.seed,
                literal_sql=args.literal_sql,
            )
            label = f"service-{clients}"
            responders: list[tuple[str, Callable[[], AbstractContextManager[_Running]]]] = []
            if args.floor:
                responders.append(("floor", partial(_floor, url, logs)))
            if not args.no_service:
                responders.append(("service", partial(_service, settings, label)))
            for name, start in responders:
                runs.append(_guarded_run(name, start, spec))
    report: dict[str, Any] = {
        "started_at": started.isoformat(timespec="seconds"),
        "duration_s": args.duration,
        "timeout_ms": args.timeout_ms,
        "poll_ms": DEFAULT_POLL_MS,
        "literal_sql": args.literal_sql,
        "client_processes": args.processes,
        "machine": machine(),
        "postgres": server_version(url),
        "runs": runs,
        "ratios": ratios(runs),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (out / "report.md").write_text(md)
    print(md)
    _say(f"report written to {out}/report.md and report.json")
    return 0
