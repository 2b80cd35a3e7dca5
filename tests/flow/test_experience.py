"""Experience recording (issue 29): answered decisions become transitions (state, action,
next state of the same monster), off the answer path, bounded, exported as .npz.

On the real test PostgreSQL (a fresh database per test); the flow test runs the real bridge
and Celery worker of tests/conftest.py beside a recorder that cannot write."""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from mltasks.config import Config, ExperienceConfig
from mltasks.experience.export import export
from mltasks.experience.recorder import Recorder, Round, record_round
from mltasks.sql import query
from tests import game
from tests.conftest import wait_for

FAST = ExperienceConfig(enabled=True, settle_s=0.0, interval_s=0.1)


def state(i: float, n: int = 64) -> list[float]:
    """A recognisable state: its first value is ``i / 100``."""
    return [i / 100] + [0.5] * (n - 1)


def answer(
    pg: psycopg.Connection[Any],
    rid: int,
    action: int = 1,
    *,
    source: str = "model",
    model: str | None = "aggressive/combat_dqn@abc",
    status: str = "completed",
) -> None:
    """Answer a row as a worker does (its response, its status)."""
    pg.execute(
        "INSERT INTO ai_responses (request_id, action_id, confidence, source, model)"
        " VALUES (%s, %s, 0.75, %s, %s)",
        (rid, action, source, model),
    )
    pg.execute(
        "UPDATE ai_requests SET status = %s, answered_at = clock_timestamp() WHERE request_id = %s",
        (status, rid),
    )


def decision(pg: psycopg.Connection[Any], i: float, monster: int, action: int = 1) -> int:
    rid = game.insert(pg, state(i), monster_id=monster, mob_id=monster)
    answer(pg, rid, action)
    return rid


def insert_raw(pg: psycopg.Connection[Any], vector: str, monster: int = 7) -> int:
    """A request whose state is SQL text (NaN, NULL elements, other lengths), answered."""
    row = pg.execute(
        "INSERT INTO ai_requests (monster_id, mob_id, archetype, state_vector)"
        f" VALUES (%s, %s, 'aggressive', {vector}) RETURNING request_id",
        (monster, monster),
    ).fetchone()
    assert row is not None
    answer(pg, row[0], 255, source="bridge", model=None)
    return int(row[0])


def sample(recorder: Recorder, counter: str, **labels: str) -> float:
    """A counter of the recorder's /metrics, as Prometheus reads it."""
    value = recorder.metrics.registry.get_sample_value(f"ml_experience_{counter}_total", labels)
    return value or 0.0


def started(pg: psycopg.Connection[Any], cfg: ExperienceConfig = FAST) -> None:
    """A first round: it sets the mark at its own time (recording begins now)."""
    assert record_round(pg, cfg).total == 0


