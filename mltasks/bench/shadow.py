"""``mltasks bench shadow``: what a candidate model shadowing every batch costs the game.

The service (a bridge and ``--workers`` solo ``-Q cpu`` workers at level 3, held, so the
models answer whatever the host's load) answers emulated map servers (`gateway`: the game's
statements and timeout) in three windows of the same length:

1. without a candidate;
2. with one: ``mltasks models deploy FILE --model M``, as an operator runs it, with the
   canary's verdicts out of reach (``canary.min_rows`` 10,000,000, latency never judged),
   so the candidate shadows every batch of M's archetype for the whole window;
3. after ``mltasks models rollback M``.

The clients decide only M's archetype, so every batch carries the candidate. Each window
reports the decisions' latency as the game sees it (insert to answer seen, or the timeout),
how many there were and the shares answered 255 and timed out. The shadow's own totals come
from the canary's hash in Redis over the second window (rows, batches, each version's ms per
batch); the cost is the shadowing window's p99 over the p99 without. The candidate runs after
a batch's answers are written: what it can cost the game is the CPU the next batches wait for.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mltasks import keys
from mltasks.bench import BenchError
from mltasks.bench.bulkrun import ours_markers_for
from mltasks.bench.database import recreate_database, reset_tables, run_stats
from mltasks.bench.procs import wait_until_answering
from mltasks.bench.report import OthersMeter, summarize
from mltasks.bench.service import Service, ServiceSettings, cache_redis
from mltasks.errors import ModelError
from mltasks.game import GatewaySpec, run_gateway
from mltasks.models import versions
from mltasks.state import DEFAULT_LAYOUT

SCHEMA_VERSION = 1
WINDOWS = ("without", "shadowing", "after rollback")
DEFAULT_MODEL = "aggressive/combat_dqn"
# The candidate stays in canary for the whole run: never enough rows to promote it, its
# latency never judged (a shared host's stall must not roll it back mid-window).
CANARY_HELD: tuple[tuple[str, str, Any], ...] = (
    ("canary", "share", 1.0),
    ("canary", "min_rows", 10_000_000),
    ("canary", "latency_min_batches", 1_000_000),
)
# Warm-up decisions go on this long after the first shadowed row: a worker loads a new
# version in the background from its first batch after the deploy, and shadows from the
# batch after that, so every worker has to see a few batches first.
SETTLE_S = 1.0
SHADOW_TIMEOUT_S = 60.0
_FIELDS = ("rows", "batches", "errors", "non_finite", "agree", "candidate_s", "active_s")
_TOLD = re.compile(r"(\d+) worker\(s\) told")


@dataclass(frozen=True, slots=True)
class ShadowOptions:
    database_url: str = field(repr=False)
    redis_url: str
    models_dir: Path  # deploys write versions and pointers here: the run's own copy
    window_s: float = 10.0
    clients: int = 4
    timeout_ms: int = 15
    workers: int = 2
    model: str = DEFAULT_MODEL
    candidate: Path | None = None  # None: the demo model fitted with another seed
    seed: int = 0
    layout: str = DEFAULT_LAYOUT

    def __post_init__(self) -> None:
        if self.window_s <= 0 or self.clients < 1 or self.workers < 1:
            raise BenchError("--window-s must be positive, --clients and --workers at least 1")
        if self.timeout_ms <= 0:
            raise BenchError("--timeout-ms must be positive")
        try:
            versions.parse_model(self.model)
        except ModelError as exc:
            raise BenchError(f"--model: {exc}") from None
        if self.candidate is not None and not self.candidate.is_file():
            raise BenchError(f"--candidate: {self.candidate}: no such file")

    @property
    def archetype(self) -> str:
        return versions.parse_model(self.model)[0]

    @classmethod
    def from_args(cls, args: argparse.Namespace, models_dir: Path) -> ShadowOptions:
        """The options of ``mltasks bench shadow`` (one per field, by the field's name)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"models_dir"}
        return cls(models_dir=models_dir, **{n: getattr(args, n) for n in names})


# -- pure parts: the figures ------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def shadow_figures(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """The candidate's totals over a window (the canary hash read before and after)."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in _FIELDS}
    rows, batches = d["rows"], d["batches"]
    return {
        "rows": int(rows),
        "batches": int(batches),
        "errors": int(d["errors"]),
        "non_finite": int(d["non_finite"]),
        "agreement": round(d["agree"] / rows, 4) if rows else None,
        "candidate_ms_per_batch": round(1000 * d["candidate_s"] / batches, 3) if batches else None,
        "active_ms_per_batch": round(1000 * d["active_s"] / batches, 3) if batches else None,
        "candidate_over_active": _ratio(d["candidate_s"], d["active_s"]),
    }


def cost(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """Shadowing against no candidate: p99 ratios (the figure asked for) and the p50 step."""
    lat = {w["window"]: w["latency_ms"] for w in windows}
    without = lat.get("without", {})
    shadowing = lat.get("shadowing", {})
    after = lat.get("after rollback", {})
    p50, p50_without = shadowing.get("p50"), without.get("p50")
    return {
        "p99_shadowing_over_without": _ratio(shadowing.get("p99"), without.get("p99")),
        "p99_after_rollback_over_without": _ratio(after.get("p99"), without.get("p99")),
        "p50_shadowing_minus_without_ms": (
            round(p50 - p50_without, 2) if p50 is not None and p50_without is not None else None
        ),
    }


def told(stdout: str) -> int | None:
    """How many workers answered the control command, from the models command's output."""
    m = _TOLD.search(stdout)
    return int(m[1]) if m else None


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown(report: dict[str, Any]) -> str:
    """The report as a table of the windows, then the shadow's totals and the cost."""
    s = report["settings"]
    lines = [
        f"# The cost of shadowing: {s['model']}, {s['clients']} clients, "
        f"{s['timeout_ms']} ms timeout, {s['window_s']:g} s windows",
        "",
        f"`{report['command']}`",
        "",
        "| window | decisions | decisions/s | p50 ms | p99 ms | answered 255 | timeouts "
        "| load before | others CPU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for w in report["windows"]:
        lines.append(
            f"| {w['window']} | {w['decisions']:,} | {w['decisions_per_s']:,.1f} "
            f"| {_ms(w['latency_ms']['p50'])} | {_ms(w['latency_ms']['p99'])} "
            f"| {w['share_255'] * 100:.1f}% | {w['timeouts']:,} "
            f"| {w['load_average_before']:.2f} | {w['others_cpu_share'] * 100:.0f}% |"
        )
    sh, c = report["shadow"], report["cost"]
    lines += [
        "",
        f"Shadow during the second window: {sh['rows']:,} rows in {sh['batches']:,} batches, "
        f"candidate {_ms(sh['candidate_ms_per_batch'])} ms/batch, active "
        f"{_ms(sh['active_ms_per_batch'])} ms/batch, agreement {sh['agreement']}, "
        f"errors {sh['errors']}, non-finite rows {sh['non_finite']}; rows shadowed after "
        f"the rollback: {report['shadow_after_rollback']['rows']}.",
        f"p99 shadowing / without: {c['p99_shadowing_over_without']}; after rollback / "
        f"without: {c['p99_after_rollback_over_without']}; p50 step "
        f"{c['p50_shadowing_minus_without_ms']} ms.",
        f"Deploy: version {report['deploy']['version']}, told {report['deploy']['told']} "
        f"of {s['workers']} workers; rollback told {report['rollback']['told']}.",
    ]
    return "\n".join(lines) + "\n"


def write(report: dict[str, Any], out: Path) -> str:
    """report.json and report.md into ``out``; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (out / "report.md").write_text(md)
    return md


# -- the run ----------------------------------------------------------------------------


def demo_candidate(model: str, layout: str, path: Path) -> Path:
    """A retrained version of ``model``: its demo model fitted with another seed (it agrees
    with the seed-0 one on about 98% of states), the candidate the tests deploy."""
    from mltasks.models.demo import demo_models

    archetype, model_type = versions.parse_model(model)
    fitted = demo_models(seed=1, archetypes=[archetype], layout=layout)
    blob = next(b for _, t, b in fitted if t == model_type)
    path.write_bytes(blob)
    return path


def models_command(service: Service, *args: str) -> str:
    """``mltasks models ...`` as an operator runs it against this service; its stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "mltasks.cli", "models", *args],
        env=service.command_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"mltasks models {args[0]} failed: {done.stderr.strip()}")
    return done.stdout


def _totals(r: Any, model: str, version: str) -> dict[str, float]:
    return {k.decode(): float(v) for k, v in r.hgetall(keys.canary_stats(model, version)).items()}


def _window(
    name: str, index: int, opts: ShadowOptions, say: Callable[[str], None]
) -> dict[str, Any]:
    """One window of game load on emptied tables (other states in each window)."""
    reset_tables(opts.database_url)
    spec = GatewaySpec(
        conninfo=opts.database_url,
        clients=opts.clients,
        duration_s=opts.window_s,
        timeout_ms=opts.timeout_ms,
        seed=opts.seed * len(WINDOWS) + index,
        literal_sql=True,
        layout=opts.layout,
        archetypes=(opts.archetype,),
    )
    load_before = os.getloadavg()[0]
    others = OthersMeter(ours_markers_for(opts.database_url, opts.redis_url))
    result = run_gateway(spec)
    run: dict[str, Any] = {
        "window": name,
        **summarize(result),
        "load_average_before": round(load_before, 2),
        "others_cpu_share": others.share(),
        "database": run_stats(opts.database_url),
    }
    lat = run["latency_ms"]
    say(
        f"{name:>15}: {run['decisions']} decisions, p50 {lat['p50']} ms, p99 {lat['p99']} ms, "
        f"255 {run['share_255'] * 100:.1f}%, timeouts {run['timeouts']}, "
        f"others {run['others_cpu_share'] * 100:.0f}%"
    )
    return run


def _until_shadowing(svc: Service, r: Any, opts: ShadowOptions, version: str) -> float:
    """Warm-up decisions until the candidate has shadowed rows, then ``SETTLE_S`` more."""
    t0 = time.monotonic()
    shadowed_at: float | None = None
    while True:
        wait_until_answering(opts.database_url, svc.procs, archetype=opts.archetype)
        now = time.monotonic()
        if shadowed_at is None and _totals(r, opts.model, version).get("rows", 0.0) > 0:
            shadowed_at = now
        if shadowed_at is not None and now - shadowed_at >= SETTLE_S:
            return now - t0
        if now - t0 > SHADOW_TIMEOUT_S:
            raise BenchError(
                f"{opts.model}@{version} shadowed no row within {SHADOW_TIMEOUT_S:.0f}s of "
                "its deploy (the workers' logs say why)"
            )


def _still_in_canary(opts: ShadowOptions, version: str) -> None:
    archetype, model_type = versions.parse_model(opts.model)
    p = versions.read_pointer(opts.models_dir, archetype, model_type)
    if p is None or p.canary is None or p.canary["version"] != version:
        why = p.last_rollback if p is not None else "no pointer"
        raise BenchError(f"{opts.model}@{version} left its canary during the window: {why}")


def run_shadow(
    opts: ShadowOptions, work: Path, logs: Path, say: Callable[[str], None]
) -> dict[str, Any]:
    """The three windows on one service; the report's body."""
    candidate = opts.candidate or demo_candidate(opts.model, opts.layout, work / "candidate.onnx")
    recreate_database(opts.database_url)
    settings = ServiceSettings(
        database_url=opts.database_url,
        redis_url=opts.redis_url,
        models_dir=opts.models_dir,
        work_dir=work,
        log_dir=logs,
        timeout_ms=opts.timeout_ms,
        concurrency=opts.workers,
        pool="solo",
        level=3,
        layout=opts.layout,
        overrides=CANARY_HELD,
    )
    r = cache_redis(opts.redis_url)
    windows: list[dict[str, Any]] = []
    try:
        with Service(settings, label="shadow") as svc:
            say(f"service ready in {svc.wait_ready():.1f}s")
            windows.append(_window(WINDOWS[0], 0, opts, say))
            out = models_command(svc, "deploy", str(candidate), "--model", opts.model)
            version = out.split()[0]
            deploy: dict[str, Any] = {"version": version, "told": told(out)}
            deploy["shadowing_after_s"] = round(_until_shadowing(svc, r, opts, version), 1)
            say(f"{opts.model}@{version} shadows (after {deploy['shadowing_after_s']}s)")
            before = _totals(r, opts.model, version)
            windows.append(_window(WINDOWS[1], 1, opts, say))
            during = _totals(r, opts.model, version)
            _still_in_canary(opts, version)
            rollback = {"told": told(models_command(svc, "rollback", opts.model))}
            windows.append(_window(WINDOWS[2], 2, opts, say))
            after = _totals(r, opts.model, version)
    finally:
        r.close()
    return {
        "settings": {
            "model": opts.model,
            "candidate": str(opts.candidate) if opts.candidate else "demo model, seed 1",
            "window_s": opts.window_s,
            "clients": opts.clients,
            "timeout_ms": opts.timeout_ms,
            "workers": opts.workers,
            "seed": opts.seed,
            "service": settings.describe(),
        },
        "deploy": deploy,
        "rollback": rollback,
        "windows": windows,
        "shadow": shadow_figures(before, during),
        "shadow_after_rollback": shadow_figures(during, after),
        "cost": cost(windows),
    }
