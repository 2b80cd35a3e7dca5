"""Bulk runs: one open-loop step against a fresh responder, fixed rates, the sustained rate.

A step starts its responder, empties the tables, offers the load (``bulk.offer_load``),
waits until every request has its response (or ``drain_s`` passes), stops the responder
and reads the figures from the database. Steps against the floor and against the
service alternate at each rate, so both see the same machine at nearly the same time.

The sustained rate: the rate is stepped up (times ``factor``) until a step fails, i.e.
fewer than ``min_answered_share`` of the requests were answered or their p99 went over
``p99_limit_ms``; then ``refine`` steps between the last rate that held and the first that
failed narrow it down (each at the geometric mean). The highest rate that held is
reported. A step whose figures held but where the loader could not offer the rate ends
the search for that responder too: the rate is then "at least" the last one held.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import psycopg
import redis

from mltasks.bench import BenchError
from mltasks.bench.bulk import BulkSpec, RowSource, bulk_reset, drain, offer_load, read_rows
from mltasks.bench.bulk import summarize_rows as summarize_bulk
from mltasks.bench.capacity import OpsMeter
from mltasks.bench.cpucost import total_ms
from mltasks.bench.database import run_stats
from mltasks.bench.report import CpuMeter, OthersMeter
from mltasks.bench.responders import Responder
from mltasks.bench.service import cache_redis
from mltasks.errors import MLTasksError

StepFn = Callable[[Responder, float], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class StepOptions:
    conninfo: str
    duration_s: float
    tick_ms: float
    states: int = 0
    mobs: int = 1
    seed: int = 0
    drain_s: float = 20.0
    p99_limit_ms: float = 50.0
    min_answered_share: float = 0.99
    redis_url: str = "redis://127.0.0.1:6379"
    layout: str = "encoder"


def ours_markers(opts: StepOptions) -> tuple[str, ...]:
    """Command-line fragments of the processes working for a run besides the responder:
    the benchmark database's backends and the run's Redis server."""
    return ours_markers_for(opts.conninfo, opts.redis_url)


def ours_markers_for(conninfo: str, redis_url: str) -> tuple[str, ...]:
    """What else counts as the run's own work when the others' CPU is measured. Kernel
    threads (I/O for the commits) cannot be told apart: "others" is an upper bound."""
    from mltasks.bench.database import database_name

    port = urlsplit(redis_url).port or 6379
    return (
        f" {database_name(conninfo)} ",  # its backends (and autovacuum workers)
        # PostgreSQL's own writers: during a run mostly writing for it.
        ": walwriter",
        ": checkpointer",
        ": background writer",
        f"redis-server 127.0.0.1:{port}",
        f"redis-server *:{port}",
    )


def _scope(conninfo: str) -> str:
    """The hit counters' scope of the service the bench runs (mltasks.cache.stats_scope)."""
    from mltasks.bench.service import BROKER_DB
    from mltasks.cache.stats import stats_scope
    from mltasks.config import Config, DatabaseConfig, RedisConfig

    return stats_scope(
        Config(database=DatabaseConfig(url=conninfo), redis=RedisConfig(broker_db=BROKER_DB))
    )


def _cache_counts(redis_url: str, conninfo: str) -> dict[str, dict[str, int]] | None:
    """Hits and misses per layer kept by the workers in the bench's cache db, so far."""
    from mltasks.cache.stats import read_stats

    client = cache_redis(redis_url)
    try:
        stats = read_stats(client, window_s=15 * 60, scope=_scope(conninfo))
    except (redis.RedisError, OSError):
        return None
    finally:
        client.close()
    return {k: {"hits": v.hits, "misses": v.misses} for k, v in stats.items()}


def _cache_figures(
    before: dict[str, dict[str, int]] | None,
    after: dict[str, dict[str, int]] | None,
    url: str,
    conninfo: str,
) -> dict[str, Any]:
    """Per layer: lookups, hits and hit rate of this run (after minus before)."""
    from mltasks.cache.stats import hit_rates

    layers: dict[str, Any] = {}
    if before is not None and after is not None:
        for layer, now in after.items():
            was = before.get(layer, {"hits": 0, "misses": 0})
            hits, misses = now["hits"] - was["hits"], now["misses"] - was["misses"]
            lookups = hits + misses
            layers[layer] = {
                "lookups": lookups,
                "hits": hits,
                "hit_rate": round(hits / lookups, 4) if lookups else None,
            }
    client = cache_redis(url)
    try:
        # What mltasks.cache.hit_rates reports (last 5 minutes, warm-up included).
        rates = {k: round(v, 4) for k, v in hit_rates(client, scope=_scope(conninfo)).items()}
    except (redis.RedisError, OSError):
        rates = {}
    finally:
        client.close()
    return {"layers": layers, "hit_rates_5min": rates}


