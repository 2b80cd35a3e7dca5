"""``mltasks bench precisions``, ``models``, ``batch``, ``inserts`` and ``chaos``: the
commands that measure one thing each (a model's cost, a batch's cost in a worker, the
game's INSERT, the service under faults) rather than compare responders."""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path

from mltasks.bench import BenchError
from mltasks.bench import batchcost as batchcost_mod
from mltasks.bench import inserts as inserts_mod
from mltasks.bench import models as models_mod
from mltasks.bench import precisions as precisions_mod
from mltasks.bench.cli_common import (
    command_line,
    ensure_models,
    finish,
    out_dir,
    report_head,
    say,
    workspace,
)


def inserts_command(args: argparse.Namespace) -> int:
    started = datetime.now().astimezone()
    out = out_dir(args, started)
    rows = inserts_mod.run(args.database_url, args.clients, args.duration, args.rounds)
    return finish(report_head("inserts", started, runs=rows), out, inserts_mod.write)


def batch_command(args: argparse.Namespace) -> int:
    if args.batches < 2 or args.warmup < 0:
        raise BenchError("--batches must be at least 2 and --warmup at least 0")
    if not 0 <= args.pause_ms <= 1000:
        raise BenchError(f"--pause-ms must be within 0..1000, got {args.pause_ms:g}")
    started = datetime.now().astimezone()
    out = out_dir(args, started)
    with workspace(args) as (_, models_dir):
        measured = batchcost_mod.measure(
            args.database_url,
            args.redis_url,
            models_dir,
            sorted(set(args.sizes)),
            args.batches,
            args.warmup,
            args.seed,
            args.pause_ms,
        )
    report = report_head("batch", started, schema_version=batchcost_mod.SCHEMA_VERSION, **measured)
    return finish(report, out, batchcost_mod.write)


def models_command(args: argparse.Namespace) -> int:
    import dataclasses
    import os

    from mltasks.config import get_config
    from mltasks.models.demo import write_demo_models

    started = datetime.now().astimezone()
    out = out_dir(args, started)
    cfg = get_config()
    if args.models_dir is not None:
        cfg = dataclasses.replace(cfg, models=dataclasses.replace(cfg.models, dir=args.models_dir))
    if not any(cfg.models.dir.glob("*/*.onnx")):
        t0 = time.perf_counter()
        write_demo_models(cfg.models.dir, layout=cfg.state.layout, profile=args.profile)
        took = time.perf_counter() - t0
        say(f"wrote the {args.profile} models into {cfg.models.dir} in {took:.0f}s")
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
    report = report_head(
        "models", started, schema_version=models_mod.SCHEMA_VERSION, results=results
    )
    return finish(report, out, models_mod.write)


def precisions_command(args: argparse.Namespace) -> int:
    started = datetime.now().astimezone()
    out = out_dir(args, started)
    with tempfile.TemporaryDirectory(prefix="mltasks-bench-") as tmp:
        models_dir = ensure_models(args.models_dir or Path(tmp) / "models")
        timings = precisions_mod.measure(models_dir, args.batch, args.repeats, args.threads)
    report = report_head(
        "precisions", started, schema_version=precisions_mod.SCHEMA_VERSION, timings=timings
    )
    return finish(report, out, precisions_mod.write)


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
    out = out_dir(args, started)
    with workspace(args) as (work, models_dir):
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
        report = chaos_mod.run_chaos(opts, work, say)
        logs = out / "logs"
        shutil.copytree(work / "logs", logs, dirs_exist_ok=True)
    report["command"] = command_line()
    report["started_at"] = started.isoformat(timespec="seconds")
    chaos_mod.write_report(report, out)
    print(chaos_mod.summary(report))
    say(f"report written to {out}/chaos.json and chaos.txt")
    return 0 if chaos_mod.passed(report) else 1


# -- shadow -------------------------------------------------------------------------------


def shadow_command(args: argparse.Namespace) -> int:
    from mltasks.bench import shadow as shadow_mod

    started = datetime.now().astimezone()
    out = out_dir(args, started)
    with workspace(args) as (work, models_dir):
        if args.models_dir is not None:  # a deploy writes versions and pointers: a copy
            models_dir = Path(shutil.copytree(models_dir, work / "models"))
        opts = shadow_mod.ShadowOptions.from_args(args, models_dir)
        body = shadow_mod.run_shadow(opts, work, out / "logs", say)
    report = report_head("shadow", started, schema_version=shadow_mod.SCHEMA_VERSION, **body)
    return finish(report, out, shadow_mod.write)
