"""End to end on real parts: the game's statements -> bridge -> Redis broker -> Celery
worker -> ONNX -> ai_responses, read back the way the C++ reads it."""

from __future__ import annotations

import dataclasses
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from mltasks.config import Config
from mltasks.contract import ARCHETYPES
from tests import game
from tests.conftest import BridgeThread, use_config, wait_for
from tests.game import TOKEN, claim

STATE = [0.8, 0.5] + [0.0] * 62


def states(n: int, seed: int = 0) -> np.ndarray:
    from mltasks.state import sample_states

    return sample_states(np.random.default_rng(seed), n)


def answers(pg: psycopg.Connection[Any]) -> dict[int, tuple[int, float, str, str | None]]:
    rows = pg.execute(
        "SELECT request_id, action_id, confidence, source, reason FROM ai_responses"
    ).fetchall()
    return {r[0]: (r[1], r[2], r[3], r[4]) for r in rows}


def open_rows(pg: psycopg.Connection[Any]) -> int:
    row = pg.execute(
        "SELECT count(*) FROM ai_requests WHERE status IN ('pending', 'processing')"
    ).fetchone()
    assert row is not None
    return int(row[0])


def wait_answered(pg: psycopg.Connection[Any], n: int, timeout: float = 30) -> None:
    def done() -> bool:
        row = pg.execute("SELECT count(*) FROM ai_responses").fetchone()
        return row is not None and row[0] >= n

    wait_for(done, timeout, f"{n} answers")


def test_the_game_gets_a_model_answer_for_every_archetype(
    pg: psycopg.Connection[Any], bridge: BridgeThread
) -> None:
    seen = {}
    for i, archetype in enumerate(ARCHETYPES):
        state = states(1, seed=i)[0].tolist()
        rid, answer = game.decide(pg, state, timeout_ms=10_000, archetype=archetype)
        assert answer is not None, f"{archetype}: no answer"
        action, confidence = answer
        assert 0 <= action <= 9
        assert 0.1 <= confidence <= 1.0  # max of a 10-way softmax is at least 0.1
        seen[archetype] = (rid, action, confidence)
    rows = pg.execute(
        "SELECT r.status, s.source, s.model "
        "FROM ai_requests r JOIN ai_responses s USING (request_id)"
    ).fetchall()
    assert {r[0] for r in rows} == {"completed"}
    assert {r[1] for r in rows} == {"model"}
    # The default level 3 answers with its fusion: every type of it had a say.
    fused = "combat_dqn+skill_dqn+threat_assessment"
    # ... each with the version that answered (<type>@<version>, issue 16).
    assert {re.sub(r"@[0-9a-f]{12}", "", r[2]) for r in rows} == {
        f"{a}/{fused}" for a in ARCHETYPES
    }
    assert all(r[2].count("@") == 3 for r in rows)
    # Confidence comes from the model, not a constant.
    assert len({c for _, _, c in seen.values()}) > 1
    assert open_rows(pg) == 0


def test_answer_arrives_before_the_deadline(
    config: Config, pg: psycopg.Connection[Any], bridge: BridgeThread
) -> None:
    game.decide(pg, STATE, timeout_ms=10_000)  # warm the worker's models
    fresh = states(1, seed=99)[0].tolist()  # not in any cache: the model must run
    rid, answer = game.decide(pg, fresh, timeout_ms=config.inference.max_latency_ms)
    assert answer is not None
    row = pg.execute(
        "SELECT s.source, extract(epoch FROM s.created_at - r.created_at) * 1000 "
        "FROM ai_requests r JOIN ai_responses s USING (request_id) WHERE request_id = %s",
        (rid,),
    ).fetchone()
    assert row is not None
    assert row[0] == "model"
    assert row[1] < config.inference.max_latency_ms


