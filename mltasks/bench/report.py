"""Figures of a gateway run, the machine they were measured on, and the Markdown report.

A decision's latency is the time from the start of its INSERT until the game could act:
the answer seen, or the timeout passed (then the game used its own AI). Percentiles are
over all decisions, so a p99 at the timeout means more than 1% timed out.
"""

from __future__ import annotations

import contextlib
import os
import platform
import threading
import time
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from mltasks.bench.bulk import cdf_points
from mltasks.bench.cpucost import cpu_lines
from mltasks.bench.responders import FLOOR_NAMES
from mltasks.bench.vary import markdown_lines as vary_lines
from mltasks.contract import TRADITIONAL_AI
from mltasks.game import ANSWERED, PARSE_FAILURE, TIMEOUT, GatewayResult


def _pct(values: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values.size else None


def summarize(result: GatewayResult) -> dict[str, Any]:
    """The figures of one run, JSON-ready."""
    lat = np.asarray(result.latencies_ms, dtype=np.float64)
    outcomes = np.asarray(result.outcomes, dtype=np.int64)
    n = int(lat.size)
    answered = int((outcomes == ANSWERED).sum())
    timeouts = int((outcomes == TIMEOUT).sum())
    parse_failures = int((outcomes == PARSE_FAILURE).sum())
    actions = Counter(
        a for a, o in zip(result.actions, result.outcomes, strict=True) if o == ANSWERED
    )
    n255 = actions.get(TRADITIONAL_AI, 0)
    answered_lat = lat[outcomes == ANSWERED]
    cores = os.cpu_count() or 1
    return {
        "clients": result.clients,
        "elapsed_s": round(result.elapsed_s, 3),
        "decisions": n,
        "decisions_per_s": round(n / result.elapsed_s, 1) if result.elapsed_s > 0 else 0.0,
        "answered_in_time": answered,
        "in_time_share": round(answered / n, 4) if n else 0.0,
        "timeouts": timeouts,
        "parse_failures": parse_failures,
        "invalid_answers": result.invalid_answers,
        "errors": result.error_count,
        "error_messages": result.errors,
        "latency_ms": {
            "p50": _pct(lat, 50),
            "p95": _pct(lat, 95),
            "p99": _pct(lat, 99),
            "max": round(float(lat.max()), 2) if n else None,
            "mean": round(float(lat.mean()), 2) if n else None,
        },
        "answered_latency_ms": {"p50": _pct(answered_lat, 50), "p99": _pct(answered_lat, 99)},
        # Latency at evenly spaced quantiles of every decision, for the CDF plot.
        "cdf_ms": cdf_points(lat),
        "actions": {str(a): c for a, c in sorted(actions.items())},
        "share_255": round(n255 / n, 4) if n else 0.0,
        # 255 answers, timeouts and would-be crashes: every decision the game's own AI made.
        "traditional_ai_share": round((n255 + timeouts + parse_failures) / n, 4) if n else 0.0,
        "client_cpu_s": round(result.client_cpu_s, 2),
        "client_cpu_share_of_machine": (
            round(result.client_cpu_s / (result.elapsed_s * cores), 3)
            if result.elapsed_s > 0
            else 0.0
        ),
    }


class CpuMeter:
    """How busy the whole machine was since construction: on 2 cores the clients,
    PostgreSQL and the responder compete, and other load skews every figure."""

    def __init__(self) -> None:
        self._start = psutil.cpu_times()

    def busy_share(self) -> float:
        end = psutil.cpu_times()
        total = sum(end) - sum(self._start)
        idle = (end.idle - self._start.idle) + (
            getattr(end, "iowait", 0.0) - getattr(self._start, "iowait", 0.0)
        )
        return round(1.0 - idle / total, 3) if total > 0 else 0.0


def _own_cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    # Children it already reaped count too: a test runner's finished workers, say.
    return float(t.user + t.system + t.children_user + t.children_system)


class OthersMeter:
    """CPU the rest of the machine used during a run: everything but this process and its
    descendants (responders, client processes), the benchmark database's PostgreSQL
    backends, PostgreSQL's writers and the run's Redis server. On a shared 2-core machine
    this is what disturbed a run. Kernel threads cannot be told apart (the I/O of the
    run's own commits among them): the figure is an upper bound.

    Our processes are sampled every ``interval_s`` in a thread, so a connection's backend
    that ends before the run does (the clients') still counts as ours, but for at most
    the last interval.
    """

    def __init__(self, markers: tuple[str, ...], interval_s: float = 1.0) -> None:
        self.markers = markers  # command-line fragments of ours: the db name, redis port
        self._busy = CpuMeter()
        self._t0 = time.monotonic()
        self._start = self._ours()
        self._last = dict(self._start)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._sample, args=(interval_s,), name="others-meter", daemon=True
        )
        self._thread.start()

    def _ours(self) -> dict[int, float]:
        me = psutil.Process()
        pids = {me.pid}
        with contextlib.suppress(psutil.Error):
            pids.update(c.pid for c in me.children(recursive=True))
        out: dict[int, float] = {}
        for proc in psutil.process_iter(["pid", "cmdline"]):
            with contextlib.suppress(psutil.Error):
                cmd = " ".join(proc.info["cmdline"] or ())
                if proc.pid in pids or any(m in cmd for m in self.markers):
                    out[proc.pid] = _own_cpu(proc)
        return out

    def _sample(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self._last.update(self._ours())

    def share(self) -> float:
        """The share of the machine (all cores) the others used since construction."""
        self._stop.set()
        self._thread.join(5)
        self._last.update(self._ours())
        elapsed = time.monotonic() - self._t0
        cores = os.cpu_count() or 1
        busy_s = self._busy.busy_share() * elapsed * cores
        ours_s = sum(t - self._start.get(pid, 0.0) for pid, t in self._last.items())
        others = max(0.0, busy_s - ours_s)
        return round(others / (elapsed * cores), 3) if elapsed > 0 else 0.0


def code_fingerprint() -> dict[str, Any]:
    """Which service code was measured: a hash over its sources (the package but the
    benchmark, the bridge, beat, sql/) and when the newest of them changed. Figures move
    with the code; this tells two reports' code apart without a VCS."""
    import hashlib
    from datetime import UTC, datetime

    from mltasks.config import REPO_ROOT

    bench = Path(__file__).resolve().parent
    files = sorted(
        p
        for d in ("mltasks", "bridge", "beat", "sql")
        for p in (REPO_ROOT / d).rglob("*")
        if p.suffix in (".py", ".sql") and p.is_file() and bench not in p.parents
    )
    digest = hashlib.sha256()
    newest = 0.0
    for p in files:
        with contextlib.suppress(OSError):
            digest.update(str(p.relative_to(REPO_ROOT)).encode() + b"\0" + p.read_bytes())
            newest = max(newest, p.stat().st_mtime)
    return {
        "sha256": digest.hexdigest()[:16],
        "files": len(files),
        "newest_change": datetime.fromtimestamp(newest, UTC).isoformat(timespec="seconds"),
    }


def code_line(m: dict[str, Any]) -> str:
    code = m.get("code")
    if not code:
        return ""
    return (
        f" Service code {code['sha256']} ({code['files']} files, newest {code['newest_change']})."
    )


def machine_line(m: dict[str, Any]) -> str:
    """The short Markdown line of `machine`'s figures (CPUs, memory, OS)."""
    return f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gb']} GB, {m['os']}."


def machine() -> dict[str, Any]:
    """Where the figures were measured: they mean little without it."""
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        model = platform.processor() or "?"
    versions: dict[str, str | None] = {}
    for dist in ("onnxruntime", "celery", "psycopg", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": model,
        "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": versions,
        "code": code_fingerprint(),
    }


def ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Service against floor at each client count measured with both; with ``--rounds``,
    round by round (a service run against the floors of its own round, which ran beside
    it). The variants of ``--vary`` are left out here: they are compared with each other
    (`vary.compare`), and each against the floors in the runs' table."""
    by_key = {(r["responder"], r["clients"], r.get("round")): r for r in runs if "failed" not in r}
    out = []
    for clients, rnd in sorted({(r["clients"], r.get("round") or 0) for r in runs}):
        key = rnd or None
        svc = by_key.get(("service", clients, key))
        for floor in FLOOR_NAMES:
            flo = by_key.get((floor, clients, key))
            if svc is None or flo is None:
                continue
            s_lat, f_lat = svc["latency_ms"], flo["latency_ms"]
            out.append(
                {
                    "clients": clients,
                    **({"round": rnd} if rnd else {}),
                    "floor": floor,
                    "decisions_per_s_ratio": _ratio(svc["decisions_per_s"], flo["decisions_per_s"]),
                    "p50_diff_ms": (
                        round(s_lat["p50"] - f_lat["p50"], 2)
                        if s_lat["p50"] is not None and f_lat["p50"] is not None
                        else None
                    ),
                    "p99_ratio": _ratio(s_lat["p99"], f_lat["p99"]),
                    "cpu_per_decision_ratio": _ratio(
                        (svc.get("per_decision") or {}).get("cpu_ms_total"),
                        (flo.get("per_decision") or {}).get("cpu_ms_total"),
                    ),
                }
            )
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def level_moved(level: int | None, after: int | None) -> str | None:
    """A note when the fallback level was not where the run wanted it at the end: the
    forced level, or (as deployed, on a CPU host) level 3 or better."""
    if after is None:
        return None
    if level is not None and after != level:
        return f"the fallback level moved from {level} to {after} during the run"
    if level is None and after > 3:
        return f"the service degraded to fallback level {after} during the run"
    return None


def _describe(service: dict[str, Any]) -> str:
    """``level 3, solo x1, cache on``: the configuration a service run used."""
    level = service.get("level")
    parts = ["as deployed (no level forced)" if level is None else f"level {level} forced"]
    if service.get("pool"):
        parts.append(f"{service['pool']} x{service.get('concurrency')}")
    parts.append("cache on" if service.get("caching", True) else "cache off")
    return ", ".join(parts)


def _num(v: Any) -> str:
    return f"{v:.0f}" if isinstance(v, float) and v.is_integer() else str(v)


def fmt(v: Any, suffix: str = "") -> str:
    return "n/a" if v is None else f"{v}{suffix}"


def _busy(run: dict[str, Any]) -> str:
    shares = (
        run.get("client_cpu_share_of_machine"),
        run.get("responder_cpu_share_of_machine"),
        run.get("machine_cpu_busy_share"),
        run.get("others_cpu_share"),
    )
    return "/".join("n/a" if v is None else f"{v * 100:.0f}" for v in shares) + "%"


def _actions(hist: dict[str, int]) -> str:
    return " ".join(f"{a}:{c}" for a, c in hist.items()) or "-"


def memory_lines(
    runs: list[dict[str, Any]], *, key: str, key_label: str, first_only: bool = False
) -> list[str]:
    """The worker memory table of the runs that measured it (Markdown lines); with
    ``first_only`` one run per responder (a rate search starts a service per step)."""
    mems = [r for r in runs if r.get("worker_memory")]
    if first_only:
        firsts: dict[str, dict[str, Any]] = {}
        for r in mems:
            firsts.setdefault(r["responder"], r)
        mems = list(firsts.values())
    if not mems:
        return []
    lines = [
        "Worker memory (with `preload: all` every process that runs tasks holds the 54 "
        "models: prefork children, or the main process for threads and solo; RSS counts "
        "pages shared with the parent, USS does not):",
        "",
        f"| responder | {key_label} | when | pool | worker main RSS / USS MB "
        "| children RSS MB | children USS MB |",
        "| --- | ---: | --- | --- | ---: | --- | --- |",
    ]
    for r in mems:
        for when, mem in r["worker_memory"].items():
            if mem is None:
                continue
            kids = mem["children"]
            lines.append(
                f"| {r['responder']} | {_num(r[key])} | {when} | {mem.get('pool', 'prefork')} "
                f"| {mem['worker_main_rss_mb']} / {fmt(mem.get('worker_main_uss_mb'))} "
                f"| {', '.join(str(c['rss_mb']) for c in kids) or '-'} "
                f"| {', '.join(str(c.get('uss_mb', 'n/a')) for c in kids) or '-'} |"
            )
    return lines


def _round_head(rows: list[dict[str, Any]]) -> str:
    """A ``round`` column where the rows have one (``--rounds``, ``--vary``), else none."""
    return " | round" if any("round" in r for r in rows) else ""


def _round_rule(rows: list[dict[str, Any]]) -> str:
    return " | ---:" if any("round" in r for r in rows) else ""


def _round_cell(row: dict[str, Any]) -> str:
    return f" | {row['round']}" if "round" in row else ""


def markdown(report: dict[str, Any]) -> str:
    """The report for people: the runs, the ratios, the machine, the worker's memory."""
    m = report["machine"]
    lines = [
        f"# Gateway benchmark, {report['started_at']}",
        "",
        f"{report['duration_s']} s per run, timeout {report['timeout_ms']} ms, "
        f"poll every {report['poll_ms']} ms, "
        f"{'unprepared literal SQL' if report['literal_sql'] else 'prepared polls'}, "
        f"{report['client_processes']} client processes."
        + (f" Service: {_describe(report['service'])}." if report.get("service") else ""),
        "Latency: INSERT start until the answer was seen, or until the timeout for a decision "
        "that timed out. `255` and `in time` are shares of all decisions. CPU: shares of the "
        "whole machine used by the client processes, by the responder's processes, by "
        "everything, and by everything not working for the run (others: the disturbance).",
        "",
        f"| responder | clients{_round_head(report['runs'])} | decisions/s | in time | p50 ms "
        "| p95 ms | p99 ms | 255 | parse failures | errors | CPU clients/responder/all/others "
        "| actions (id:count) |",
        f"| --- | ---:{_round_rule(report['runs'])} | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | ---: | --- |",
    ]
    for r in report["runs"]:
        if "failed" in r:
            reason = r["failed"].strip().splitlines()[0] if r["failed"].strip() else "?"
            lines.append(
                f"| {r['responder']} | {r['clients']}{_round_cell(r)} | failed: {reason} "
                "| | | | | | | | | |"
            )
            continue
        lat = r["latency_ms"]
        lines.append(
            f"| {r['responder']} | {r['clients']}{_round_cell(r)} | {r['decisions_per_s']} "
            f"| {r['in_time_share'] * 100:.1f}% | {fmt(lat['p50'])} | {fmt(lat['p95'])} "
            f"| {fmt(lat['p99'])} | {r['share_255'] * 100:.1f}% | {r['parse_failures']} "
            f"| {r['errors']} | {_busy(r)} | {_actions(r['actions'])} |"
        )
    if report["ratios"]:
        lines += [
            "",
            f"| clients{_round_head(report['ratios'])} | against | decisions/s service/floor "
            "| p50 service - floor (ms) | p99 service/floor | CPU per decision service/floor |",
            f"| ---:{_round_rule(report['ratios'])} | --- | ---: | ---: | ---: | ---: |",
        ]
        for q in report["ratios"]:
            lines.append(
                f"| {q['clients']}{_round_cell(q)} | {q.get('floor', 'floor')} "
                f"| {fmt(q['decisions_per_s_ratio'])} "
                f"| {fmt(q['p50_diff_ms'])} | {fmt(q['p99_ratio'])} "
                f"| {fmt(q.get('cpu_per_decision_ratio'))} |"
            )
    variants = vary_lines(report)
    if variants:
        lines += ["", *variants]
    cpu = cpu_lines(report["runs"], key="clients", key_label="clients")
    if cpu:
        lines += ["", *cpu]
    lines += [
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gb']} GB, {m['os']}, "
        f"Python {m['python']}, PostgreSQL {report.get('postgres', '?')}." + code_line(m),
    ]
    mem = memory_lines(report["runs"], key="clients", key_label="clients")
    if mem:
        lines += ["", *mem]
    service_level = (report.get("service") or {}).get("level")
    moved = [
        (r, note)
        for r in report["runs"]
        if (note := level_moved(service_level, r.get("level_after")))
    ]
    if moved:
        lines += ["", "Notes:", ""]
        lines += [f"- {r['responder']} x{r['clients']}: {note}" for r, note in moved]
    problems = [r for r in report["runs"] if r.get("error_messages")]
    if problems:
        lines += ["", "Errors (first few per run):", ""]
        for r in problems:
            for msg in r["error_messages"][:5]:
                first = msg.strip().splitlines()[-1] if msg.strip() else msg
                lines.append(f"- {r['responder']} x{r['clients']}: {first}")
    if report.get("plots"):
        lines += ["", *[f"![{p}]({p})" for p in report["plots"]]]
    elif report.get("plots_skipped"):
        lines += ["", f"Plots skipped: {report['plots_skipped']}"]
    return "\n".join(lines) + "\n"


def gateway_plots(report: dict[str, Any], out: Path) -> list[str]:
    """Latency CDF per client count; decisions/s and p99 against client count."""
    from mltasks.bench import plots

    if not plots.available():
        report["plots_skipped"] = "matplotlib is not installed (pip install 'mltasks[bench]')"
        return []
    runs = report["runs"]
    plots.latency_cdf(
        runs,
        out / "latency_cdf.png",
        load_key="clients",
        load_label=lambda v: f"{v} clients",
        title="gateway: latency CDF per client count (INSERT to answer seen; timeouts at "
        f"{report['timeout_ms']} ms)",
        share_key=None,
        y_label="share of decisions done (timeouts at the timeout)",
    )
    plots.load_curves(
        runs,
        out / "load.png",
        load_key="clients",
        x_label="emulated map servers (clients)",
        throughput_key="decisions_per_s",
        throughput_label="decisions per second",
        p99=lambda r: r["latency_ms"]["p99"],
        title="gateway: throughput and p99 against load",
    )
    return ["latency_cdf.png", "load.png"]
