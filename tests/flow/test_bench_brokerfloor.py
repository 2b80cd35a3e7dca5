"""The broker floor (mltasks/bench/brokerfloor.py) and CPU per decision (cpucost.py): the
floor answers a bulk load through Celery and the session's Redis, each request once,
with the tiny model's action; backends are told apart by application_name; the report's
ratios and the ``--floor`` list parse as documented."""

from __future__ import annotations

import argparse
import threading
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from mltasks.bench import bulkreport, cpucost
from mltasks.bench.brokerfloor import SOURCE, STATE_BYTES, WEIGHTS, decide
from mltasks.bench.bulk import BulkSpec, bulk_reset, drain, offer_load
from mltasks.bench.capacity import OpsMeter
from mltasks.bench.cli_args import floors_arg
from mltasks.bench.report import ratios as gateway_ratios
from mltasks.bench.responders import broker_floor
from mltasks.cli import build_parser
from tests.game import answers_per_request, array_send

# -- the CLI -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "floors"),
    [
        ("broker", ("broker",)),
        ("plain,broker", ("plain", "broker")),
        ("both", ("plain", "model")),
        ("both, broker", ("plain", "model", "broker")),
        ("broker,broker", ("broker",)),
    ],
)
def test_floor_lists(text: str, floors: tuple[str, ...]) -> None:
    assert floors_arg(text) == floors


