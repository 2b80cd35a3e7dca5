"""``mltasks bench precisions``: fp32, int8 and fp16 inference time on the CPU.

A thin shell around ``mltasks.models.timings.time_precisions`` (median time per
``session.run`` over the demo models, one thread per session as the workers run,
precisions interleaved so that other load falls on all of them alike), written as a
table, JSON and a bar chart.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mltasks.bench import plots
from mltasks.bench.report import machine_line

SCHEMA_VERSION = 1


def measure(models_dir: Path, batch_sizes: list[int], repeats: int, threads: int) -> dict[str, Any]:
    """The timings, JSON-ready (batch sizes as string keys, as JSON has them)."""
    from mltasks.models.timings import time_precisions

    load_before = os.getloadavg()
    t = time_precisions(models_dir, batch_sizes, repeats, intra_op_threads=threads)
    return {
        "models": t["models"],
        "batch_sizes": list(t["batch_sizes"]),
        "repeats": t["repeats"],
        "intra_op_threads": t["intra_op_threads"],
        "onnxruntime": t["onnxruntime"],
        "median_us": {
            p: {str(b): round(v, 1) for b, v in by.items()} for p, by in t["median_us"].items()
        },
        "ratio_to_fp32": {
            p: {str(b): round(v, 3) for b, v in by.items()} for p, by in t["ratio_to_fp32"].items()
        },
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


def markdown(report: dict[str, Any]) -> str:
    t = report["timings"]
    batches = [str(b) for b in t["batch_sizes"]]
    lines = [
        f"# Precisions on the CPU, {report['started_at']}",
        "",
        f"`{report['command']}`",
        "",
        f"Median µs per `session.run` over {t['models']} demo models, {t['repeats']} calls "
        f"each per batch size, {t['intra_op_threads']} intra-op thread(s), onnxruntime "
        f"{t['onnxruntime']}; in brackets the ratio to fp32 (below 1 is faster). Load "
        f"average {t['load_average_before'][0]} before, {t['load_average_after'][0]} after.",
        "",
        "| precision | "
        + " | ".join(f"batch {b}" for b in batches)
        + " | "
        + " | ".join(f"µs/row at {b}" for b in batches)
        + " |",
        "| --- | " + " | ".join("---:" for _ in batches * 2) + " |",
    ]
    for p, by in t["median_us"].items():
        ratio = t["ratio_to_fp32"].get(p, {})
        cells = [f"{by[b]:.1f} ({ratio.get(b, float('nan')):.2f}x)" for b in batches]
        per_row = [f"{by[b] / int(b):.2f}" for b in batches]
        lines.append(f"| {p} | " + " | ".join(cells) + " | " + " | ".join(per_row) + " |")
    lines += ["", machine_line(report["machine"])]
    if report["plots"]:
        lines += ["", *[f"![{p}]({p})" for p in report["plots"]]]
    return "\n".join(lines) + "\n"


def write(report: dict[str, Any], out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = []
    if plots.available():
        plots.precision_bars(report["timings"], out / "precisions.png", "CPU time per call")
        report["plots"] = ["precisions.png"]
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (out / "report.md").write_text(md)
    return md
