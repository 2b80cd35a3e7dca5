"""``mltasks bench batch``: what one batch costs a worker, by its size and by step.

The batch task (``mltasks.serving.batch.infer_batch``) runs in this process on rows the
game's INSERT wrote and the bridge's own claim statement took, packed and unpacked with
msgpack as the broker carries them, against the benchmark's database and Redis (db 9 and
10, flushed first), at level 3 (the CPU tier). Every batch must come back answered.

It reports this thread's CPU time, not latency: on a shared two-core host a benchmark's
latency swings by half from one hour to the next, a thread's CPU per batch by about a tenth
(three runs in a row: 0.70-0.74 ms at one row, 1.61-1.81 ms at 15). So it is the
yardstick for a change to the answering path: run it on both sides of the change,
alternating. From the smallest and the largest size it derives what a
batch costs whatever its size (fixed) and what each row adds (marginal).

Per step: the thread CPU inside each step of the path (``STEPS``), timed by wrapping those
functions in this process for the run only.

A size's batches are all claimed before the first is timed, so that back to back the task
runs as in a busy worker, its code warm. ``--pause-ms``: each batch runs that long after the
one before, as in a worker that waited in BRPOP: on the benchmark host a one-row task costs
three times its CPU after 20 ms of not running (docs/PERFORMANCE.md, 2026-12-08), and a
lightly loaded service pays that. (Before 2026-12-08 each batch was claimed just before it
ran: figures between a warm and a paused one.)
"""

from __future__ import annotations

import importlib
import secrets
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from kombu.serialization import dumps, loads

from mltasks import game
from mltasks.bench import BenchError
from mltasks.bench.queries import bench_query
from mltasks.bench.report import machine_line
from mltasks.bench.service import BROKER_DB, CACHE_DB, flush_bench_dbs
from mltasks.config import Config, DatabaseConfig, FallbackConfig, ModelsConfig, RedisConfig
from mltasks.contract import ARCHETYPES
from mltasks.fallback.ladder import Level
from mltasks.sql import query
from mltasks.state import sample_states

SCHEMA_VERSION = 1
LEVEL = int(Level.CPU)
STALE_TRIES = 10

# The steps of a batch's path: (module, attribute (Class.method for a method), name).
# One name may cover several functions (the two ways the models are called).
STEPS: tuple[tuple[str, str, str], ...] = (
    ("mltasks.serving.inference", "_validated", "validation"),
    ("mltasks.serving.inference", "plan_batch", "plan (keys, cache read)"),
    ("mltasks.serving.inference", "voices_alike", "model calls"),
    ("mltasks.serving.inference", "voices", "model calls"),
    ("mltasks.serving.inference", "fuse_groups", "fusion"),
    ("mltasks.serving.inference", "_assemble", "assembly"),
    ("mltasks.serving.batch", "write_answers", "answer statement"),
    ("mltasks.cache.client", "Cache.store_batch", "cache write"),
    ("mltasks.serving.batch", "report", "fallback ladder report"),
    ("mltasks.models.shadow", "refresh", "model versions"),
    ("mltasks.metrics", "observe_batch", "metrics"),
    ("mltasks.metrics", "observe_fusion", "metrics"),
    ("mltasks.metrics", "observe_answers", "metrics"),
    ("mltasks.metrics", "observe_inference", "metrics"),
)


def _owner(module: str, attribute: str) -> tuple[Any, str]:
    """The object holding ``attribute`` (a module, or a class for ``Class.method``)."""
    owner: Any = importlib.import_module(module)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, name