@pytest.mark.parametrize("text", ["", "quick", "plain,quick"])
def test_floor_lists_refuse_unknown_floors(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        floors_arg(text)


@pytest.mark.parametrize("command", ["bulk", "gateway"])
def test_floor_option_of_the_commands(command: str) -> None:
    parse = build_parser().parse_args
    assert parse(["bench", command]).floor == ()
    assert parse(["bench", command, "--floor"]).floor == ("plain",)
    assert parse(["bench", command, "--floor", "broker"]).floor == ("broker",)
    assert parse(["bench", command, "--floor", "plain,broker"]).floor == ("plain", "broker")


# -- the tiny model ------------------------------------------------------------------------


def test_decide_reads_array_send_bytes() -> None:
    rng = np.random.default_rng(1)
    states = rng.random((5, 64), dtype=np.float32)
    raw: list[bytes | None] = [array_send(s.tolist()) for s in states]
    assert all(len(b or b"") == STATE_BYTES for b in raw)
    raw.insert(2, array_send([0.5] * 63))  # not 64 values
    raw.append(None)  # no state at all
    actions, confidences = decide(raw)
    expected = (states @ WEIGHTS).argmax(axis=1).tolist()
    assert actions == [*expected[:2], 255, *expected[2:], 255]
    assert all(0.0 < c <= 1.0 for i, c in enumerate(confidences) if actions[i] != 255)
    # NaN in a state still gives a valid answer (the schema refuses a NaN confidence).
    nan = decide([array_send([float("nan")] * 64)])
    assert 0 <= nan[0][0] <= 9 and 0.0 <= nan[1][0] <= 1.0


# -- the report ----------------------------------------------------------------------------


def _run(responder: str, rate: float, rps: float, cpu: dict[str, float]) -> dict[str, Any]:
    lat = {"p50": 2.0, "p90": 3.0, "p99": 4.0, "max": 5.0, "mean": 2.0}
    return {
        "responder": responder,
        "rate": rate,
        "answered_per_s": rps,
        "answered_share": 1.0,
        "latency_ms": lat,
        "load_average_before": [1.0, 1.0, 1.0],
        "per_decision": {"cpu_ms": cpu, "cpu_ms_total": cpucost.total_ms(cpu)},
    }


def test_cpu_total_counts_the_responders_processes_not_the_load() -> None:
    cpu = {"bridge": 0.5, "worker": 1.0, "postgres": 0.25, "redis": 0.125, "postgres_load": 9.0}
    assert cpucost.total_ms(cpu) == 1.875
    cells = cpucost.cpu_cells({"cpu_ms": cpu, "statements": {"available": False}})
    assert cells == ["0.500", "1.000", "n/a", "0.250", "0.125", "**1.875**", "9.000", "n/a"]


def test_bulk_ratios_against_both_floors() -> None:
    runs = [
        _run("floor", 500, 500.0, {"other": 0.5, "postgres": 0.5}),
        _run("broker floor", 500, 400.0, {"bridge": 1.0, "worker": 1.0}),
        _run("service", 500, 200.0, {"bridge": 2.0, "worker": 4.0}),
    ]
    got = {(q["responder"], q["against"]): q for q in bulkreport.ratios(runs)}
    assert set(got) == {
        ("broker floor", "floor"),
        ("service", "floor"),
        ("service", "broker floor"),
    }
    assert got[("service", "floor")]["answered_per_s_ratio"] == 0.4
    assert got[("service", "broker floor")]["answered_per_s_ratio"] == 0.5
    assert got[("service", "broker floor")]["cpu_per_decision_ratio"] == 3.0
    assert got[("broker floor", "floor")]["cpu_per_decision_ratio"] == 2.0


def test_sustained_summary_says_service_over_broker_floor() -> None:
    sustained: dict[str, dict[str, Any]] = {
        "floor": {"rate": 8000.0},
        "broker floor": {"rate": 4000.0},
        "service": {"rate": 1000.0},
    }
    assert bulkreport.sustained_ratios(sustained, "broker floor") == {"service": 0.25}
    assert bulkreport.sustained_summary(sustained) == [
        "broker floor held 4000/s, floor held 8000/s: broker floor / floor 0.5x",
        "service held 1000/s, floor held 8000/s: service / floor 0.125x",
        "service held 1000/s, broker floor held 4000/s: service / broker floor 0.25x",
    ]
    sustained = {"broker floor": {"rate": 60.0}, "service": {"rate": None}}
    assert bulkreport.sustained_summary(sustained) == [
        "service held no rate, broker floor held 60/s: service / broker floor n/a"
    ]


def test_gateway_ratios_against_the_broker_floor() -> None:
    def run(name: str, dps: float, total: float) -> dict[str, Any]:
        lat = {"p50": 2.0, "p99": 4.0}
        pd = {"cpu_ms_total": total}
        return {"responder": name, "clients": 8, "decisions_per_s": dps, "latency_ms": lat} | {
            "per_decision": pd
        }

    out = gateway_ratios([run("broker floor", 1000.0, 2.0), run("service", 600.0, 5.0)])
    assert out == [
        {
            "clients": 8,
            "floor": "broker floor",
            "decisions_per_s_ratio": 0.6,
            "p50_diff_ms": 0.0,
            "p99_ratio": 1.0,
            "cpu_per_decision_ratio": 2.5,
        }
    ]


def test_statements_unavailable_without_the_preload(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: Any, **__: Any) -> None:
        raise psycopg.errors.ObjectNotInPrerequisiteState(
            "pg_stat_statements must be loaded via shared_preload_libraries"
        )

    monkeypatch.setattr(psycopg, "connect", refuse)
    meter = cpucost.StatementsMeter("postgresql://fake")
    assert meter.per_decision(10) == {
        "available": False,
        "reason": "pg_stat_statements not preloaded",
    }
    assert "statements: unavailable (pg_stat_statements not preloaded)" in "\n".join(
        cpucost.cpu_lines(
            [
                {
                    "responder": "x",
                    "rate": 1.0,
                    "per_decision": {"statements": meter.per_decision(1)},
                }
            ],
            key="rate",
            key_label="rate/s",
        )
    )


def test_statements_per_decision_from_two_snapshots(monkeypatch: pytest.MonkeyPatch) -> None:
    snapshots = iter(
        [
            {1: (10, 5.0, "a"), 2: (3, 1.0, "b")},
            {1: (30, 25.0, "a"), 2: (3, 1.0, "b"), 3: (10, 2.0, "-- what c does\nc  d")},
        ]
    )
    monkeypatch.setattr(
        cpucost.StatementsMeter, "_snapshot", lambda self, create=False: next(snapshots)
    )
    assert cpucost.StatementsMeter("postgresql://fake").per_decision(10) == {
        "available": True,
        "ms_per_decision": 2.2,
        "top": [  # costliest first; b ran no more during the run
            {"query": "a", "ms_per_decision": 2.0, "calls_per_decision": 2.0},
            {"query": "c d", "ms_per_decision": 0.2, "calls_per_decision": 1.0},
        ],
    }


def test_statements_with_several_queryids_are_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # The answer statement with int2[] ids, then int4[] ids once they pass 32767: two
    # queryids, one statement (the report once showed it at half its calls).
    snapshots = iter(
        [
            {},
            {7: (4, 2.0, "-- answer\nWITH x"), 8: (6, 3.0, "-- answer\nWITH x"), 9: (1, 0.5, "y")},
        ]
    )
    monkeypatch.setattr(
        cpucost.StatementsMeter, "_snapshot", lambda self, create=False: next(snapshots)
    )
    top = cpucost.StatementsMeter("postgresql://fake").per_decision(10)["top"]
    assert top == [
        {"query": "WITH x", "ms_per_decision": 0.5, "calls_per_decision": 1.0},
        {"query": "y", "ms_per_decision": 0.05, "calls_per_decision": 0.1},
    ]


def test_bridge_holds_back_while_a_batch_waits(bench_db: str) -> None:
    """No claim while the queue holds a batch (no worker here takes it); claims again once
    it is empty, and a publish that finds its batch still waiting holds back again."""
    import os

    from mltasks.bench.brokerfloor import QUEUE, BrokerFloorBridge
    from mltasks.bench.service import BROKER_DB
    from mltasks.config import RedisConfig

    broker = RedisConfig(url=os.environ["MLTASKS_TEST_REDIS_URL"]).db_url(BROKER_DB)
    bridge = BrokerFloorBridge(bench_db, broker)
    bridge.queue.delete(QUEUE)
    with psycopg.connect(bench_db, autocommit=True) as conn:
        insert = "INSERT INTO ai_requests (monster_id, state_vector) VALUES (1, %s::real[])"
        conn.execute(insert, ([0.5] * 64,))
        bridge.queue.rpush(QUEUE, b"a batch nobody took")
        bridge.held = True
        assert bridge.drain(conn) == 1  # busy, but nothing claimed
        status = "SELECT array_agg(status ORDER BY request_id) FROM ai_requests"
        assert conn.execute(status).fetchone() == (["pending"],)
        bridge.queue.delete(QUEUE)
        assert bridge.drain(conn) == 1  # claimed and sent
        assert conn.execute(status).fetchone() == (["processing"],)
        assert bridge.held and bridge.queue.llen(QUEUE) == 1  # its batch waits: held
        conn.execute(insert, ([0.5] * 64,))
        assert bridge.drain(conn) == 1
        assert conn.execute(status).fetchone() == (["processing", "pending"],)
    bridge.queue.delete(QUEUE)
    bridge.queue.close()


# -- measured ------------------------------------------------------------------------------


def _burn(url: str, app: str) -> None:
    with psycopg.connect(url, autocommit=True, application_name=app) as conn:
        conn.execute("SELECT count(*) FROM generate_series(1, 3000000)")


def test_backends_are_told_apart_by_application_name(bench_db: str) -> None:
    meter = cpucost.BackendCpu(bench_db, interval_s=0.05)
    ours = threading.Thread(target=_burn, args=(bench_db, cpucost.app_name("x-bridge")))
    ours.start()
    ours.join()
    seconds = meter.seconds()
    assert seconds["postgres"] > 0.1, seconds  # the whole query, in a backend born meanwhile
    assert seconds["postgres_load"] < seconds["postgres"] / 3, seconds

    meter = cpucost.BackendCpu(bench_db, interval_s=0.05)
    _burn(bench_db, "")  # a client of the load: not the responder's
    seconds = meter.seconds()
    assert seconds["postgres_load"] > 0.1 and seconds["postgres"] < 0.05, seconds


def test_redis_process_found_by_port() -> None:
    import os

    url = os.environ["MLTASKS_TEST_REDIS_URL"]
    proc = cpucost.redis_process(url)
    assert proc is not None and "redis" in " ".join([*proc.cmdline(), proc.name()])
    assert cpucost.redis_process("redis://10.255.255.1:6379/0") is None


def test_broker_floor_answers_a_bulk_load_once_each(bench_db: str, tmp_path: Path) -> None:
    import os

    redis_url = os.environ["MLTASKS_TEST_REDIS_URL"]
    with broker_floor(bench_db, redis_url, tmp_path) as running:
        bulk_reset(bench_db)  # the warm-up request is not part of the run
        ops = OpsMeter(bench_db, redis_url, running.procs)
        load = offer_load(BulkSpec(conninfo=bench_db, rate=200, duration_s=1.5, tick_ms=5))
        _, left = drain(bench_db, timeout_s=20)
        per_decision = ops.per_decision(load.rows)
    assert load.rows == 300 and left == 0
    rows = answers_per_request(bench_db)
    assert len(rows) == 300
    states = np.asarray([r.state for r in rows], dtype=np.float32)
    expected = (states @ WEIGHTS).argmax(axis=1).tolist()
    assert [r.sources for r in rows] == [[SOURCE]] * 300  # exactly one answer, the floor's
    assert [r.actions[0] for r in rows] == expected  # the tiny model's, on the decoded bytes
    assert {(r.status, r.closed) for r in rows} == {("completed", True)}
    cpu = per_decision["cpu_ms"]
    # Its processes and its backends (application_name) used CPU; Redis was found.
    assert cpu["bridge"] > 0 and cpu["worker"] > 0 and cpu["postgres"] > 0, cpu
    assert "redis" in cpu and per_decision["redis_commands_total"] > 0
