"""The plumbing floor (mltasks/bench/plumbingfloor.py): the service's own bridge and
workers, answering with the broker floor's tiny model. It answers a bulk load once each,
through the service's path, with that model's action; the reports measure the services
against it, and the two other floors measure it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from mltasks.bench import bulkreport
from mltasks.bench.brokerfloor import WEIGHTS
from mltasks.bench.bulk import BulkSpec, bulk_reset, drain, offer_load
from mltasks.bench.cli_args import floors_arg
from mltasks.bench.responders import plumbing_floor_responder
from mltasks.bench.service import ServiceSettings
from mltasks.serving.records import Row
from tests.game import answers_per_request, array_send


def test_the_floor_list_takes_plumbing() -> None:
    assert floors_arg("plumbing") == ("plumbing",)
    assert floors_arg("broker,plumbing") == ("broker", "plumbing")


def test_its_answer_is_the_tiny_models_and_nothing_is_cached() -> None:
    from mltasks.bench.plumbingfloor import MODEL, answer_fixed
    from mltasks.serving import batch, inference

    # Importing the floor's answer swaps nothing: only its workers' app does
    # (mltasks.bench.plumbingapp), or this test session's own worker would answer with it.
    assert batch.answer_batch is inference.answer_batch  # type: ignore[attr-defined]

    states = np.random.default_rng(2).random((3, 64), dtype=np.float32)
    rows = [Row(i + 1, "tank", 1002, array_send(s.tolist())) for i, s in enumerate(states)]
    rows.append(Row(9, "tank", 1002, [0.5] * 64))  # not the bridge's bytes: 255
    outcome = answer_fixed(rows, object(), None)
    expected = (states @ WEIGHTS).argmax(axis=1).tolist()
    assert [a.action_id for a in outcome.answers] == [*expected, 255]
    assert {a.model for a in outcome.answers[:3]} == {MODEL}
    assert outcome.answers[3].reason == "state_not_float4"
    assert outcome.remember() is None and outcome.failures == []


def _run(responder: str, rps: float) -> dict[str, Any]:
    lat = {"p50": 2.0, "p90": 3.0, "p99": 4.0, "max": 5.0, "mean": 2.0}
    return {
        "responder": responder,
        "rate": 500,
        "answered_per_s": rps,
        "answered_share": 1.0,
        "latency_ms": lat,
        "load_average_before": [1.0, 1.0, 1.0],
        "per_decision": {"cpu_ms_total": 1.0},
    }


def test_the_services_are_measured_against_it_and_it_against_the_floors() -> None:
    runs = [
        _run("floor", 500.0),
        _run("broker floor", 400.0),
        _run("plumbing floor", 320.0),
        _run("service", 160.0),
    ]
    got = {(q["responder"], q["against"]) for q in bulkreport.ratios(runs)}
    assert got == {
        ("broker floor", "floor"),
        ("plumbing floor", "floor"),
        ("plumbing floor", "broker floor"),
        ("service", "floor"),
        ("service", "broker floor"),
        ("service", "plumbing floor"),
    }
    sustained = {k: {"rate": r} for k, r in [("broker floor", 4000.0), ("plumbing floor", 3200.0)]}
    sustained["service"] = {"rate": 1600.0}
    assert bulkreport.sustained_ratios(sustained, "plumbing floor") == {"service": 0.5}
    assert bulkreport.sustained_ratios(sustained, "broker floor") == {
        "plumbing floor": 0.8,
        "service": 0.4,
    }


def test_it_answers_a_bulk_load_once_each_through_the_services_path(
    bench_db: str, tmp_path: Path, models_dir: Path
) -> None:
    settings = ServiceSettings(
        database_url=bench_db,
        redis_url=os.environ["MLTASKS_TEST_REDIS_URL"],
        models_dir=models_dir,
        work_dir=tmp_path,
        log_dir=tmp_path,
        timeout_ms=1000,  # a slow CI machine must not turn answers into 255s here
        concurrency=1,
        level=3,
    )
    responder = plumbing_floor_responder(settings)
    assert responder.config["responder"] == "plumbing floor"
    with responder.start() as running:
        assert {p.name for p in running.procs} >= {"plumbing-floor-bridge"}
        bulk_reset(bench_db)  # the warm-up request is not part of the run
        load = offer_load(BulkSpec(conninfo=bench_db, rate=100, duration_s=1.0, tick_ms=5))
        _, left = drain(bench_db, timeout_s=30)
    assert load.rows == 100 and left == 0
    rows = answers_per_request(bench_db)
    assert len(rows) == 100
    states = np.asarray([r.state for r in rows], dtype=np.float32)
    expected = (states @ WEIGHTS).argmax(axis=1).tolist()
    assert [r.sources for r in rows] == [["model"]] * 100  # one answer each, the workers'
    assert [r.actions[0] for r in rows] == expected  # the tiny model's, from the bytes it got
    assert {r.models[0] for r in rows} == {"floor/plumbing"}
    assert {r.status for r in rows} == {"completed"}
