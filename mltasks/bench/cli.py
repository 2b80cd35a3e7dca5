"""``mltasks bench``: gateway, bulk, cache, batch, precisions and shadow benchmarks.

- ``gateway``: emulated map servers (the game's exact statements, closed loop) against
  the service and, with ``--floor``, against the floor, alternating at each client count.
- ``bulk``: open-loop fixed-rate load written with COPY, latency from the database's
  clocks; ``--find-sustained`` steps the rate up until a step fails.
- ``cache``: bulk load drawn from a small pool of states (repeats), cache on then off,
  with the hit rate of each cache layer.
- ``precisions``: fp32 / int8 / fp16 inference time on the CPU.
- ``batch``: a worker's thread CPU for one batch, by its size and by step, in one process.
- ``shadow``: the game's latency without a candidate model, while one shadows, after rollback.

Every run starts its responder fresh, on emptied tables and flushed Redis databases
(9 broker, 10 cache: whatever else they hold is lost, so give --redis-url a Redis that is
not the game's), so the runs of one report differ only in what they compare.
"""

import argparse
from pathlib import Path
from typing import Any

from mltasks.bench import inserts as inserts_mod
from mltasks.bench import models as models_mod
from mltasks.bench import precisions as precisions_mod
from mltasks.bench.cli_args import (
    bulk_options,
    common_options,
    counts_arg,
    floor_option,
    game_options,
    rates_arg,
    service_options,
    vary_options,
    where_options,
)
from mltasks.bench.cli_load import bulk_command, cache_command, gateway_command
from mltasks.bench.cli_measure import (
    batch_command,
    chaos_command,
    inserts_command,
    models_command,
    precisions_command,
    shadow_command,
)
from mltasks.bench.database import DEFAULT_BENCH_URL
from mltasks.bench.service import POOLS, default_pool