def bulk_step(responder: Responder, rate: float, opts: StepOptions) -> dict[str, Any]:
    """One open-loop step against a freshly started responder; its figures."""
    spec = BulkSpec(
        conninfo=opts.conninfo,
        rate=rate,
        duration_s=opts.duration_s,
        tick_ms=opts.tick_ms,
        states=opts.states,
        mobs=opts.mobs,
        seed=opts.seed,
        layout=opts.layout,
    )
    source = RowSource(spec)  # formatted before any clock starts
    bulk_reset(opts.conninfo)
    level_after: int | None = None
    cache: dict[str, Any] | None = None
    with responder.start() as running:
        bulk_reset(opts.conninfo)  # the warm-up request is not part of the run
        svc = running.service
        caching = svc is not None and svc.settings.caching and (svc.settings.level or 3) <= 3
        counts_before = _cache_counts(opts.redis_url, opts.conninfo) if caching else None
        load_before = os.getloadavg()
        machine_cpu = CpuMeter()
        others = OthersMeter(ours_markers(opts))
        responder_cpu = running.cpu_seconds()
        ops = OpsMeter(opts.conninfo, opts.redis_url, running.procs)
        try:
            load = offer_load(spec, source)
            responder_cpu = running.cpu_seconds() - responder_cpu
            machine_busy = machine_cpu.busy_share()
            others_share = others.share()
            drained_s, left = drain(opts.conninfo, opts.drain_s)
            # From the first request written until the last one answered.
            per_decision = ops.per_decision(load.rows)
        finally:
            ops.close()
        if svc is not None:
            level_after = svc.level_now()
        if caching:
            after = _cache_counts(opts.redis_url, opts.conninfo)
            cache = _cache_figures(counts_before, after, opts.redis_url, opts.conninfo)
    rows = read_rows(opts.conninfo)
    figures = summarize_bulk(
        rows,
        accept_255_reasons=responder.accept_255_reasons,
        p99_limit_ms=opts.p99_limit_ms,
        min_answered_share=opts.min_answered_share,
    )
    cores = os.cpu_count() or 1
    run: dict[str, Any] = {
        "responder": responder.name,
        "config": responder.config,
        "rate": rate,
        **figures,
        "loader": load.as_dict(),
        "drain_s": round(drained_s, 2),
        "unanswered_after_drain": left,
        "responder_cpu_s": round(responder_cpu, 2),
        "responder_cpu_share_of_machine": round(responder_cpu / (load.elapsed_s * cores), 3),
        "machine_cpu_busy_share": machine_busy,
        # CPU of everything else on the machine during the load: what disturbed the step.
        "others_cpu_share": others_share,
        "load_average_before": [round(x, 2) for x in load_before],
        "database": run_stats(opts.conninfo),
        "per_decision": per_decision,
        **running.info,
    }
    if level_after is not None:
        run["level_after"] = level_after
    if cache is not None:
        run["cache"] = cache
    # Held, and the loader really offered the rate. A step that failed while the loader
    # was behind failed all the same: the responder took the machine from the loader.
    run["held"] = bool(figures["held"]) and not load.behind
    run["loader_limited"] = bool(figures["held"]) and load.behind
    _say_run(run)
    return run


def guarded_step(responder: Responder, rate: float, opts: StepOptions) -> dict[str, Any]:
    """A step that fails to run is reported as failed; the other steps still count."""
    try:
        return bulk_step(responder, rate, opts)
    except (MLTasksError, psycopg.Error, redis.RedisError, OSError) as exc:
        say(f"{responder.name:>28} @ {rate:>8.0f}/s FAILED: {exc}")
        return {
            "responder": responder.name,
            "config": responder.config,
            "rate": rate,
            "failed": str(exc),
            "held": False,
        }


def say(text: str) -> None:
    import sys

    print(text, file=sys.stderr, flush=True)


