"""``mltasks bench batch`` (mltasks/bench/batchcost.py): a worker's thread CPU for one batch,
by size and by step, measured on batches the real claim took and the real task answered."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from mltasks.bench import BenchError, batchcost
from mltasks.bench.queries import bench_query
from mltasks.cli import build_parser
from mltasks.config import Config


def test_it_parses_its_options(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["bench", "batch", "--sizes", "1,8", "--batches", "5", "--models-dir", str(tmp_path)]
    )
    assert args.sizes == [1, 8] and args.batches == 5 and args.warmup == 50
    assert args.pause_ms == 0.0
    paused = build_parser().parse_args(["bench", "batch", "--pause-ms", "20"])
    assert paused.pause_ms == 20.0
    assert args.models_dir == tmp_path and args.func.__name__ == "batch_command"


def test_a_pause_outside_its_range_is_refused_before_any_work(tmp_path: Path) -> None:
    from mltasks.bench.cli_measure import batch_command

    for pause in ("-1", "1001"):
        args = build_parser().parse_args(
            ["bench", "batch", "--pause-ms", pause, "--models-dir", str(tmp_path / "none")]
        )
        with pytest.raises(BenchError, match=r"--pause-ms must be within 0\.\.1000"):
            batch_command(args)
    assert not (tmp_path / "none").exists()


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
        *("--pause-ms", "2"),
        *("--models-dir", str(models_dir), "--out", str(out)),
        *("--database-url", bench_db, "--redis-url", os.environ["MLTASKS_TEST_REDIS_URL"]),
    ]
    # Its own process: the run sets this process's configuration, pool and engine.
    done = subprocess.run(
        [sys.executable, "-m", "mltasks.cli", *argv], capture_output=True, text=True, timeout=170
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "batch" and report["level"] == 3 and report["pause_ms"] == 2.0
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
    text = (out / "report.md").read_text()
    assert "Fixed cost a batch" in text and "2 ms after the last one ended" in text
    # Every batch timed or warmed was claimed and answered by a model: (1 + 3) x (1 + 4).
    with psycopg.connect(bench_db) as conn:
        answered = conn.execute(
            "SELECT count(*) FILTER (WHERE s.source = 'model' AND s.action_id BETWEEN 0 AND 9),"
            " count(*) FROM ai_requests r LEFT JOIN ai_responses s USING (request_id)"
        ).fetchone()
    assert answered == (20, 20)


def test_a_batch_is_as_fresh_as_its_claim_and_a_skipped_row_fails_the_run(
    config: Config, pg: psycopg.Connection[Any]
) -> None:
    """The rows' ages are as of the claim, not their INSERTs: rows inserted one by one can
    be past the deadline when claimed, and would be answered 255 without their models (the
    batch measured smaller than it is). A row answered so anyway fails the run."""
    source = batchcost.Batches(pg, config)
    before = time.time()
    rows, created, _ = source.next(3)
    assert len(rows) == len(created) == 3
    assert all(c >= before for c in created)
    batchcost._all_inferred(pg, 3)  # nothing answered yet: nothing skipped
    pg.execute(
        "INSERT INTO ai_responses (request_id, action_id, confidence, source, model)"
        " VALUES (%s, 255, 0, 'bridge', 'traditional')",
        (rows[0][0],),
    )
    with pytest.raises(BenchError, match="1 rows were not answered by the models"):
        batchcost._all_inferred(pg, 3)


def test_a_claim_that_found_rows_overdue_is_set_aside_not_measured(
    config: Config, pg: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stall between the INSERTs and the claim (here: a 10 ms sleep where the rows are
    made young, against a 5 ms deadline) has the claim answer the rows 255: such a batch
    is made again, never measured, and the run gives up after STALE_TRIES of them."""
    inference = dataclasses.replace(config.inference, max_latency_ms=5)
    stalled = {"batch_fresh": "SELECT pg_sleep(0.01)"}
    monkeypatch.setattr(
        batchcost, "bench_query", lambda name: stalled.get(name) or bench_query(name)
    )
    source = batchcost.Batches(pg, dataclasses.replace(config, inference=inference))
    with pytest.raises(BenchError, match="found rows overdue"):
        source.next(2)
    assert source.set_aside == 2 * batchcost.STALE_TRIES
    batchcost._all_inferred(pg, 2, source.set_aside)  # the set-aside 255s are not skips
