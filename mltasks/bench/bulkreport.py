"""Report of bulk and cache runs: JSON (with a checked schema), Markdown and plots.

Every figure of the service is also given as a ratio to the floor measured at the same
rate in the same run: on a shared 2-core machine absolute figures move with whatever
else runs, the ratio much less.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from mltasks.bench import plots
from mltasks.bench.cpucost import cpu_lines
from mltasks.bench.report import code_line, fmt, level_moved, memory_lines

SCHEMA_VERSION = 1
KINDS = ("bulk", "cache")
REPORT_KEYS = (
    "schema_version",
    "kind",
    "started_at",
    "command",
    "settings",
    "machine",
    "postgres",
    "load_average_start",
    "load_average_end",
    "responders",
    "runs",
    "ratios",
    "sustained",
    "plots",
)
RUN_KEYS = (
    "responder",
    "config",
    "rate",
    "requests",
    "offered_per_s",
    "answered",
    "answered_share",
    "answered_per_s",
    "latency_ms",
    "response_latency_ms",
    "share_255",
    "reasons_255",
    "sources",
    "held",
    "cdf_ms",
    "loader",
    "load_average_before",
)
LATENCY_KEYS = ("p50", "p90", "p99", "max", "mean")
FAILED_RUN_KEYS = ("responder", "config", "rate", "failed", "held")


def check_report(report: dict[str, Any]) -> None:
    """Raise ValueError naming what is missing or wrong; the JSON's contract."""
    problems = [f"missing key {k!r}" for k in REPORT_KEYS if k not in report]
    if report.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema_version is {report.get('schema_version')!r}")
    if report.get("kind") not in KINDS:
        problems.append(f"kind {report.get('kind')!r} is not one of {KINDS}")
    for i, run in enumerate(report.get("runs", [])):
        keys = FAILED_RUN_KEYS if "failed" in run else RUN_KEYS
        problems += [f"runs[{i}]: missing key {k!r}" for k in keys if k not in run]
        if "failed" not in run:
            for part in ("latency_ms", "response_latency_ms"):
                lat = run.get(part, {})
                problems += [
                    f"runs[{i}].{part}: missing {k!r}" for k in LATENCY_KEYS if k not in lat
                ]
            if not 0.0 <= float(run.get("answered_share", -1)) <= 1.0:
                problems.append(f"runs[{i}]: answered_share outside [0, 1]")
            cdf = run.get("cdf_ms", [])
            if any(b < a for a, b in itertools.pairwise(cdf)):
                problems.append(f"runs[{i}]: cdf_ms is not sorted")
    if problems:
        raise ValueError("bad report: " + "; ".join(problems))


def _ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    return round(a / b, digits) if a is not None and b else None


# The floors every other responder is measured against; the plumbing floor (the service
# with the broker floor's answer) only measures the services: what answering costs them.
AGAINST = ("floor", "broker floor", "plumbing floor")


def _measured(name: str, against: str) -> bool:
    """Whether responder ``name`` is measured against the floor ``against``."""
    if name in (against, "floor"):
        return False
    return not (against == "plumbing floor" and name in ("broker floor", "model floor"))


def cpu_ratio(run: dict[str, Any], floor: dict[str, Any]) -> float | None:
    """The run's CPU per decision (its processes, backends, Redis) over the floor's."""
    a, b = ((x.get("per_decision") or {}).get("cpu_ms_total") for x in (run, floor))
    return _ratio(a, b)


def ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each run against each floor run at the same rate (the same run's); the plain
    floor is measured against nothing, the broker floor against the plain floor."""
    out = []
    for against in AGAINST:
        floors = {r["rate"]: r for r in runs if r["responder"] == against and "failed" not in r}
        for r in runs:
            if not _measured(r["responder"], against) or "failed" in r or r["rate"] not in floors:
                continue
            f = floors[r["rate"]]
            lat, flat = r["latency_ms"], f["latency_ms"]
            out.append(
                {
                    "responder": r["responder"],
                    "against": against,
                    "rate": r["rate"],
                    "answered_per_s_ratio": _ratio(r["answered_per_s"], f["answered_per_s"]),
                    "answered_share_ratio": _ratio(r["answered_share"], f["answered_share"]),
                    "p50_ratio": _ratio(lat["p50"], flat["p50"], 1),
                    "p99_ratio": _ratio(lat["p99"], flat["p99"], 1),
                    "p50_diff_ms": (
                        round(lat["p50"] - flat["p50"], 2)
                        if lat["p50"] is not None and flat["p50"] is not None
                        else None
                    ),
                    "cpu_per_decision_ratio": cpu_ratio(r, f),
                    "floor_load_average": f["load_average_before"][0],
                    "load_average": r["load_average_before"][0],
                }
            )
    return out


def sustained_ratios(
    sustained: dict[str, dict[str, Any]], against: str = "floor"
) -> dict[str, float | None]:
    """Each responder's sustained rate over the floor's (``against``)."""
    floor = sustained.get(against, {}).get("rate")
    return {
        name: _ratio(v.get("rate"), floor)
        for name, v in sustained.items()
        if _measured(name, against) and floor
    }


def sustained_summary(sustained: dict[str, dict[str, Any]]) -> list[str]:
    """``service held X/s, broker floor held Y/s: 0.26x`` for each responder and floor."""
    out = []
    for against in AGAINST:
        floor = sustained.get(against, {}).get("rate")
        for name, ratio in sustained_ratios(sustained, against).items():
            rate = sustained[name].get("rate")
            held = "no rate" if rate is None else f"{rate:.0f}/s"
            shown = "n/a" if ratio is None else f"{ratio}x"
            out.append(
                f"{name} held {held}, {against} held {floor:.0f}/s: {name} / {against} {shown}"
            )
    return out


def _pct(share: float) -> str:
    return f"{share * 100:.2f}%"


def _run_line(r: dict[str, Any]) -> str:
    if "failed" in r:
        reason = r["failed"].strip().splitlines()[0] if r["failed"].strip() else "?"
        return f"| {r['responder']} | {r['rate']:.0f} | failed: {reason} |" + " |" * 11
    lat = r["latency_ms"]
    loader = r["loader"]
    late = loader["late_batches"] / loader["batches"] if loader["batches"] else 0.0
    loader_note = "**behind**" if loader["behind"] else f"{late * 100:.0f}% late"
    cpu = (
        f"{r.get('responder_cpu_share_of_machine', 0) * 100:.0f}/"
        f"{r.get('machine_cpu_busy_share', 0) * 100:.0f}%"
    )
    return (
        f"| {r['responder']} | {r['rate']:.0f} | {r['offered_per_s']} | {r['answered_per_s']} "
        f"| {_pct(r['answered_share'])} | {fmt(lat['p50'])} | {fmt(lat['p90'])} "
        f"| {fmt(lat['p99'])} | {fmt(lat['max'])} | {_pct(r['share_255'])} "
        f"| {_held(r)} | {loader_note} | {cpu} "
        f"| {_others(r)} | {r['load_average_before'][0]} |"
    )


def _notes(runs: list[dict[str, Any]]) -> list[str]:
    """What a reader must know about single runs: a level that moved, answers still
    missing after the drain."""
    out = []
    for r in runs:
        if "failed" in r:
            continue
        where = f"{r['responder']} @ {r['rate']:.0f}/s"
        moved = level_moved(r["config"].get("level"), r.get("level_after"))
        if moved:
            out.append(f"- {where}: {moved}")
        if r.get("unanswered_after_drain"):
            out.append(
                f"- {where}: {r['unanswered_after_drain']} requests still unanswered "
                f"{r.get('drain_s')} s after the load stopped"
            )
    return out


def _others(r: dict[str, Any]) -> str:
    share = r.get("others_cpu_share")
    return "n/a" if share is None else f"{share * 100:.0f}%"


def _held(r: dict[str, Any]) -> str:
    if r["held"]:
        return "yes"
    return "loader limit" if r.get("loader_limited") else "**no**"


def _sources(r: dict[str, Any]) -> str:
    parts = [f"{k} {v}" for k, v in r.get("sources", {}).items()]
    parts += [f"255 {k} {v}" for k, v in r.get("reasons_255", {}).items()]
    return ", ".join(parts) or "-"


def _hit(layer: dict[str, Any] | None, off: bool) -> str:
    if not layer or layer["hit_rate"] is None:
        return "off" if off else "-"
    return f"{layer['hit_rate'] * 100:.1f}% of {layer['lookups']}"


def markdown(report: dict[str, Any]) -> str:
    """The report for people."""
    s = report["settings"]
    m = report["machine"]
    if not s["states"]:
        states = "every request a distinct state (no cache can hit)"
    else:
        mobs = s.get("mobs", 1)
        states = f"requests drawn at random from {s['states']} states" + (
            f" x {mobs} mob ids" if mobs > 1 else ""
        )
    title = "Bulk benchmark" if report["kind"] == "bulk" else "Cache benchmark"
    la0, la1 = report["load_average_start"], report["load_average_end"]
    lines = [
        f"# {title} (open loop, COPY), {report['started_at']}",
        "",
        f"`{report['command']}`",
        "",
        f"{s['duration_s']} s per step, a COPY every {s['tick_ms']} ms, {states}, "
        f"bridge deadline {s['timeout_ms']} ms. A step holds when at least "
        f"{s['min_answered_share'] * 100:g}% of its requests are answered (an action, or "
        f"level 5's own 255) and their p99 is at most {s['p99_limit_ms']:g} ms. Latency: "
        "`ai_responses.created_at - ai_requests.created_at`, the database's clock. "
        "answered/s: answers written while requests were still arriving, per second. "
        "loader: share of COPY batches sent over 50 ms late (a disturbed machine), or "
        "**behind** when it could not offer the rate in time (a step that held otherwise "
        "then only shows a loader limit). "
        "CPU: the responder's share of the machine / the whole machine busy. others: the "
        "share of the machine used by everything not working for the run (other people's "
        "work: the disturbance). "
        f"Load average (1/5/15 min): {' '.join(map(str, la0))} at the start, "
        f"{' '.join(map(str, la1))} at the end.",
        "",
        "| responder | rate/s | offered/s | answered/s | answered | p50 ms | p90 ms | p99 ms "
        "| max ms | 255 | held | loader | CPU | others | load avg |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- "
        "| ---: | ---: | ---: |",
    ]
    lines += [_run_line(r) for r in report["runs"]]
    if report["sustained"]:
        sr = sustained_ratios(report["sustained"])
        broker = "broker floor" in report["sustained"]
        br = sustained_ratios(report["sustained"], "broker floor")
        plumbing = "plumbing floor" in report["sustained"]
        pr = sustained_ratios(report["sustained"], "plumbing floor")
        lines += [
            "",
            "Sustained rate (highest step that held):",
            "",
            "| responder | sustained/s | first failed/s | steps | of the floor's |"
            + (" of the broker floor's |" if broker else "")
            + (" of the plumbing floor's |" if plumbing else ""),
            "| --- | ---: | ---: | ---: | ---: |"
            + (" ---: |" if broker else "")
            + (" ---: |" if plumbing else ""),
        ]
        for name, v in report["sustained"].items():
            rate = v.get("rate")
            shown = "none held" if rate is None else f"{rate:.0f}"
            if rate is not None and (v.get("loader_limited") or v.get("max_rate_reached")):
                shown = f">= {shown} ({'loader limit' if v.get('loader_limited') else 'max'})"
            ff = v.get("first_failed")
            lines.append(
                f"| {name} | {shown} | {fmt(None if ff is None else round(ff))} "
                f"| {v['steps']} | {fmt(sr.get(name)) if name != 'floor' else '1'} |"
                + (f" {fmt(br.get(name))} |" if broker else "")
                + (f" {fmt(pr.get(name))} |" if plumbing else "")
            )
        summary = sustained_summary(report["sustained"])
        if summary:
            lines += ["", *summary]
    if report["ratios"]:
        lines += [
            "",
            "Against the floors at the same rate (same run; CPU: CPU per decision, see below):",
            "",
            "| responder | against | rate/s | answered/s ratio | p50 ratio | p50 diff ms "
            "| p99 ratio | CPU ratio |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for q in report["ratios"]:
            lines.append(
                f"| {q['responder']} | {q.get('against', 'floor')} | {q['rate']:.0f} "
                f"| {fmt(q['answered_per_s_ratio'])} | {fmt(q['p50_ratio'])} "
                f"| {fmt(q['p50_diff_ms'])} | {fmt(q['p99_ratio'])} "
                f"| {fmt(q.get('cpu_per_decision_ratio'))} |"
            )
    cached = [r for r in report["runs"] if "failed" not in r and r.get("cache")]
    if cached or report["kind"] == "cache":
        lines += [
            "",
            "Cache hit rate per layer (this run's lookups, from the workers' counters in "
            "Redis; L1 working memory, L2 actions, L3 model outputs) and who answered:",
            "",
            "| responder | rate/s | L1 | L2 | L3 | answered by |",
            "| --- | ---: | ---: | ---: | ---: | --- |",
        ]
        for r in report["runs"]:
            if "failed" in r or r["responder"] in AGAINST:
                continue
            layers = (r.get("cache") or {}).get("layers", {})
            off = not r["config"].get("caching", True)
            cells = [_hit(layers.get(layer), off) for layer in ("l1", "l2", "l3")]
            lines.append(
                f"| {r['responder']} | {r['rate']:.0f} | {' | '.join(cells)} | {_sources(r)} |"
            )
    cpu = cpu_lines(report["runs"], key="rate", key_label="rate/s")
    if cpu:
        lines += ["", *cpu]
    notes = _notes(report["runs"])
    if notes:
        lines += ["", "Notes:", "", *notes]
    mem = memory_lines(report["runs"], key="rate", key_label="rate/s", first_only=True)
    if mem:
        lines += ["", *mem]
    lines += [
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gb']} GB, {m['os']}, "
        f"Python {m['python']}, PostgreSQL {report.get('postgres', '?')}." + code_line(m),
    ]
    if report["plots"]:
        lines += ["", *[f"![{p}]({p})" for p in report["plots"]]]
    elif report.get("plots_skipped"):
        lines += ["", f"Plots skipped: {report['plots_skipped']}"]
    return "\n".join(lines) + "\n"


def draw(report: dict[str, Any], out: Path) -> list[str]:
    """The report's plots in ``out``; their file names."""
    runs = report["runs"]
    limit = float(report["settings"]["p99_limit_ms"])
    kind = report["kind"]
    names = []
    plots.latency_cdf(
        runs,
        out / "latency_cdf.png",
        load_key="rate",
        load_label=lambda v: f"{float(v):.0f}/s",
        title=f"{kind}: latency CDF per offered load (database clock)",
        limit_ms=limit,
    )
    names.append("latency_cdf.png")
    plots.load_curves(
        runs,
        out / "load.png",
        load_key="rate",
        x_label="offered load (requests/s)",
        throughput_key="answered_per_s",
        throughput_label="answered per second",
        p99=lambda r: r["latency_ms"]["p99"],
        title=f"{kind}: throughput and p99 against offered load",
        limit_ms=limit,
        diagonal=True,
    )
    names.append("load.png")
    return names


def write(report: dict[str, Any], out: Path, *, with_plots: bool = True) -> str:
    """report.json, report.md and the plots into ``out``; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = []
    if with_plots and plots.available():
        report["plots"] = draw(report, out)
    elif with_plots:
        report["plots_skipped"] = "matplotlib is not installed (pip install 'mltasks[bench]')"
    check_report(report)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (out / "report.md").write_text(md)
    return md
