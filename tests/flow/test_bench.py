"""Smoke tests of the benchmarks: the floor answers emulated map servers and a bulk load;
the bulk report (JSON, Markdown, plots) is written; the sustained-rate search steps right.

The service path (bridge + Celery worker) is exercised by its own tests; here only the
benchmark's own parts run, against a database of their own, without a Celery worker.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from mltasks.bench import bulkreport
from mltasks.bench.bulk import (
    BulkSpec,
    Rows,
    drain,
    offer_load,
    read_rows,
    summarize_rows,
)
from mltasks.bench.bulkrun import find_sustained
from mltasks.bench.database import run_stats
from mltasks.bench.floor import FLOOR_ACTION, Floor
from mltasks.bench.procs import wait_until_answering
from mltasks.bench.report import machine, summarize
from mltasks.bench.responders import Responder
from mltasks.bench.service import (
    ServiceSettings,
    bench_config,
    worker_argv,
    write_checked_config,
)
from mltasks.config import load_config
from mltasks.game import GatewaySpec, run_gateway, stof, stoi
from tests import conftest
from tests.skips import need_module


@pytest.fixture
def floor(bench_db: str) -> Iterator[Floor]:
    responder = Floor(bench_db)
    stop = threading.Event()
    thread = threading.Thread(target=responder.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_until_answering(bench_db, timeout_s=10)
        yield responder
    finally:
        stop.set()
        thread.join(5)


def test_floor_answers_two_clients(bench_db: str, floor: Floor) -> None:
    spec = GatewaySpec(conninfo=bench_db, clients=2, duration_s=1.0, timeout_ms=100, processes=1)
    result = run_gateway(spec)
    summary = summarize(result)

    assert result.errors == []
    assert summary["decisions"] > 20
    assert summary["parse_failures"] == 0
    assert summary["invalid_answers"] == 0
    assert summary["actions"] == {str(FLOOR_ACTION): summary["answered_in_time"]}
    assert summary["in_time_share"] > 0.9
    assert 0 < summary["latency_ms"]["p50"] <= summary["latency_ms"]["p99"]

    # Every decision the clients counted is a row the floor closed (or one they gave up on),
    # plus the warm-up request.
    stats = run_stats(bench_db)
    rows = sum(stats["request_statuses"].values())
    assert rows == summary["decisions"] + 1
    assert stats["response_sources"]["floor"]["answers"] >= summary["answered_in_time"]


@pytest.mark.parametrize(
    ("text", "value"), [("1", 1), (" 7", 7), ("255", 255), ("3abc", 3), ("-2", -2)]
)
def test_stoi_accepts_what_the_cpp_accepts(text: str, value: int) -> None:
    assert stoi(text) == value


@pytest.mark.parametrize("text", [None, "", "abc", " ", "99999999999"])
def test_stoi_throws_where_the_cpp_throws(text: str | None) -> None:
    with pytest.raises(ValueError):
        stoi(text)


def test_stof_like_the_cpp() -> None:
    assert stof("0.87") == pytest.approx(0.87)
    assert stof("1") == 1.0
    assert stof(".5x") == 0.5
    for bad in (None, "", "x1", "1e39"):
        with pytest.raises(ValueError):
            stof(bad)


# -- bulk ----------------------------------------------------------------------------------


def test_bulk_floor_smoke(bench_db: str, floor: Floor) -> None:
    spec = BulkSpec(conninfo=bench_db, rate=300, duration_s=1.5, tick_ms=5)
    # The warm-up request is not part of the run.
    with psycopg.connect(bench_db, autocommit=True) as conn:
        conn.execute("TRUNCATE ai_responses, ai_requests RESTART IDENTITY")
    load = offer_load(spec)
    _, left = drain(bench_db, timeout_s=10)
    figures = summarize_rows(read_rows(bench_db))

    assert load.rows == 450  # rate x duration, every one written
    assert left == 0
    assert figures["requests"] == 450
    assert figures["answered_share"] == 1.0
    assert figures["sources"] == {"floor": 450}
    assert figures["share_255"] == 0.0
    lat = figures["latency_ms"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["max"]
    assert figures["held"] == (lat["p99"] <= 50.0)
    assert len(figures["cdf_ms"]) == 201
    assert figures["cdf_ms"] == sorted(figures["cdf_ms"])
    # Open loop: the offered rate is the asked one, whatever the responder does (unless
    # the machine starved the loader itself, which it then reports).
    assert load.behind or 250 < figures["offered_per_s"] < 360
    with psycopg.connect(bench_db) as conn:
        distinct = conn.execute(
            "SELECT count(DISTINCT (SELECT array_agg(round(v::numeric, 2)) "
            "FROM unnest(state_vector) AS v)) FROM ai_requests"
        ).fetchone()
    assert distinct == (450,)  # distinct even at the caches' two decimals


def test_bulk_pool_repeats_states(bench_db: str) -> None:
    spec = BulkSpec(conninfo=bench_db, rate=400, duration_s=0.3, states=5, mobs=2)
    with psycopg.connect(bench_db, autocommit=True) as conn:
        conn.execute("TRUNCATE ai_responses, ai_requests RESTART IDENTITY")
    assert offer_load(spec).rows == 120
    with psycopg.connect(bench_db) as conn:
        row = conn.execute(
            "SELECT count(DISTINCT state_vector), count(DISTINCT (state_vector, mob_id)), "
            "count(DISTINCT (state_vector, archetype)) FROM ai_requests"
        ).fetchone()
    assert row is not None
    states, pairs, archetypes = row
    assert states <= 5
    assert states < pairs <= 10  # each state comes with up to two mob ids ...
    assert archetypes == states  # ... and always with its own archetype


def _rows(latencies: list[float | None], actions: list[int], reasons: list[str | None]) -> Rows:
    n = len(latencies)
    return Rows(
        created_s=np.linspace(1000.0, 1001.0, n),
        latency_ms=np.asarray([np.nan if v is None else v for v in latencies]),
        action=np.asarray(actions),
        source=["bridge" if a == 255 else ("model" if a >= 0 else None) for a in actions],
        reason=reasons,
    )


def test_summarize_counts_only_real_answers() -> None:
    lat: list[float | None] = [*([1.0] * 97), 80.0, 90.0, None]
    actions = [*([1] * 97), 255, 255, -1]
    reasons: list[str | None] = [*([None] * 97), "deadline", "fallback_level_5", None]
    figures = summarize_rows(_rows(lat, actions, reasons))
    assert figures["answered"] == 97
    assert figures["responded"] == 99
    assert figures["reasons_255"] == {"deadline": 1, "fallback_level_5": 1}
    assert not figures["held"]  # 97% answered
    # Level 5's own 255 is its answer.
    level5 = summarize_rows(
        _rows([2.0] * 100, [255] * 100, ["fallback_level_5"] * 100),
        accept_255_reasons=("fallback_level_5",),
    )
    assert level5["answered_share"] == 1.0 and level5["held"]
    assert level5["reasons_255"] == {}
    slow = summarize_rows(_rows([60.0] * 100, [1] * 100, [None] * 100))
    assert slow["answered_share"] == 1.0 and not slow["held"]  # p99 over 50 ms


def test_find_sustained_steps_then_refines() -> None:
    capacity = {"floor": 5000.0, "service": 900.0}
    steps: list[tuple[str, float]] = []

    def step(r: Responder, rate: float) -> dict[str, Any]:
        steps.append((r.name, rate))
        return {"responder": r.name, "rate": rate, "held": rate <= capacity[r.name]}

    def responder(name: str) -> Responder:
        return Responder(name, lambda: None, {})  # type: ignore[arg-type, return-value]

    runs, verdict = find_sustained(
        [responder("floor"), responder("service")],
        start=200,
        factor=2,
        max_rate=6000,
        refine=2,
        step=step,
        retries=0,
    )
    # Alternating while both climb; the floor alone after the service failed.
    assert steps[:6] == [
        ("floor", 200),
        ("service", 200),
        ("floor", 400),
        ("service", 400),
        ("floor", 800),
        ("service", 800),
    ]
    assert ("service", 1600) in steps and ("service", 3200) not in steps
    assert verdict["service"]["rate"] is not None and 800 <= verdict["service"]["rate"] <= 900
    assert verdict["service"]["first_failed"] is not None
    assert verdict["service"]["first_failed"] > 900
    assert verdict["floor"]["rate"] is not None and 3200 <= verdict["floor"]["rate"] <= 5000
    assert len(runs) == len(steps)


def test_find_sustained_retries_and_steps_down() -> None:
    results = iter([False, True, False, False, False, False, True, True, True])
    steps: list[float] = []

    def step(r: Responder, rate: float) -> dict[str, Any]:
        steps.append(rate)
        return {"responder": r.name, "rate": rate, "held": next(results)}

    one = Responder("service", lambda: None, {})  # type: ignore[arg-type, return-value]
    runs, verdict = find_sustained(
        [one], start=400, factor=2, max_rate=10_000, refine=1, step=step, retries=1
    )
    # 400 failed once (disturbed), held on the retry; 800 failed twice: confirmed.
    assert steps[:4] == [400, 400, 800, 800]
    # The bisection (geometric) at 566 failed twice too.
    assert steps[4:] == [566, 566]
    assert verdict["service"]["rate"] == 400 and verdict["service"]["first_failed"] == 566
    assert [r["attempt"] for r in runs] == [1, 2, 1, 2, 1, 2]

    # The first rate fails: step down until one holds.
    results = iter([False, False, True])
    steps.clear()
    _, verdict = find_sustained(
        [one], start=400, factor=2, max_rate=10_000, refine=0, step=step, retries=0
    )
    assert steps == [400, 200, 100]
    assert verdict["service"]["rate"] == 100 and verdict["service"]["first_failed"] == 200


# -- the report ----------------------------------------------------------------------------


def _fake_run(responder: str, rate: float, p50: float, share: float = 1.0) -> dict[str, Any]:
    cdf = [round(p50 * (0.5 + i / 100), 3) for i in range(201)]
    lat = {"p50": p50, "p90": p50 * 1.5, "p99": p50 * 2, "max": p50 * 3, "mean": p50}
    return {
        "responder": responder,
        "config": {"responder": "floor" if responder == "floor" else "service", "caching": True},
        "rate": rate,
        "requests": int(rate * 2),
        "offered_per_s": rate,
        "window_s": 2.0,
        "responded": int(rate * 2),
        "answered": int(rate * 2 * share),
        "answered_share": share,
        "answered_per_s": rate * share,
        "latency_ms": lat,
        "response_latency_ms": lat,
        "share_255": 0.0,
        "reasons_255": {},
        "sources": {"floor" if responder == "floor" else "model": int(rate * 2)},
        "held": p50 * 2 <= 50 and share >= 0.99,
        "cdf_ms": cdf,
        "loader": {"behind": False, "late_batches": 0, "batches": 400, "max_late_ms": 1.0},
        "load_average_before": [0.5, 0.4, 0.3],
        "cache": {"layers": {"l2": {"lookups": 10, "hits": 5, "hit_rate": 0.5}}},
    }


def test_report_writer(tmp_path: Path) -> None:
    need_module("matplotlib")
    runs = [
        _fake_run("floor", 500, 0.5),
        _fake_run("service L3", 500, 4.0),
        _fake_run("floor", 1000, 0.7),
        _fake_run("service L3", 1000, 40.0, share=0.9),
        {
            "responder": "service L3",
            "config": {},
            "rate": 2000,
            "failed": "the worker died",
            "held": False,
        },
    ]
    report: dict[str, Any] = {
        "schema_version": bulkreport.SCHEMA_VERSION,
        "kind": "bulk",
        "started_at": "2026-01-01T00:00:00+00:00",
        "command": "mltasks bench bulk --floor --rate 500,1000",
        "settings": {
            "duration_s": 2.0,
            "tick_ms": 5.0,
            "timeout_ms": 100,
            "states": 0,
            "p99_limit_ms": 50.0,
            "min_answered_share": 0.99,
        },
        "machine": machine(),
        "postgres": "15",
        "load_average_start": [0.5, 0.4, 0.3],
        "load_average_end": [0.6, 0.4, 0.3],
        "responders": [{"name": "floor"}, {"name": "service L3"}],
        "runs": runs,
        "ratios": bulkreport.ratios(runs),
        "sustained": {
            "floor": {"rate": 1000.0, "first_failed": None, "steps": 2, "max_rate_reached": True},
            "service L3": {"rate": 500.0, "first_failed": 1000.0, "steps": 3},
        },
        "plots": [],
    }
    md = bulkreport.write(report, tmp_path)

    for name in ("latency_cdf.png", "load.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    saved = json.loads((tmp_path / "report.json").read_text())
    bulkreport.check_report(saved)
    assert saved["plots"] == ["latency_cdf.png", "load.png"]
    assert saved["ratios"][0] == {
        "responder": "service L3",
        "against": "floor",
        "rate": 500,
        "answered_per_s_ratio": 1.0,
        "answered_share_ratio": 1.0,
        "p50_ratio": 8.0,
        "p99_ratio": 8.0,
        "p50_diff_ms": 3.5,
        "cpu_per_decision_ratio": None,  # these runs measured no CPU per decision
        "floor_load_average": 0.5,
        "load_average": 0.5,
    }
    assert (tmp_path / "report.md").read_text() == md
    assert "| service L3 | 500 | 500 | 500.0 | 100.00% | 4.0 |" in md
    assert "| floor | >= 1000 (max) | n/a | 2 | 1 |" in md
    assert "failed: the worker died" in md
    assert "| service L3 | 500 | 1000 | 3 | 0.5 |" in md  # sustained, half the floor's
    assert "50.0% of 10" in md  # the L2 hit rate


def test_check_report_names_what_is_wrong() -> None:
    run = _fake_run("floor", 500, 0.5)
    del run["latency_ms"]["p99"]
    run["cdf_ms"] = [3.0, 1.0]
    with pytest.raises(ValueError) as err:
        bulkreport.check_report({"schema_version": 1, "kind": "bulk", "runs": [run]})
    text = str(err.value)
    assert "missing key 'machine'" in text
    assert "runs[0].latency_ms: missing 'p99'" in text
    assert "cdf_ms is not sorted" in text


# -- service configurations ----------------------------------------------------------------


def service_settings(tmp_path: Path, **options: Any) -> ServiceSettings:
    """A bench run's settings on the session's servers, though nothing here connects: no
    live address in a test."""
    return ServiceSettings(
        database_url=make_conninfo(conftest.ADMIN_URL, dbname="mltasks_bench"),
        redis_url=os.environ["MLTASKS_TEST_REDIS_URL"],
        models_dir=tmp_path,
        work_dir=tmp_path,
        log_dir=tmp_path,
        **options,
    )


@pytest.mark.parametrize(
    ("level", "pool", "queue", "concurrency"),
    [
        (None, "prefork", "cpu", 2),
        (3, "prefork", "cpu", 2),
        (3, "solo", "cpu", 1),
        (4, "threads", "rules", 2),
        (5, "", None, 0),
    ],
)
def test_service_configurations(
    tmp_path: Path, level: int | None, pool: str, queue: str | None, concurrency: int
) -> None:
    from mltasks.config import FallbackConfig

    settings = service_settings(
        tmp_path,
        pool=pool or "prefork",
        level=level,
        caching=level != 4,
    )
    assert settings.queue == queue
    path = tmp_path / "c.yaml"
    # Checked as the children will read it: every key one the service knows.
    written = write_checked_config(path, bench_config(settings))
    cfg = load_config(path, environ={})
    assert cfg.caching.enabled == (level != 4)
    assert cfg.redis.broker_db == 9 and cfg.redis.cache_db == 10
    if level is None:  # as deployed: the service's own fallback settings
        assert cfg.fallback == FallbackConfig()
        assert "level_held" not in settings.describe()
    else:
        assert cfg.fallback.start_level == level
        # The forced level is held: no probe or failure count can move it.
        assert cfg.fallback.failure_threshold == 1000
        assert cfg.fallback.cpu_load_per_core > 1000
    if queue is not None:
        assert cfg.worker.concurrency == concurrency
        # Each worker runs the chosen pool, from its command line: this service's config
        # has no pool key, so the benchmark's optional one is dropped before the run.
        argv = worker_argv(settings, "w@%h")
        assert argv[argv.index("--pool") + 1] == settings.pool, argv
        assert "pool" not in written["worker"], written
        assert settings.describe()["pool"] == settings.pool
    else:
        assert "pool" not in settings.describe()
    assert settings.label().startswith("service" if level is None else f"service L{level}")


def test_set_adds_keys_to_the_services_config(tmp_path: Path) -> None:
    """``bench gateway --set section.key=value``: the key reaches the service's config."""
    from mltasks.bench.cli_args import _override

    override = _override("inference.max_waiting_batches=2")
    assert override == ("inference", "max_waiting_batches", 2)
    settings = service_settings(tmp_path, overrides=(override,))
    path = tmp_path / "c.yaml"
    write_checked_config(path, bench_config(settings))
    cfg = load_config(path, environ={})
    assert cfg.inference.max_waiting_batches == 2
    assert cfg.inference.max_latency_ms == 100  # the run's own keys stay
    assert settings.describe()["set"] == {"inference.max_waiting_batches": 2}
    with pytest.raises(argparse.ArgumentTypeError, match=r"SECTION\.KEY=VALUE"):
        _override("max_waiting_batches=2")