def _say_run(run: dict[str, Any]) -> None:
    lat = run["latency_ms"]
    loader = run["loader"]
    note = " LOADER BEHIND" if loader["behind"] else ""
    cpu = run["per_decision"]["cpu_ms"]
    cpu_note = (
        f", CPU {total_ms(cpu):.3f} ms/decision (bridge {cpu.get('bridge', 0):.3f}, workers "
        f"{cpu.get('worker', 0):.3f}, postgres {cpu.get('postgres', 0):.3f}, redis "
        f"{cpu.get('redis', 0):.3f})"
    )
    say(
        f"{run['responder']:>28} @ {run['rate']:>8.0f}/s: offered {run['offered_per_s']}/s, "
        f"answered {run['answered_share'] * 100:6.2f}% ({run['answered_per_s']}/s in the window), "
        f"p50 {lat['p50']} ms, p99 {lat['p99']} ms, 255 {run['share_255'] * 100:.1f}%, "
        f"{'held' if run['held'] else 'FAILED'}, load {run['load_average_before'][0]}, "
        f"others {run['others_cpu_share'] * 100:.0f}%{cpu_note}{note}"
    )


def fixed_rates(
    responders: Sequence[Responder], rates: Sequence[float], step: StepFn
) -> list[dict[str, Any]]:
    """Every responder at every rate, alternating at each rate."""
    return [step(r, rate) for rate in rates for r in responders]


def _next_rate(rate: float, factor: float) -> float:
    """The next rung: ``rate * factor``, rounded to two significant figures."""
    nxt = rate * factor
    digits = 10 ** max(0, math.floor(math.log10(nxt)) - 1)
    return float(max(round(nxt / digits) * digits, rate + 1))


def find_sustained(
    responders: Sequence[Responder],
    *,
    start: float,
    factor: float,
    max_rate: float,
    refine: int,
    step: StepFn,
    ladder: Sequence[float] = (),
    retries: int = 1,
    min_rate: float = 10.0,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Step each responder up until it fails; returns every step and the verdicts.

    ``ladder``: explicit rates to climb instead of ``start * factor**k``. A failed step
    is run again up to ``retries`` times and counts as held if any attempt held: other
    work on the machine only ever makes a step worse, so the best attempt is the
    responder's. When the first rate already fails, the rate steps down (divided by
    ``factor``, not below ``min_rate``) until one holds, then the bisection refines.
    """
    if factor <= 1.0:
        raise BenchError("the step factor must be above 1")
    runs: list[dict[str, Any]] = []
    verdict: dict[str, dict[str, Any]] = {
        r.name: {"rate": None, "first_failed": None, "loader_limited": False, "steps": 0}
        for r in responders
    }

    def attempt(r: Responder, rate: float) -> bool | None:
        """True held, False failed, None: the loader could not offer the rate."""
        v = verdict[r.name]
        for i in range(1 + max(0, retries)):
            run = step(r, rate)
            run["attempt"] = i + 1
            runs.append(run)
            v["steps"] += 1
            if run["held"]:
                v["rate"] = max(rate, v["rate"] or 0.0)
                return True
            if run.get("loader_limited"):
                v["loader_limited"] = True
                return None
        v["first_failed"] = min(rate, v["first_failed"] or math.inf)
        return False

    active = list(responders)
    rungs = list(ladder)
    rate = rungs.pop(0) if rungs else start
    while active and rate <= max_rate:
        for r in list(active):
            if not attempt(r, rate):
                active.remove(r)
        if ladder:
            if not rungs:
                break
            rate = rungs.pop(0)
        else:
            rate = _next_rate(rate, factor)
    for r in active:
        verdict[r.name]["max_rate_reached"] = True
    for r in responders:  # the first rate failed: find one that holds
        v = verdict[r.name]
        down = v["first_failed"]
        while v["rate"] is None and down is not None and down / factor >= min_rate:
            down = float(round(down / factor))
            if attempt(r, down) is None:
                break
    for _ in range(refine):
        progressed = False
        for r in responders:
            v = verdict[r.name]
            if v["rate"] is None or v["first_failed"] is None:
                continue
            lo, hi = float(v["rate"]), float(v["first_failed"])
            mid = float(round(math.sqrt(lo * hi)))
            if hi - lo < max(2.0, 0.05 * lo) or not lo < mid < hi:
                continue
            attempt(r, mid)
            progressed = True
        if not progressed:
            break
    return runs, verdict