@contextmanager
def timed_steps(cpu: dict[str, float]) -> Iterator[None]:
    """While inside, each step adds its thread CPU seconds to ``cpu[name]`` (an outer call
    only: a step that calls another of the same name is not counted twice)."""
    saved: list[tuple[Any, str, Any]] = []
    depth: Counter[str] = Counter()

    def wrap(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            depth[label] += 1
            t0 = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                depth[label] -= 1
                if not depth[label]:
                    cpu[label] = cpu.get(label, 0.0) + time.thread_time() - t0

        return timed

    try:
        for module, attribute, label in STEPS:
            owner, name = _owner(module, attribute)
            original = getattr(owner, name)
            saved.append((owner, name, original))
            setattr(owner, name, wrap(original, label))
        yield
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


def worker_config(database_url: str, redis_url: str, models_dir: Path) -> Config:
    """A worker's configuration at level 3 on the benchmark's database and Redis dbs."""
    return Config(
        database=DatabaseConfig(url=database_url),
        redis=RedisConfig(url=redis_url, broker_db=BROKER_DB, cache_db=CACHE_DB),
        models=ModelsConfig(dir=models_dir),
        fallback=FallbackConfig(start_level=LEVEL),
    )


class Batches:
    """Claimed batches as a worker receives them: inserted, claimed, through msgpack."""

    def __init__(self, conn: psycopg.Connection[Any], cfg: Config, seed: int = 0) -> None:
        self.conn = conn
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)
        self.set_aside = 0  # rows the claims answered 255 as overdue, never measured

    def next(self, size: int) -> tuple[list[Any], list[float], str]:
        """``size`` fresh rows (distinct states: no cache can answer them), claimed.

        A claim that found a row past its deadline (it answers such a row 255 itself: a
        stall of this host between the INSERTs and the claim) is set aside and another
        batch made, up to ``STALE_TRIES`` times: every measured batch is inferred whole.
        """
        for _ in range(STALE_TRIES):
            token, rows = self._claimed(size)
            overdue = sum(r.overdue for r in rows)
            if not overdue:
                break
            self.set_aside += overdue
        else:
            raise BenchError(f"{STALE_TRIES} claims of {size} rows in a row found rows overdue")
        body = [[r.row() for r in rows], [r.created_epoch for r in rows]]
        content_type, encoding, payload = dumps(body, serializer="msgpack")  # type: ignore[no-untyped-call]
        carried = loads(payload, content_type, encoding, accept=[content_type])  # type: ignore[no-untyped-call]
        return carried[0], carried[1], token

    def _claimed(self, size: int) -> tuple[str, list[Any]]:
        from mltasks.serving.records import claimed

        with self.conn.cursor() as cur:
            for state in sample_states(self.rng, size):
                array, hp, sp = game.state_sql(state.tolist())
                archetype = ARCHETYPES[int(self.rng.integers(len(ARCHETYPES)))]
                monster = int(self.rng.integers(1, 1_000_000))
                cur.execute(
                    game.insert_sql(
                        monster_id=monster,
                        mob_id=1002,
                        archetype=archetype,
                        array=array,
                        hp=hp,
                        sp=sp,
                    )
                )
            # The rows' ages as of now, not of their INSERTs: one by one, these can take
            # longer than the deadline, and the claim would answer such a row 255 without
            # its models (at 45 rows 71% were, 2026-12-07: the batch measured as a third
            # of its size).
            cur.execute(bench_query("batch_fresh"))
        token = secrets.token_hex(16)
        params = {
            "limit": size,
            "deadline_s": self.cfg.inference.max_latency_ms / 1000.0,
            "token": token,
        }
        rows = claimed(self.conn.execute(query("claim_batch"), params, binary=True).fetchall())
        if len(rows) != size:
            raise BenchError(f"claimed {len(rows)} rows of the {size} just inserted")
        return token, rows


def measure(
    database_url: str,
    redis_url: str,
    models_dir: Path,
    sizes: list[int],
    batches: int,
    warmup: int,
    seed: int = 0,
    pause_ms: float = 0.0,
) -> dict[str, Any]:
    """{"sizes": {n: {"task_ms": {p25, median, p75}, "steps_ms": {step: mean}}}, "fit": ...};
    each batch run ``pause_ms`` after the one before it ended."""
    from mltasks.bench.database import recreate_database
    from mltasks.config import set_config
    from mltasks.fallback.levels import LevelStore
    from mltasks.serving.batch import infer_batch
    from mltasks.serving.process import close_pool

    recreate_database(database_url)
    cfg = worker_config(database_url, redis_url, models_dir)
    flush_bench_dbs(redis_url)
    set_config(cfg)
    store = LevelStore(cfg)
    try:
        store.set(LEVEL, "bench batch")
    finally:
        store.redis.close()
    results: dict[int, dict[str, Any]] = {}
    try:
        # The first call finalizes the Celery app and loads the level's models: seconds,
        # which would make the first rows stale (answered 255 without the models).
        infer_batch([], LEVEL, time.time(), [], "")
        with psycopg.connect(database_url, autocommit=True) as conn:
            source = Batches(conn, cfg, seed)
            for size in sizes:
                cpu: dict[str, float] = {}
                times: list[float] = []
                # Every batch of the size claimed first: between two timed tasks this
                # process runs nothing else (the game's INSERTs and the claim did, and
                # cooled the task's code as a pause does).
                made = [source.next(size) for _ in range(warmup + batches)]
                with timed_steps(cpu):
                    for i, (rows, _, token) in enumerate(made):
                        if i == warmup:
                            cpu.clear()
                        if pause_ms:  # a worker idle in BRPOP between two batches
                            time.sleep(pause_ms / 1000)
                        # The rows as young as the call: the task answers a row past its
                        # stale limit 255 without its models (a stall of this host).
                        now = time.time()
                        t0 = time.thread_time()
                        answered = infer_batch(rows, LEVEL, now, [now] * len(rows), token)
                        spent = time.thread_time() - t0
                        if answered != size:
                            raise BenchError(f"a batch of {size} came back {answered} answered")
                        if i >= warmup:
                            times.append(spent)
                _all_inferred(conn, size, source.set_aside)
                results[size] = _summary(times, cpu, batches)
    finally:
        close_pool()
        set_config(None)
    return {
        "level": LEVEL,
        "batches": batches,
        "warmup": warmup,
        "pause_ms": pause_ms,
        "sizes": results,
        "fit": fit(results),
    }