def _documented(sub: Any, name: str, module: Any, help_text: str) -> argparse.ArgumentParser:
    """A subcommand whose description is its module's docstring, as written."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help_text,
        description=module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def add_parser(subparsers: Any) -> None:
    """Add ``bench gateway|bulk|cache|batch|precisions|models|chaos|inserts|shadow``."""
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
    gw.add_argument("--clients", type=counts_arg, default=[1, 8, 32], help="e.g. 1,8,32")
    gw.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    gw.add_argument("--timeout-ms", type=int, default=100, help="the game's ml_max_latency_ms")
    floor_option(gw)
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
    common_options(gw)
    service_options(gw, level_list=False)
    vary_options(gw)
    gw.set_defaults(func=gateway_command)

    bulk = sub.add_parser(
        "bulk",
        help="open-loop fixed-rate load with COPY; the sustained rate",
        description=__doc__,
        formatter_class=raw,
    )
    bulk.add_argument(
        "--rate",
        type=rates_arg,
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
    floor_option(bulk)
    bulk.add_argument("--no-service", action="store_true", help="skip the service runs")
    bulk.add_argument(
        "--states",
        type=int,
        default=0,
        help="0: every request a distinct state; N: drawn from N states (repeats)",
    )
    bulk_options(bulk)
    common_options(bulk)
    service_options(bulk, level_list=True)
    bulk.set_defaults(func=bulk_command)

    cache = sub.add_parser(
        "cache",
        help="load from a small pool of states: cache on, then off, hit rate per layer",
        description="Open-loop load drawn from --states distinct states (repeats, so caches "
        "can hit) against the service with caching on, then off (and the floor with "
        "--floor), alternating; hit rate per cache layer from the workers' counters.",
    )
    cache.add_argument("--states", type=int, default=500, help="distinct states drawn from")
    cache.add_argument("--rate", type=rates_arg, default=[1000.0], help="requests/s")
    cache.add_argument("--floor", action="store_true", help="also run the floor")
    bulk_options(cache)
    common_options(cache)
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

    from mltasks.bench import batchcost as batchcost_mod

    bat = _documented(
        sub, "batch", batchcost_mod, "a worker's thread CPU for one batch, by size and by step"
    )
    bat.add_argument(
        "--sizes", type=counts_arg, default=[1, 15, 60], help="rows a batch (default: 1,15,60)"
    )
    bat.add_argument("--batches", type=int, default=300, help="timed batches a size")
    bat.add_argument("--warmup", type=int, default=50, help="untimed batches a size first")
    bat.add_argument("--seed", type=int, default=0, help="of the states drawn")
    bat.add_argument(
        "--pause-ms",
        type=float,
        default=0.0,
        help="sleep this long before each batch, as a worker idle between batches "
        "(default: 0, back to back)",
    )
    where_options(bat)
    bat.set_defaults(func=batch_command)

    prec = _documented(
        sub, "precisions", precisions_mod, "fp32 / int8 / fp16 inference time on the CPU"
    )
    prec.add_argument("--batch", type=counts_arg, default=[1, 32, 128], help="batch sizes")
    prec.add_argument("--repeats", type=int, default=100, help="calls per model and batch")
    prec.add_argument("--threads", type=int, default=1, help="intra-op threads per session")
    prec.add_argument("--out", type=Path, help="report directory (default bench-results/<time>)")
    prec.add_argument("--models-dir", type=Path, help="demo models are written here if missing")
    prec.set_defaults(func=precisions_command)

    mod = _documented(
        sub,
        "models",
        models_mod,
        "cost of each model type and each level's fusion (CPU; GPU where present)",
    )
    mod.add_argument("--models-dir", type=Path, help="default: the config's models.dir")
    mod.add_argument(
        "--profile",
        choices=("demo", "phase11"),
        default="demo",
        help="written into --models-dir when it holds no models (default: %(default)s)",
    )
    mod.add_argument("--archetype", default="aggressive", help="(default: %(default)s)")
    mod.add_argument(
        "--batch", type=counts_arg, default=[1, 8, 32, 128], help="(default: 1,8,32,128)"
    )
    mod.add_argument("--threads", type=counts_arg, default=[1, 2], help="(default: 1,2)")
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

    ch = _documented(
        sub,
        "chaos",
        chaos_mod,
        "the whole service under kill -9 and SIGSTOP faults, bounded in time",
    )
    ch.add_argument("--duration", type=float, default=120.0, help="seconds of load and faults")
    game_options(ch, timeout_ms=100)
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

    ins = _documented(
        sub,
        "inserts",
        inserts_mod,
        "the game's INSERT rate and latency with and without the NOTIFY trigger",
    )
    ins.add_argument("--clients", type=counts_arg, default=[8, 32], help="(default: 8,32)")
    ins.add_argument("--duration", type=float, default=5.0, help="seconds per run (default: 5)")
    ins.add_argument("--rounds", type=int, default=2, help="on/off pairs per client count")
    ins.add_argument(
        "--database-url",
        default=DEFAULT_BENCH_URL,
        help="benchmark database (dropped and recreated; its name must say bench)",
    )
    ins.add_argument("--out", type=Path, help="report directory (default bench-results/<time>)")
    ins.set_defaults(func=inserts_command)

    from mltasks.bench import shadow as shadow_mod

    sh = _documented(sub, "shadow", shadow_mod, "the game's latency with and without a canary")
    sh.add_argument("--window-s", type=float, default=10.0, help="seconds of load per window")
    game_options(sh, timeout_ms=15)
    sh.add_argument("--workers", type=int, default=2, help="solo -Q cpu worker processes")
    sh.add_argument(
        "--model",
        default=shadow_mod.DEFAULT_MODEL,
        help="<archetype>/<type> the candidate is deployed for; the clients decide only "
        "this archetype",
    )
    sh.add_argument(
        "--candidate",
        type=Path,
        help="the version to deploy (default: the model's demo model fitted with another seed)",
    )
    common_options(sh)
    sh.set_defaults(func=shadow_command)