def test_reset_tables_retries_a_deadlock_with_the_running_responder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The reset after a warm-up runs beside the service: its TRUNCATE may be the side
    PostgreSQL cancels in a deadlock (seen once in a gateway run); it tries again."""
    import psycopg

    from mltasks.bench import database

    calls: list[str] = []

    class Conn:
        def __init__(self, failures: int) -> None:
            self.failures = failures

        def __enter__(self) -> Conn:
            return self

        def __exit__(self, *_: object) -> None:
            return None

        def execute(self, text: str) -> None:
            calls.append(text)
            if len(calls) <= self.failures:
                raise psycopg.errors.DeadlockDetected("deadlock detected")

    monkeypatch.setattr(psycopg, "connect", lambda *a, **k: Conn(2))
    database.reset_tables("postgresql://fake")
    assert len(calls) == 3 and all("TRUNCATE" in c for c in calls)
    calls.clear()
    monkeypatch.setattr(psycopg, "connect", lambda *a, **k: Conn(99))
    with pytest.raises(psycopg.errors.DeadlockDetected):
        database.reset_tables("postgresql://fake", attempts=3)
    assert len(calls) == 3


# -- bench shadow ---------------------------------------------------------------------------


def _window(name: str, p50: float, p99: float) -> dict[str, Any]:
    return {
        "window": name,
        "decisions": 1000,
        "decisions_per_s": 100.0,
        "latency_ms": {"p50": p50, "p99": p99},
        "share_255": 0.01,
        "timeouts": 3,
        "load_average_before": 1.5,
        "others_cpu_share": 0.2,
    }


def test_bench_shadow_figures_and_report(tmp_path: Path) -> None:
    from mltasks.bench import shadow

    before = {"rows": 10.0, "batches": 5.0, "agree": 10.0, "candidate_s": 0.01, "active_s": 0.01}
    after = {
        "rows": 410.0,
        "batches": 205.0,
        "errors": 0.0,
        "agree": 402.0,
        "candidate_s": 0.07,
        "active_s": 0.05,
    }
    figures = shadow.shadow_figures(before, after)  # over the window only: after - before
    assert figures == {
        "rows": 400,
        "batches": 200,
        "errors": 0,
        "non_finite": 0,
        "agreement": 0.98,
        "candidate_ms_per_batch": 0.3,
        "active_ms_per_batch": 0.2,
        "candidate_over_active": 1.5,
    }
    idle = shadow.shadow_figures(after, after)  # nothing shadowed: no division by zero
    assert idle["rows"] == 0 and idle["agreement"] is None
    assert idle["candidate_ms_per_batch"] is None and idle["candidate_over_active"] is None

    windows = [_window("without", 4.0, 10.0), _window("shadowing", 4.5, 12.5)]
    windows.append(_window("after rollback", 3.9, 9.0))
    assert shadow.cost(windows) == {
        "p99_shadowing_over_without": 1.25,
        "p99_after_rollback_over_without": 0.9,
        "p50_shadowing_minus_without_ms": 0.5,
    }
    # A window without decisions has no percentiles: no ratio, not a crash.
    empty = [_window("without", 4.0, 10.0), _window("shadowing", 4.0, 10.0)]
    empty[0]["latency_ms"] = {"p50": None, "p99": None}
    assert set(shadow.cost(empty).values()) == {None}

    assert shadow.told("abc\n2 worker(s) told (others read the pointer)\n") == 2
    assert shadow.told("no reply") is None
    report = {
        "command": "mltasks bench shadow --window-s 5",
        "settings": {
            "model": "aggressive/combat_dqn",
            "clients": 4,
            "timeout_ms": 15,
            "window_s": 5.0,
            "workers": 2,
        },
        "windows": windows,
        "shadow": figures,
        "shadow_after_rollback": idle,
        "cost": shadow.cost(windows),
        "deploy": {"version": "11d4ebb3e90a", "told": 2},
        "rollback": {"told": 1},
    }
    md = shadow.write(report, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert (tmp_path / "report.md").read_text() == md
    assert "| shadowing | 1,000 | 100.0 | 4.50 | 12.50 | 1.0% | 3 | 1.50 | 20% |" in md
    assert "400 rows in 200 batches, candidate 0.30 ms/batch, active 0.20 ms/batch" in md
    assert "p99 shadowing / without: 1.25" in md
    assert "told 2 of 2 workers; rollback told 1" in md


def test_bench_shadow_parses_its_options(tmp_path: Path) -> None:
    from mltasks.bench import BenchError, shadow
    from mltasks.bench.cli_measure import shadow_command
    from mltasks.cli import build_parser

    args = build_parser().parse_args(
        [
            *("bench", "shadow", "--window-s", "5", "--clients", "3"),
            *("--redis-url", "redis://127.0.0.1:1/0"),
            *("--database-url", "postgresql://postgres@127.0.0.1:1/mltasks_bench_x"),
            *("--models-dir", str(tmp_path)),
        ]
    )
    assert args.func is shadow_command
    assert (args.window_s, args.clients, args.timeout_ms, args.workers) == (5.0, 3, 15, 2)
    assert args.model == "aggressive/combat_dqn" and args.candidate is None
    assert args.redis_url == "redis://127.0.0.1:1/0" and args.models_dir == tmp_path
    opts = dict(database_url=args.database_url, redis_url=args.redis_url, models_dir=tmp_path)
    assert shadow.ShadowOptions(**opts, model="tank/skill_dqn").archetype == "tank"
    with pytest.raises(BenchError, match="--model"):
        shadow.ShadowOptions(**opts, model="tank")
    with pytest.raises(BenchError, match="--candidate"):
        shadow.ShadowOptions(**opts, candidate=tmp_path / "missing.onnx")
    with pytest.raises(BenchError, match="--window-s"):
        shadow.ShadowOptions(**opts, window_s=0)
