"""``mltasks bench models``: what each model type and each level's fusion costs on this host.

Per type (one archetype's files; the types' cost hardly differs between archetypes except
tank combat_dqn and ranged spatial_vit), per CPU precision (the file as exported, its FP32
variant, its INT8 variant: built and verified as the service builds them), per intra-op
thread count and per batch size: the median milliseconds of one batched call, as the worker
makes it (`LoadedModel.run`: sequence windows, critics over the 10 actions), and rows/s.

Per fallback level: one worker's answering path for a batch without cache
(`inference.answer_batch`: validation, every fusion member, fusion), of one archetype and of
the six in turn, with the level's precision and the configured threads, and the resident
memory of a process that loaded the level's models (a fresh interpreter per level).

A GPU is measured only where onnxruntime has CUDA and NVML sees a device; otherwise the
report says "not measured: no GPU".
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mltasks.bench import plots
from mltasks.config import Config
from mltasks.contract import ARCHETYPES, MODEL_TYPES
from mltasks.models.discovery import find
from mltasks.models.family import SEQUENCE_LEN
from mltasks.state import get_layout

SCHEMA_VERSION = 1
PRECISIONS = ("fp16", "fp32", "int8")
LEVELS = (1, 2, 3)


def _median_ms(call: Any, repeats: int, budget_s: float) -> float:
    """Median wall milliseconds of ``call()``; at least 3 calls, at most ``repeats`` or the
    time budget, after one warm-up."""
    call()
    samples: list[float] = []
    stop = time.perf_counter() + budget_s
    while len(samples) < 3 or (len(samples) < repeats and time.perf_counter() < stop):
        t0 = time.perf_counter()
        call()
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def measure_types(
    config: Config,
    archetype: str,
    batches: Sequence[int],
    threads: Sequence[int],
    precisions: Sequence[str],
    repeats: int,
    budget_s: float,
) -> dict[str, Any]:
    """{type: {precision: {"agreement", "file", "ms": {threads: {batch: ms}}}}}."""
    from mltasks.models.loaded import load_model
    from mltasks.models.variants import CPU, native, resolve

    layout = get_layout(config.state.layout)
    states = layout.sample(np.random.default_rng(7), max(batches), archetype)
    windows = np.repeat(states[:, None, :], SEQUENCE_LEN, axis=1)
    out: dict[str, Any] = {}
    for model_type in MODEL_TYPES:
        found = find(config.models.dir, archetype, model_type)
        if found is None:
            continue
        row: dict[str, Any] = {}
        for precision in precisions:
            path, got = resolve(found.path, precision, CPU)  # type: ignore[arg-type]
            entry: dict[str, Any] = {"file": path.name, "accepted": got == precision}
            entry["agreement"] = _agreement(found.path, precision)
            if got != precision:
                row[precision] = entry  # rejected: the master would serve, not timed again
                continue
            entry["ms"] = {}
            for t in threads:
                model = load_model(path, archetype, model_type, [CPU], t)
                entry["ms"][str(t)] = {
                    str(b): round(
                        _median_ms(
                            lambda b=b, m=model: m.run(states[:b], windows[:b]), repeats, budget_s
                        ),
                        3,
                    )
                    for b in batches
                }
            row[precision] = entry
        row["native"] = native(found.path)
        out[model_type] = row
    return out


def _agreement(master: Path, precision: str) -> float | None:
    from mltasks.models.variants import native, verdict_path

    if precision == native(master):
        return 1.0
    try:
        doc = json.loads(verdict_path(master, precision).read_text())  # type: ignore[arg-type]
    except (OSError, ValueError):
        return None
    verdicts = doc.get("providers", {}).values()
    return next((v.get("agreement") for v in verdicts), None)


def measure_levels(
    config: Config, archetype: str, batches: Sequence[int], repeats: int, budget_s: float
) -> dict[str, Any]:
    """{level: {"precision", "types", "ms": {batch: ms}, "ms_mixed": {batch: ms}}}: one
    batch through answer_batch, of one archetype, and of the six taking turns (what a
    server under mixed load sends: each archetype's weights are read once per batch, so
    the set's weights against the CPU's cache decide its cost)."""
    from mltasks.models.engine import Engine, level_plan
    from mltasks.models.fusion import rule_of
    from mltasks.serving.inference import answer_batch

    layout = get_layout(config.state.layout)
    n = max(batches)
    states = layout.sample(np.random.default_rng(8), n, archetype)
    rows = [[i + 1, archetype, None, s.tolist()] for i, s in enumerate(states)]
    kinds = sorted(ARCHETYPES)
    each = {a: layout.sample(np.random.default_rng(9), n, a) for a in kinds}
    turn = [kinds[i % len(kinds)] for i in range(n)]
    mixed = [[i + 1, a, None, each[a][i].tolist()] for i, a in enumerate(turn)]
    rule = rule_of(config)
    out: dict[str, Any] = {}
    for level in LEVELS:
        engine = Engine(config, level).load()
        chain, precision = level_plan(config, level)

        def timed(batch: list[list[Any]], e: Engine = engine) -> float:
            return round(
                _median_ms(lambda: answer_batch(batch, e, None, rule), repeats, budget_s), 3
            )

        out[str(level)] = {
            "precision": precision,
            "provider": chain[0] if isinstance(chain[0], str) else chain[0][0],
            "types": [m.model_type for m, _ in engine.fusion(archetype)],
            "ms": {str(b): timed(rows[:b]) for b in batches},
            "ms_mixed": {str(b): timed(mixed[:b]) for b in batches},
        }
    return out


_RSS_SCRIPT = """
import json, sys, psutil
from mltasks.config import get_config
from mltasks.models.engine import Engine
before = psutil.Process().memory_info().rss
engine = Engine(get_config(), int(sys.argv[1])).load()
print(json.dumps({"rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1),
                  "baseline_mb": round(before / 2**20, 1), "models": len(engine.models)}))