def test_500_requests_answered_exactly_once(config: Config, bridge: BridgeThread) -> None:
    pool = states(500, seed=7)
    ids: list[int] = []
    lock = threading.Lock()

    def map_server(k: int) -> None:
        with psycopg.connect(config.database.conninfo, autocommit=True) as conn:
            for i in range(k, 500, 4):
                rid = game.insert(conn, pool[i].tolist(), archetype=ARCHETYPES[i % 6])
                with lock:
                    ids.append(rid)

    threads = [threading.Thread(target=map_server, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with psycopg.connect(config.database.conninfo, autocommit=True) as pg:
        wait_answered(pg, 500, timeout=60)
        got = answers(pg)
        assert sorted(got) == sorted(ids)
        assert len(ids) == 500
        assert all(0 <= a <= 9 or a == 255 for a, _, _, _ in got.values())
        assert open_rows(pg) == 0
        claims = pg.execute("SELECT max(attempts), min(attempts) FROM ai_requests").fetchone()
        assert claims == (1, 1)
        by_source: dict[str, int] = dict(
            pg.execute("SELECT source, count(*) FROM ai_responses GROUP BY source").fetchall()
        )
    assert by_source.get("model", 0) > 0


def test_two_bridges_never_claim_a_row_twice(
    config: Config, pg: psycopg.Connection[Any], worker: Any, celery_app: Any
) -> None:
    pool = states(400, seed=3)
    with BridgeThread(config, celery_app) as b1, BridgeThread(config, celery_app) as b2:
        for i in range(400):
            game.insert(pg, pool[i].tolist(), archetype=ARCHETYPES[i % 6])
        wait_answered(pg, 400, timeout=60)
    assert b1.bridge.claimed + b2.bridge.claimed == 400
    assert pg.execute("SELECT count(*) FROM ai_requests WHERE attempts <> 1").fetchone() == (0,)
    assert len(answers(pg)) == 400
    assert open_rows(pg) == 0


BAD_INPUTS = [
    ("short", "ARRAY[0.5,0.5]::REAL[]", "aggressive", "state_length_2"),
    ("long", "ARRAY[" + ",".join(["0.1"] * 65) + "]::REAL[]", "aggressive", "state_length_65"),
    ("empty", "ARRAY[]::REAL[]", "aggressive", "state_length_0"),
    ("nan", "ARRAY['NaN'" + ",0.1" * 63 + "]::REAL[]", "tank", "state_not_finite"),
    ("inf", "ARRAY[0.1" + ",0.1" * 62 + ",'Infinity']::REAL[]", "mage", "state_not_finite"),
    ("null_state", "NULL", "support", "state_null"),
    ("null_element", "ARRAY[NULL" + ",0.1" * 63 + "]::REAL[]", "ranged", "state_element_null"),
    (
        "two_dims",
        "ARRAY[[" + ",".join(["0.1"] * 32) + "],[" + ",".join(["0.1"] * 32) + "]]::REAL[]",
        "defensive",
        "state_length_2",
    ),
    (
        "unknown_archetype",
        "ARRAY[" + ",".join(["0.1"] * 64) + "]::REAL[]",
        "../../etc/passwd",
        "archetype_unknown",
    ),
    ("null_archetype", "ARRAY[" + ",".join(["0.1"] * 64) + "]::REAL[]", None, "archetype_null"),
]


def test_bad_input_gets_255_and_a_reason_without_failing_its_batch(
    config: Config, pg: psycopg.Connection[Any], worker: Any, celery_app: Any
) -> None:
    ids = {}
    for name, state_sql, archetype, _ in BAD_INPUTS:
        arch = "NULL" if archetype is None else f"'{archetype}'"
        row = pg.execute(
            "INSERT INTO ai_requests (monster_id, mob_id, archetype, state_vector, map_id, "
            f"position_x, position_y, hp_ratio, sp_ratio, status, priority) VALUES "
            f"(1, 1002, {arch}, {state_sql}, 0, 0, 0, 0.5, 0.5, 'pending', 5) RETURNING request_id"
        ).fetchone()
        assert row is not None
        ids[name] = row[0]
    good = game.insert(pg, STATE, archetype="tank")
    # All in one batch: one bridge claims them together.
    with BridgeThread(config, celery_app):
        wait_answered(pg, len(BAD_INPUTS) + 1)
    got = answers(pg)
    for name, _, _, reason in BAD_INPUTS:
        assert got[ids[name]][0] == 255, name
        assert got[ids[name]][3] == reason, name
        assert got[ids[name]][1] == 0.0
    assert 0 <= got[good][0] <= 9
    statuses = dict(pg.execute("SELECT request_id, status FROM ai_requests").fetchall())
    assert {statuses[i] for i in ids.values()} == {"invalid"}
    assert statuses[good] == "completed"
    for rid in [*ids.values(), good]:  # every answer parses the way the C++ parses it
        assert game.poll(pg, rid) is not None


def test_no_models_means_255_for_everyone(
    config: Config, pg: psycopg.Connection[Any], bridge: BridgeThread, tmp_path: Path
) -> None:
    use_config(dataclasses.replace(config, models=dataclasses.replace(config.models, dir=tmp_path)))
    _, answer = game.decide(pg, STATE, timeout_ms=10_000, archetype="mage")
    assert answer == (255, 0.0)
    row = pg.execute(
        "SELECT s.reason, r.status FROM ai_responses s JOIN ai_requests r USING (request_id)"
    ).fetchone()
    # the worker's 255, or the bridge's once the worker took the level to 5 (no usable model)
    assert row in (("no_model", "completed"), ("fallback_level_5", "completed"))


def test_a_corrupt_model_is_skipped_and_its_archetype_gets_255(
    config: Config,
    pg: psycopg.Connection[Any],
    bridge: BridgeThread,
    tmp_path: Path,
    models_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import shutil

    from mltasks.models.demo import write_corrupt_model

    shutil.copytree(models_dir, tmp_path / "m")
    for model_type in config.models.fusion.level3:  # all of tank's level-3 types
        write_corrupt_model(tmp_path / "m" / "tank" / f"{model_type}_fp16.onnx")
    write_corrupt_model(tmp_path / "m" / "mage" / "combat_dqn_fp16.onnx")  # one of mage's
    use_config(
        dataclasses.replace(config, models=dataclasses.replace(config.models, dir=tmp_path / "m"))
    )
    tank_id, tank = game.decide(pg, STATE, timeout_ms=10_000, archetype="tank")
    mage_id, mage = game.decide(pg, STATE, timeout_ms=10_000, archetype="mage")
    assert tank == (255, 0.0)
    assert mage is not None and mage[0] != 255
    assert any(getattr(r, "event", "") == "model_skipped" for r in caplog.records)
    models = dict(pg.execute("SELECT request_id, coalesce(model, reason) FROM ai_responses"))
    assert models[tank_id] == "no_model"
    # renormalised (each type with its version: <type>@<version>)
    assert re.sub(r"@[0-9a-f]{12}", "", models[mage_id]) == ("mage/skill_dqn+threat_assessment")


def test_redelivered_batch_writes_nothing_twice(
    config: Config, pg: psycopg.Connection[Any], worker: Any
) -> None:
    from mltasks.serving.batch import infer_batch

    rid = game.insert(pg, STATE)
    claim(pg, rid)
    rows = [[rid, "aggressive", 1002, STATE]]
    infer_batch.apply(args=[rows, 3, 0.0, None, TOKEN]).get()
    first = answers(pg)
    infer_batch.apply(args=[rows, 3, 0.0, None, TOKEN]).get()
    assert answers(pg) == first
    assert len(first) == 1
    assert pg.execute("SELECT status FROM ai_requests").fetchone() == ("completed",)


def test_a_row_past_the_bridges_rescue_point_is_not_inferred(
    config: Config, pg: psycopg.Connection[Any], worker: Any
) -> None:
    """A row at 90% of its deadline is the bridge's to rescue (at 80%): the worker answers
    it 255 at once instead of spending the batch's time on it."""
    import time

    from mltasks.serving.batch import infer_batch

    # A deadline of 2 s: the fresh row stays fresh however slow this host is.
    slow = use_config(
        dataclasses.replace(
            config, inference=dataclasses.replace(config.inference, max_latency_ms=2000)
        )
    )
    old, fresh = game.insert(pg, STATE), game.insert(pg, STATE, archetype="mage")
    claim(pg, old, fresh)
    now = time.time()
    rows = [[old, "aggressive", 1002, STATE, 1002], [fresh, "mage", 1002, STATE, 1002]]
    created = [now - 0.9 * slow.inference.max_latency_ms / 1000, now]
    assert infer_batch.apply(args=[rows, 3, now, created, TOKEN]).get() == 2
    got = answers(pg)
    assert got[old] == (255, 0.0, "bridge", "deadline")
    assert got[fresh][2] == "model"
    statuses = dict(pg.execute("SELECT request_id, status FROM ai_requests").fetchall())
    assert statuses == {old: "expired", fresh: "completed"}
