"""How fast each precision runs, and how well its variants agree: for reports and
``mltasks bench precisions``, never on the serving path (``variants`` builds and verifies
the variants the workers load)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict

import numpy as np
import onnxruntime as ort

from mltasks.contract import MODEL_TYPES
from mltasks.fallback.ladder import PRECISIONS, Precision
from mltasks.models.variants import (
    CPU,
    HELDOUT_SEED,
    _session,
    ensure_variant,
)
from mltasks.state import sample_states


class PrecisionTimings(TypedDict):
    """``time_precisions`` result: median microseconds per ``session.run`` call."""

    models: int
    batch_sizes: list[int]
    repeats: int
    intra_op_threads: int
    onnxruntime: str
    median_us: dict[str, dict[int, float]]
    ratio_to_fp32: dict[str, dict[int, float]]


def _masters(models_dir: Path) -> list[Path]:
    """The masters (as discovery finds them: FP32 or the exporter's FP16) of the types that
    read one state, the ones timed here."""
    from mltasks.models.discovery import discover
    from mltasks.models.family import FAMILY

    types = tuple(m for m in MODEL_TYPES if FAMILY[m].input == "state")
    found, _ = discover(models_dir, model_types=types)
    return [f.path for f in found]


def time_precisions(
    models_dir: Path,
    batch_sizes: Sequence[int] = (1, 32, 128),
    repeats: int = 100,
    *,
    precisions: Sequence[Precision] = PRECISIONS,
    intra_op_threads: int = 1,
    warmup: int = 10,
) -> PrecisionTimings:
    """Median CPU time per inference call, by precision and batch size, over the masters.

    Variants are built as needed (not verified: this measures speed only).
    Calls rotate through the precisions so that load from other processes
    falls on all of them alike.  One thread per session, as the workers run.
    The figure includes the Python-side cost of ``session.run``, which is what
    a worker pays per batch.
    """
    models_dir = Path(models_dir)
    masters = _masters(models_dir)
    if not masters:
        raise FileNotFoundError(f"no master models under {models_dir}")
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    samples: dict[str, dict[int, list[float]]] = {
        p: {b: [] for b in batch_sizes} for p in precisions
    }
    pool = sample_states(np.random.default_rng(HELDOUT_SEED + 1), max(batch_sizes))
    for master in masters:
        sessions = {
            p: _session(ensure_variant(master, p), [CPU], intra_op_threads) for p in precisions
        }
        for batch in batch_sizes:
            # Each session in the dtype it declares (an FP16 master takes float16).
            feeds = {
                p: {
                    s.get_inputs()[0].name: np.ascontiguousarray(
                        pool[:batch],
                        np.float16 if s.get_inputs()[0].type == "tensor(float16)" else np.float32,
                    )
                }
                for p, s in sessions.items()
            }
            for p, s in sessions.items():
                for _ in range(warmup):
                    s.run(None, feeds[p])
            for r in range(repeats):
                for i in range(len(precisions)):
                    p = precisions[(i + r) % len(precisions)]
                    t0 = time.perf_counter_ns()
                    sessions[p].run(None, feeds[p])
                    samples[p][batch].append((time.perf_counter_ns() - t0) / 1000.0)
    median = {p: {b: statistics.median(v) for b, v in by.items()} for p, by in samples.items()}
    base = median.get("fp32")
    ratio = (
        {p: {b: by[b] / base[b] for b in by} for p, by in median.items()}
        if base is not None
        else {}
    )
    return PrecisionTimings(
        models=len(masters),
        batch_sizes=list(batch_sizes),
        repeats=repeats,
        intra_op_threads=intra_op_threads,
        onnxruntime=ort.__version__,
        median_us=median,
        ratio_to_fp32=ratio,
    )


def fastest_precision(timings: PrecisionTimings, batch_size: int) -> Precision:
    """The precision with the lowest median time at ``batch_size`` in a benchmark result."""
    measured = timings["median_us"]
    found = [p for p in PRECISIONS if batch_size in measured.get(p, {})]
    if not found:
        raise ValueError(f"batch size {batch_size} was not measured")
    return min(found, key=lambda p: measured[p][batch_size])