"""


def measure_memory(config_file: Path | None, models_dir: Path) -> dict[str, Any]:
    """Resident memory of a fresh process that loaded each level's models."""
    env = dict(os.environ, MLTASKS_MODELS_DIR=str(models_dir))
    if config_file is not None:
        env["MLTASKS_CONFIG"] = str(config_file)
    out: dict[str, Any] = {}
    for level in LEVELS:
        done = subprocess.run(
            [sys.executable, "-c", _RSS_SCRIPT, str(level)],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
            check=False,
        )
        lines = done.stdout.strip().splitlines()
        out[str(level)] = json.loads(lines[-1]) if done.returncode == 0 and lines else None
    return out


def gpu_note() -> str:
    from mltasks.hardware import gpu_count

    try:
        import onnxruntime as ort

        cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    except ImportError:
        cuda = False
    if cuda and gpu_count() > 0:
        return "a GPU is present: run the prepared device script (docs/PERFORMANCE.md)"
    return "not measured: no GPU"


def markdown(report: dict[str, Any]) -> str:
    r = report["results"]
    batches = [str(b) for b in r["batches"]]
    lines = [
        f"# Model cost on this host, {report['started_at']}",
        "",
        f"`{report['command']}`",
        "",
        f"Models: `{r['models_dir']}` (archetype {r['archetype']}). Median ms per batched call "
        f"(rows/s in brackets), CPU, onnxruntime {r['onnxruntime']}. GPU: {r['gpu']}.",
        "",
        "## Per type",
        "",
        "| type | precision | agreement | threads | "
        + " | ".join(f"batch {b}" for b in batches)
        + " |",
        "| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in batches) + " |",
    ]
    for model_type, row in r["types"].items():
        for precision in r["precisions"]:
            entry = row.get(precision)
            if entry is None:
                continue
            agree = entry.get("agreement")
            agree_s = "-" if agree is None else f"{agree:.3f}"
            if not entry.get("accepted"):
                lines.append(f"| {model_type} | {precision} | {agree_s} | - | rejected |")
                continue
            for t, by in entry["ms"].items():
                cells = [f"{by[b]:.2f} ({int(b) / by[b] * 1000:,.0f}/s)" for b in batches]
                lines.append(
                    f"| {model_type} | {precision} | {agree_s} | {t} | " + " | ".join(cells) + " |"
                )
    lines += [
        "",
        "## Per level: one worker's answering path (validation, fusion members, fusion)",
        "",
        "| level | precision | types | " + " | ".join(f"batch {b}" for b in batches) + " | RSS |",
        "| --- | --- | --- | " + " | ".join("---:" for _ in batches) + " | ---: |",
    ]
    for level, entry in r["levels"].items():
        mem = r["memory"].get(level)
        rss = "-" if not mem else f"{mem['rss_mb']:.0f} MB ({mem['models']} models)"
        cells = [f"{entry['ms'][b]:.2f} ({entry['ms'][b] / int(b):.3f}/row)" for b in batches]
        lines.append(
            f"| {level} | {entry['precision']} | {'+'.join(entry['types'])} | "
            + " | ".join(cells)
            + f" | {rss} |"
        )
    lines += [
        "",
        "The same, with the batch's rows from the six archetypes in turn (row i of archetype",
        "i mod 6): each archetype present reads its own weights, so a level whose weights",
        "do not fit the CPU's cache costs far more here than above.",
        "",
        "| level | " + " | ".join(f"batch {b}" for b in batches) + " |",
        "| --- | " + " | ".join("---:" for _ in batches) + " |",
    ]
    for level, entry in r["levels"].items():
        mixed = entry.get("ms_mixed", {})
        lines.append(
            f"| {level} | "
            + " | ".join(f"{mixed[b]:.2f}" if b in mixed else "-" for b in batches)
            + " |"
        )
    if report.get("plots"):
        lines += ["", *[f"![{p}]({p})" for p in report["plots"]]]
    return "\n".join(lines) + "\n"


def write(report: dict[str, Any], out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = []
    if plots.available():
        plots.model_costs(report["results"], out / "models.png")
        report["plots"] = ["models.png"]
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (out / "report.md").write_text(md)
    return md


def run(
    config: Config,
    config_file: Path | None,
    archetype: str,
    batches: Sequence[int],
    threads: Sequence[int],
    precisions: Sequence[str],
    repeats: int,
    budget_s: float,
) -> dict[str, Any]:
    import onnxruntime as ort

    if archetype not in ARCHETYPES:
        raise ValueError(f"unknown archetype {archetype!r}")
    threads_cfg = dataclasses.replace(config.inference, intra_op_threads=min(threads))
    cfg = dataclasses.replace(config, inference=threads_cfg)
    return {
        "models_dir": str(config.models.dir),
        "archetype": archetype,
        "batches": list(batches),
        "threads": list(threads),
        "precisions": list(precisions),
        "onnxruntime": ort.__version__,
        "gpu": gpu_note(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "types": measure_types(cfg, archetype, batches, threads, precisions, repeats, budget_s),
        "levels": measure_levels(cfg, archetype, batches, repeats, budget_s),
        "memory": measure_memory(config_file, config.models.dir),
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
