"""``mltasks bench batch`` (mltasks/bench/batchcost.py): a worker's thread CPU for one batch,
by size and by step, measured on batches the real claim took and the real task answered."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from mltasks.bench import batchcost
from mltasks.cli import build_parser


def test_it_parses_its_options(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["bench", "batch", "--sizes", "1,8", "--batches", "5", "--models-dir", str(tmp_path)]
    )
    assert args.sizes == [1, 8] and args.batches == 5 and args.warmup == 50
    assert args.models_dir == tmp_path and args.func.__name__ == "batch_command"


def test_the_fit_is_a_fixed_cost_and_a_cost_a_row() -> None:
    sizes = {
        1: {"task_ms": {"median": 1.1}},
        10: {"task_ms": {"median": 1.5}},
        41: {"task_ms": {"median": 2.7}},
    }
    fit = batchcost.fit(sizes)
    assert fit == {"fixed_ms": 1.06, "per_row_ms": 0.04}
    assert batchcost.fit({3: sizes[1]}) is None


def test_steps_are_timed_and_put_back() -> None:
    from mltasks import metrics
    from mltasks.serving import inference

    before = (vars(inference)["plan_batch"], metrics.observe_batch)
    cpu: dict[str, float] = {}
    with batchcost.timed_steps(cpu):
        assert vars(inference)["plan_batch"] is not before[0]
        metrics.observe_batch(3)
        metrics.observe_batch(4)
    assert (vars(inference)["plan_batch"], metrics.observe_batch) == before
    assert set(cpu) == {"metrics"} and cpu["metrics"] >= 0.0


@pytest.mark.timeout(180)
def test_it_measures_batches_that_were_really_answered(
    bench_db: str, models_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    argv = [
        *("bench", "batch", "--sizes", "1,4", "--batches", "3", "--warmup", "1"),
        *("--models-dir", str(models_dir), "--out", str(out)),
        *("--database-url", bench_db, "--redis-url", os.environ["MLTASKS_TEST_REDIS_URL"]),
    ]
    # Its own process: the run sets this process's configuration, pool and engine.
    done = subprocess.run(
        [sys.executable, "-m", "mltasks.cli", *argv], capture_output=True, text=True, timeout=170
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "batch" and report["level"] == 3
    assert sorted(report["sizes"]) == ["1", "4"]
    for size in report["sizes"].values():
        assert size["task_ms"]["median"] > 0
        assert {"model calls", "answer statement", "cache write", "validation"} <= set(
            size["steps_ms"]
        )
    assert report["fit"]["per_row_ms"] == pytest.approx(
        (report["sizes"]["4"]["task_ms"]["median"] - report["sizes"]["1"]["task_ms"]["median"]) / 3,
        abs=1e-3,
    )
    assert "Fixed cost a batch" in (out / "report.md").read_text()
    # Every batch timed or warmed was claimed and answered by a model: (1 + 3) x (1 + 4).
    with psycopg.connect(bench_db) as conn:
        answered = conn.execute(
            "SELECT count(*) FILTER (WHERE s.source = 'model' AND s.action_id BETWEEN 0 AND 9),"
            " count(*) FROM ai_requests r LEFT JOIN ai_responses s USING (request_id)"
        ).fetchone()
    assert answered == (20, 20)