def transitions(pg: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return pg.execute(
        "SELECT monster_id, state[1], next_state[1], action_id, source FROM ai_experience"
        " ORDER BY id"
    ).fetchall()


def fill_the_disk(pg: psycopg.Connection[Any]) -> None:
    """The recorder's writes fail from now on as on a full disk (SQLSTATE 53100)."""
    pg.execute(
        "CREATE FUNCTION disk_full() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN RAISE EXCEPTION 'could not extend file' USING ERRCODE = 'disk_full'; END $$"
    )
    pg.execute(
        "CREATE TRIGGER disk_full BEFORE INSERT ON ai_experience"
        " FOR EACH ROW EXECUTE FUNCTION disk_full()"
    )


def test_each_answer_is_paired_with_the_next_state_of_its_monster(
    pg: psycopg.Connection[Any],
) -> None:
    started(pg)
    for i, monster in [(1, 10), (2, 20), (3, 10), (4, 10), (5, 20)]:
        decision(pg, i, monster, action=i)
    done = record_round(pg, FAST)
    assert done.recorded == {"model": 3}
    assert transitions(pg) == [
        (10, pytest.approx(0.01), pytest.approx(0.03), 1, "model"),
        (20, pytest.approx(0.02), pytest.approx(0.05), 2, "model"),
        (10, pytest.approx(0.03), pytest.approx(0.04), 3, "model"),
    ]
    # Each monster's last decision waits for its next state, across rounds.
    waiting = pg.execute("SELECT monster_id, state[1] FROM ai_experience_waiting ORDER BY 1")
    assert waiting.fetchall() == [(10, pytest.approx(0.04)), (20, pytest.approx(0.05))]
    decision(pg, 6, 10, action=6)
    assert record_round(pg, FAST).recorded == {"model": 1}
    assert transitions(pg)[-1] == (10, pytest.approx(0.04), pytest.approx(0.06), 4, "model")
    # Nothing twice: a round with nothing new records nothing.
    assert record_round(pg, FAST).total == 0
    assert len(transitions(pg)) == 4


def test_latency_source_model_and_a_game_timeout_are_kept(pg: psycopg.Connection[Any]) -> None:
    started(pg)
    a = game.insert(pg, state(1), monster_id=3)
    answer(pg, a, 9, source="rules", model=None)
    b = game.insert(pg, state(2), monster_id=3)
    game.mark_timeout(pg, b)
    pg.execute(
        "INSERT INTO ai_responses (request_id, action_id, confidence, source, reason)"
        " VALUES (%s, 255, 0, 'bridge', 'game_timeout')",
        (b,),
    )
    game.insert(pg, state(3), monster_id=3)  # unanswered: neither a decision nor a next state
    c = game.insert(pg, state(4), monster_id=3)
    answer(pg, c, 1)
    record_round(pg, FAST)
    rows = pg.execute(
        "SELECT request_id, action_id, source, model, reason, status, next_state[1], latency_ms"
        " FROM ai_experience ORDER BY id"
    ).fetchall()
    assert [r[:7] for r in rows] == [
        (a, 9, "rules", None, None, "completed", pytest.approx(0.02)),
        (b, 255, "bridge", None, "game_timeout", "timeout", pytest.approx(0.04)),
    ]
    expected = pg.execute(
        "SELECT extract(epoch FROM s.created_at - r.created_at) * 1000 FROM ai_requests r"
        " JOIN ai_responses s USING (request_id) WHERE request_id = %s",
        (a,),
    ).fetchone()
    assert expected is not None and rows[0][7] == pytest.approx(float(expected[0]), abs=1e-3)


def test_a_bad_state_is_not_recorded_and_is_counted_under_its_reason(
    pg: psycopg.Connection[Any],
) -> None:
    started(pg)
    decision(pg, 1, 7)
    insert_raw(pg, "ARRAY['NaN'" + ",0.5" * 63 + "]::real[]")
    insert_raw(pg, "ARRAY['Infinity'" + ",0.5" * 63 + "]::real[]")
    insert_raw(pg, "ARRAY[NULL" + ",0.5" * 63 + "]::real[]")
    insert_raw(pg, "ARRAY[0.1" + ",0.5" * 62 + "]::real[]")
    insert_raw(pg, "ARRAY[0.1" + ",0.5" * 64 + "]::real[]")
    insert_raw(pg, "array_fill(0.5::real, ARRAY[8, 8])")  # 64 values, but not a vector
    insert_raw(pg, "NULL")
    invalid = insert_raw(pg, "ARRAY[0.1" + ",0.5" * 63 + "]::real[]")
    pg.execute("UPDATE ai_requests SET status = 'invalid' WHERE request_id = %s", (invalid,))
    unknown = insert_raw(pg, "ARRAY[0.1" + ",0.5" * 63 + "]::real[]")
    pg.execute("UPDATE ai_requests SET archetype = 'dragon' WHERE request_id = %s", (unknown,))
    nobody = insert_raw(pg, "ARRAY[0.1" + ",0.5" * 63 + "]::real[]")
    pg.execute("UPDATE ai_requests SET monster_id = NULL WHERE request_id = %s", (nobody,))
    decision(pg, 2, 7)
    done = record_round(pg, FAST)
    assert done.rejected == {
        "not_finite": 2,
        "null_value": 1,
        "wrong_length": 4,
        "invalid": 1,
        "archetype": 1,
        "no_monster": 1,
    }
    # The good decisions around them still make one transition.
    assert transitions(pg) == [(7, pytest.approx(0.01), pytest.approx(0.02), 1, "model")]


def test_bounds_drop_the_oldest_first_and_count_it(pg: psycopg.Connection[Any]) -> None:
    cfg = dataclasses.replace(FAST, max_rows=3)
    started(pg, cfg)
    for i in range(6):
        decision(pg, i, 5, action=i)
    done = record_round(pg, cfg)
    assert done.total == 5 and done.dropped["cap"] == 2
    assert [t[3] for t in transitions(pg)] == [2, 3, 4]  # the newest three
    pg.execute(
        "UPDATE ai_experience SET requested_at = requested_at - interval '2 days'"
        " WHERE action_id = 2"
    )
    done = record_round(pg, dataclasses.replace(cfg, retention_s=86400))
    assert done.dropped == {"retention": 1, "cap": 0, "unpaired": 0}
    assert [t[3] for t in transitions(pg)] == [3, 4]


def test_a_monster_that_never_comes_back_is_dropped_as_unpaired(
    pg: psycopg.Connection[Any],
) -> None:
    cfg = dataclasses.replace(FAST, pair_wait_s=0.0)
    started(pg, cfg)
    decision(pg, 1, 8)
    assert record_round(pg, cfg).dropped["unpaired"] == 0  # its own round: it just arrived
    assert record_round(pg, cfg).dropped["unpaired"] == 1
    assert pg.execute("SELECT count(*) FROM ai_experience_waiting").fetchone() == (0,)


def test_rows_older_than_the_first_round_are_not_recorded(pg: psycopg.Connection[Any]) -> None:
    decision(pg, 1, 4)
    decision(pg, 2, 4)
    record_round(pg, FAST)
    assert transitions(pg) == []


def test_a_recorder_behind_catches_up_in_bounded_windows(pg: psycopg.Connection[Any]) -> None:
    cfg = dataclasses.replace(FAST, window_s=30.0)
    started(pg, cfg)
    pg.execute("UPDATE ai_experience_mark SET recorded_to = recorded_to - interval '100 s'")
    decision(pg, 1, 3)
    decision(pg, 2, 3)
    rounds = [record_round(pg, cfg) for _ in range(4)]
    assert [r.behind_s > 0 for r in rounds] == [True, True, True, False]
    assert [r.total for r in rounds] == [0, 0, 0, 1]
    assert all(r.hi is not None and r.lo is not None for r in rounds)
    assert rounds[0].hi - rounds[0].lo == dt.timedelta(seconds=30)  # type: ignore[operator]


def test_a_failing_round_changes_nothing_and_the_next_one_records_it_all(
    pg: psycopg.Connection[Any], config: Config
) -> None:
    cfg = dataclasses.replace(config, experience=FAST)
    recorder = Recorder(cfg)
    try:
        assert recorder.run_once() is not None
        for i in range(4):
            decision(pg, i, 6)
        # The recorder's writes fail as on a full disk (SQLSTATE 53100).
        fill_the_disk(pg)
        assert recorder.run_once() is None
        assert recorder.run_once() is None
        failed = sample(recorder, "rounds", outcome="failed")
        assert failed == 2
        assert pg.execute("SELECT count(*) FROM ai_experience_waiting").fetchone() == (0,)
        pg.execute("DROP TRIGGER disk_full ON ai_experience")
        done = recorder.run_once()
        assert done is not None and done.total == 3
        assert [t[1] for t in transitions(pg)] == pytest.approx([0.0, 0.01, 0.02])
        assert sample(recorder, "recorded", source="model") == 3
    finally:
        recorder.close()


def test_an_unreachable_database_skips_rounds_without_raising(config: Config) -> None:
    cfg = dataclasses.replace(
        config,
        database=dataclasses.replace(config.database, url="postgresql://u@127.0.0.1:1/none"),
        experience=FAST,
    )
    recorder = Recorder(cfg)
    stop = threading.Event()
    thread = threading.Thread(target=recorder.run, args=(stop,))
    thread.start()
    try:
        wait_for(
            lambda: sample(recorder, "rounds", outcome="failed") >= 3, 10, "three failed rounds"
        )
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()


def test_a_second_recorder_skips_its_round(pg: psycopg.Connection[Any], config: Config) -> None:
    other = psycopg.connect(config.database.conninfo, autocommit=True)
    with other, other.transaction():
        other.execute(query("experience_lock"))
        assert record_round(pg, FAST) == Round("locked")


def test_cleanup_keeps_what_the_recorder_has_not_read(pg: psycopg.Connection[Any]) -> None:
    started(pg)
    read, unread, ancient = (decision(pg, i, 9) for i in range(3))
    record_round(pg, FAST)  # reads all three ...
    pg.execute(  # ... then pretend the mark stopped between the first two
        "UPDATE ai_experience_mark SET recorded_to ="
        " (SELECT created_at FROM ai_requests WHERE request_id = %s)",
        (read,),
    )
    pg.execute(
        "UPDATE ai_requests SET created_at = created_at - interval '3 hours' WHERE request_id = %s",
        (ancient,),
    )
    stmt = query("delete_finished_recorded")
    pg.execute(stmt, {"retention_s": 0, "limit": 100, "hold_s": 3600})
    left = {r[0] for r in pg.execute("SELECT request_id FROM ai_requests")}
    assert left == {unread}  # read: gone; ancient: past retention + hold; unread: kept
    pg.execute(stmt, {"retention_s": 0, "limit": 100, "hold_s": 0})
    assert pg.execute("SELECT count(*) FROM ai_requests").fetchone() == (0,)


def test_export_writes_one_npz_per_archetype_that_numpy_reads_without_pickle(
    pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    started(pg)
    rng = np.random.default_rng(0)
    states = rng.random((4, 64), dtype=np.float32)
    states[0, 5] = np.float32(0.1)  # no exact decimal: must come back bit for bit
    for k, (arch, monster) in enumerate([("tank", 1), ("tank", 1), ("mage", 2), ("mage", 2)]):
        rid = pg.execute(
            "INSERT INTO ai_requests (monster_id, mob_id, archetype, state_vector)"
            " VALUES (%s, %s, %s, %s::real[]) RETURNING request_id",
            (monster, monster, arch, [float(v) for v in states[k]]),
        ).fetchone()
        assert rid is not None
        answer(pg, rid[0], k, model=f"{arch}/combat_dqn@v{k}")
    record_round(pg, FAST)
    assert export(pg, tmp_path) == {"mage": 1, "tank": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mage.npz", "tank.npz"]
    with np.load(tmp_path / "tank.npz", allow_pickle=False) as f:
        assert f["state"].dtype == np.float32 and f["state"].shape == (1, 64)
        assert f["next_state"].dtype == np.float32 and f["next_state"].shape == (1, 64)
        assert np.array_equal(f["state"][0], states[0])  # bit for bit
        assert np.array_equal(f["next_state"][0], states[1])
        assert f["action"].tolist() == [0] and f["action"].dtype == np.int64
        assert f["source"].tolist() == ["model"]
        assert f["model"].tolist() == ["tank/combat_dqn@v0"]
        assert f["confidence"].tolist() == [pytest.approx(0.75)]
        assert f["applied"].tolist() == [True]
        assert f["latency_ms"].shape == (1,) and f["requested_at"].dtype == np.float64
        for key in f.files:
            assert f[key].dtype != object, key


def test_answers_flow_while_the_recorder_fails_and_are_recorded_after(
    config: Config, bridge: Any, pg: psycopg.Connection[Any]
) -> None:
    """The real bridge and worker answer every decision while the recorder's writes fail
    (as on a full disk); once they work again, every answered decision is recorded."""
    # Half a second for the answers to land (the default is 2 s: past the lease).
    cfg = dataclasses.replace(config, experience=dataclasses.replace(FAST, settle_s=0.5))
    recorder = Recorder(cfg)
    assert recorder.run_once() is not None
    fill_the_disk(pg)
    stop = threading.Event()
    thread = threading.Thread(target=recorder.run, args=(stop,))
    thread.start()
    try:
        answered = []
        for i in range(12):
            rid, got = game.decide(pg, state(i), 4000, monster_id=100 + i % 3, mob_id=1002)
            assert got is not None, f"request {rid} unanswered while the recorder fails"
            answered.append(rid)
        wait_for(
            lambda: sample(recorder, "rounds", outcome="failed") >= 1,
            10,
            "a failed round",
        )
        pg.execute("DROP TRIGGER disk_full ON ai_experience")
        wait_for(
            lambda: sample(recorder, "recorded", source="model") >= 9,
            10,
            "the transitions recorded",
        )
    finally:
        stop.set()
        thread.join(10)
        recorder.close()
    rows = pg.execute(
        "SELECT e.request_id, e.action_id, e.source, e.model, s.action_id, s.model"
        " FROM ai_experience e JOIN ai_responses s USING (request_id) ORDER BY e.id"
    ).fetchall()
    assert sorted(r[0] for r in rows) == sorted(answered[:9])  # 3 monsters: 3 still wait
    for _, action, source, model, answered_action, answered_model in rows:
        assert (action, model) == (answered_action, answered_model)
        assert source == "model" and model.startswith("aggressive/")


def test_the_benchmark_runs_the_recorder_only_when_set(tmp_path: Path) -> None:
    from mltasks.bench.cli_args import _override
    from mltasks.bench.service import (
        ServiceSettings,
        bench_config,
        experience_enabled,
        write_checked_config,
    )
    from mltasks.config import load_config

    def settings(*overrides: str) -> ServiceSettings:
        return ServiceSettings(
            database_url="postgresql://u@127.0.0.1:1/x",
            redis_url="redis://127.0.0.1:1",
            models_dir=tmp_path,
            work_dir=tmp_path,
            log_dir=tmp_path,
            overrides=tuple(_override(o) for o in overrides),
        )

    on, off = settings("experience.enabled=true"), settings("experience.enabled=false")
    assert experience_enabled(on) and not experience_enabled(off)
    assert not experience_enabled(settings())
    write_checked_config(tmp_path / "c.yaml", bench_config(on))
    cfg = load_config(tmp_path / "c.yaml", environ={})
    assert cfg.experience.enabled and cfg.experience.metrics_port > 0


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "mltasks.cli", "experience", "record"],
        ["-m", "mltasks.cli", "experience", "export", "out"],
        ["-m", "mltasks.experience"],
    ],
)
def test_a_bad_config_is_one_line_from_the_experience_commands(
    tmp_path: Path, argv: list[str]
) -> None:
    """As tests/flow/test_entry_points.py checks the others (kept apart: that test starts every
    entry point at once, and two more tip it over its timeout on a loaded host)."""
    import os
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("experience:\n  max_rowz: 5\n")
    run = subprocess.run(
        [sys.executable, *argv],
        env=dict(os.environ, MLTASKS_CONFIG=str(bad)),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    assert run.returncode == 2, run
    assert len(lines) == 1 and "experience.max_rowz: unknown key" in lines[0], lines


def test_dev_runs_the_recorder_only_when_enabled(tmp_path: Path) -> None:
    from mltasks.ops.dev import child_commands

    assert "experience" not in child_commands("cpu", tmp_path)
    assert child_commands("cpu", tmp_path, experience=True)["experience"][1:] == [
        "-m",
        "mltasks.experience",
    ]


def test_statement_names_are_unique_across_the_sql_files() -> None:
    from mltasks.sql import QUERY_FILES, SQL_DIR, parse_queries, query

    names = [n for f in QUERY_FILES for n in parse_queries((SQL_DIR / f).read_text())]
    assert len(names) == len(set(names))
    assert query("experience_record") and query("claim_batch")  # one loader, both files
