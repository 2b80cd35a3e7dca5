"""Smoke test of the gateway benchmark: the floor answers two emulated map servers.

The service path (bridge + Celery worker) is exercised by its own tests; here only the
benchmark's own parts run, against a database of their own.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import psycopg
import pytest

from mltasks.bench.database import drop_database, recreate_database, run_stats
from mltasks.bench.floor import FLOOR_ACTION, Floor
from mltasks.bench.gateway import GatewaySpec, run_gateway, stof, stoi
from mltasks.bench.procs import wait_until_answering
from mltasks.bench.report import summarize

TEST_URL = "postgresql://postgres@127.0.0.1:5432/mltasks_bench_test"


@pytest.fixture
def bench_db() -> Iterator[str]:
    try:
        psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL at 127.0.0.1:5432: {exc}")
    recreate_database(TEST_URL)
    yield TEST_URL
    drop_database(TEST_URL)


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
