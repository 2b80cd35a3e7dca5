"""PNG plots of a report: latency CDF per load, throughput and p99 against offered load.

Drawn from the report's own JSON (each run carries its latency quantiles, ``cdf_ms``), so
a report can be plotted again later without the run. matplotlib is optional (the
``bench`` extra): without it the plots are skipped with a note, the figures stay.
Only the object-oriented API is used (no pyplot): no global backend, no GUI, no state
left in the process.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _groups(runs: Sequence[dict[str, Any]], load_key: str) -> dict[str, list[dict[str, Any]]]:
    """Runs with figures, by responder (in the order they first appear), one per load.

    Of several attempts at one load (a failed step run again) the best is drawn: one
    that held, else the one with the lowest p99; the report's tables list them all.
    """
    best: dict[str, dict[float, dict[str, Any]]] = defaultdict(dict)

    def rank(r: dict[str, Any]) -> tuple[bool, float]:
        p99 = (r.get("latency_ms") or {}).get("p99")
        return (not r.get("held", True), float("inf") if p99 is None else float(p99))

    for r in runs:
        if "failed" in r:
            continue
        load = float(r[load_key])
        seen = best[r["responder"]].get(load)
        if seen is None or rank(r) < rank(seen):
            best[r["responder"]][load] = r
    return {name: [by[k] for k in sorted(by)] for name, by in best.items()}


def latency_cdf(
    runs: Sequence[dict[str, Any]],
    path: Path,
    *,
    load_key: str,
    load_label: Callable[[Any], str],
    title: str,
    limit_ms: float | None = None,
    share_key: str | None = "answered_share",
    y_label: str = "share of requests answered",
) -> Path:
    """One panel per responder, one curve per load: share of requests answered within x ms.

    Curves end at the share answered, so a load that lost requests ends below 1.
    """
    groups = _groups(runs, load_key)
    n = max(1, len(groups))
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig = _figure(6.0 * cols, 3.8 * rows + 0.5)
    grid = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[len(groups) :]:
        ax.set_visible(False)
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    for ax, (name, group) in zip(axes, groups.items(), strict=False):
        ordered = sorted(group, key=lambda r: float(r[load_key]))
        for i, r in enumerate(ordered):
            ms = r.get("cdf_ms") or []
            if not ms:
                continue
            top = float(r.get(share_key, 1.0)) if share_key else 1.0
            ys = [top * i / (len(ms) - 1) for i in range(len(ms))] if len(ms) > 1 else [top]
            xs = [max(v, 0.01) for v in ms]
            color = cmap(0.9 * i / max(1, len(ordered) - 1))
            ax.plot(xs, ys, label=load_label(r[load_key]), linewidth=1.4, color=color)
        if limit_ms is not None:
            ax.axvline(limit_ms, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_title(name)
        ax.set_xlabel("latency (ms, log scale)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right", ncol=2 if len(ordered) > 6 else 1)
    for row in grid:
        row[0].set_ylabel(y_label)
    fig.suptitle(title)
    fig.savefig(path)
    return path


def load_curves(
    runs: Sequence[dict[str, Any]],
    path: Path,
    *,
    load_key: str,
    x_label: str,
    throughput_key: str,
    throughput_label: str,
    p99: Callable[[dict[str, Any]], float | None],
    title: str,
    limit_ms: float | None = None,
    diagonal: bool = False,
) -> Path:
    """Left: throughput against offered load; right: p99 latency against offered load."""
    fig = _figure(11.0, 4.2)
    left, right = fig.subplots(1, 2)
    top = 0.0
    for name, group in _groups(runs, load_key).items():
        group = sorted(group, key=lambda r: float(r[load_key]))
        xs = [float(r[load_key]) for r in group]
        top = max(top, *xs)
        left.plot(xs, [r[throughput_key] for r in group], marker="o", label=name)
        pts = [(x, p99(r)) for x, r in zip(xs, group, strict=True)]
        pts = [(x, y) for x, y in pts if y is not None]
        if pts:
            right.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=name)
    lows = [float(r[load_key]) for r in runs if "failed" not in r and float(r[load_key]) > 0]
    bottom = min(lows) if lows else 0.0
    if diagonal and top:
        left.plot(
            [bottom, top], [bottom, top], color="grey", linestyle=":", linewidth=1, label="offered"
        )
    if limit_ms is not None:
        right.axhline(limit_ms, color="grey", linestyle="--", linewidth=1, label="limit")
    if bottom and top / bottom > 20:  # loads over decades: log scales show them all
        for ax in (left, right):
            ax.set_xscale("log")
        left.set_yscale("log")
    left.set_xlabel(x_label)
    left.set_ylabel(throughput_label)
    right.set_xlabel(x_label)
    right.set_ylabel("p99 latency (ms, log scale)")
    right.set_yscale("log")
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path)
    return path


def precision_bars(timings: dict[str, Any], path: Path, title: str) -> Path:
    """Median time per call, by batch size, one bar per precision."""
    median: dict[str, dict[str, float]] = timings["median_us"]
    batches = [str(b) for b in timings["batch_sizes"]]
    precisions = list(median)
    fig = _figure(7.0, 4.0)
    ax = fig.subplots()
    width = 0.8 / max(1, len(precisions))
    for i, p in enumerate(precisions):
        xs = [j + (i - (len(precisions) - 1) / 2) * width for j in range(len(batches))]
        ax.bar(xs, [float(median[p][b]) for b in batches], width=width, label=p)
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_ylabel("median µs per session.run")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.savefig(path)
    return path


def model_costs(results: dict[str, Any], path: Path) -> Path:
    """Milliseconds per batch against batch size: one line per type at its best precision
    and fewest threads, and one dashed line per level's fusion."""
    batches = [str(b) for b in results["batches"]]
    fig = _figure(8.0, 5.0)
    ax = fig.subplots()
    xs = [int(b) for b in batches]
    threads = str(min(results["threads"]))
    for model_type, row in results["types"].items():
        timed = [
            (p, e["ms"][threads]) for p, e in row.items() if isinstance(e, dict) and e.get("ms")
        ]
        if not timed:
            continue
        precision, by = min(timed, key=lambda pe: pe[1][batches[-1]])
        ax.plot(xs, [by[b] for b in batches], marker="o", label=f"{model_type} ({precision})")
    for level, entry in results["levels"].items():
        ax.plot(
            xs,
            [entry["ms"][b] for b in batches],
            linestyle="--",
            linewidth=2,
            label=f"level {level} fusion ({entry['precision']})",
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("rows per batch")
    ax.set_ylabel("median ms per batch")
    ax.axhline(15.0, color="red", linewidth=1, alpha=0.5)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"Model cost on the CPU, {threads} thread(s)")
    fig.savefig(path)
    return path