def _all_inferred(conn: psycopg.Connection[Any], size: int, set_aside: int = 0) -> None:
    """Every row measured so far answered by the models (a 255 would be a row the task
    skipped); ``set_aside``: the overdue rows of claims that were not measured."""
    row = conn.execute(bench_query("batch_not_inferred")).fetchone()
    skipped = (int(row[0]) if row else 0) - set_aside
    if skipped:
        raise BenchError(f"{skipped} rows were not answered by the models (batches of {size})")


def _summary(times: list[float], cpu: dict[str, float], batches: int) -> dict[str, Any]:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {
        "task_ms": {
            "p25": round(q[0] * 1000, 4),
            "median": round(statistics.median(times) * 1000, 4),
            "p75": round(q[2] * 1000, 4),
        },
        "steps_ms": {
            k: round(v / batches * 1000, 4) for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])
        },
    }


def fit(results: dict[int, dict[str, Any]]) -> dict[str, float] | None:
    """Fixed cost a batch and marginal cost a row (ms), from the smallest and the largest
    size's medians; None with one size."""
    if len(results) < 2:
        return None
    small, large = min(results), max(results)
    a, b = results[small]["task_ms"]["median"], results[large]["task_ms"]["median"]
    marginal = (b - a) / (large - small)
    return {"fixed_ms": round(a - marginal * small, 4), "per_row_ms": round(marginal, 4)}


def markdown(report: dict[str, Any]) -> str:
    sizes: dict[int, dict[str, Any]] = {int(k): v for k, v in report["sizes"].items()}
    order = sorted(sizes)
    lines = [
        f"# Batch cost, {report['started_at']}",
        "",
        f"`{report['command']}`",
        "",
        f"The batch task in one process at level {report['level']}, on claimed rows of distinct "
        f"states (no cache hit); thread CPU per batch over {report['batches']} batches after "
        f"{report['warmup']} of warm-up. Steps: the mean thread CPU a batch inside each step."
        + _pause_text(report.get("pause_ms") or 0.0),
        "",
        "| thread CPU, ms | " + " | ".join(f"{n} row{'s' * (n != 1)}" for n in order) + " |",
        "| --- | " + " | ".join("---:" for _ in order) + " |",
    ]
    task = [sizes[n]["task_ms"] for n in order]
    lines.append(
        "| the whole task (median) | " + " | ".join(f"**{t['median']:.3f}**" for t in task) + " |"
    )
    lines.append(
        "| p25 - p75 | " + " | ".join(f"{t['p25']:.3f} - {t['p75']:.3f}" for t in task) + " |"
    )
    lines.append(
        "| per row | "
        + " | ".join(f"{t['median'] / n:.4f}" for t, n in zip(task, order, strict=True))
        + " |"
    )
    steps = sorted(
        {s for n in order for s in sizes[n]["steps_ms"]},
        key=lambda s: -sizes[order[-1]]["steps_ms"].get(s, 0.0),
    )
    for step in steps:
        cells = " | ".join(f"{sizes[n]['steps_ms'].get(step, 0.0):.3f}" for n in order)
        lines.append(f"| {step} | {cells} |")
    f = report.get("fit")
    if f:
        lines += [
            "",
            f"Fixed cost a batch {f['fixed_ms']:.3f} ms, each row {f['per_row_ms'] * 1000:.1f} us "
            f"(from {order[0]} and {order[-1]} rows).",
        ]
    lines += ["", machine_line(report["machine"]), ""]
    return "\n".join(lines)


def _pause_text(pause_ms: float) -> str:
    if not pause_ms:
        return " Batches back to back (a busy worker's: its code warm)."
    return (
        f" Each batch {pause_ms:g} ms after the last one ended, as a worker that waited for"
        " it (its code cold)."
    )


def write(report: dict[str, Any], out: Path) -> str:
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    md = markdown(report)
    (out / "report.md").write_text(md)
    return md
