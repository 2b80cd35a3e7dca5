"""Real model cost: the Phase 11-size architectures, precisions from FP16 masters, the
model floor and `mltasks bench models`.

The phase11 profile is never written here (it is a benchmark's 460 MB): its models are
built in memory, one per distinct configuration, and loaded from bytes.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from mltasks.config import Config
from mltasks.contract import ARCHETYPES, N_ACTIONS, Action
from mltasks.fallback.policy import decide, threat
from mltasks.models import phase11
from mltasks.models.demo import _WIDE, _data, _heads
from mltasks.models.family import FAMILY
from mltasks.models.loaded import load_model
from mltasks.state import ENCODER
from tests import game
from tests.conftest import wait_for

# One archetype per distinct default configuration of each type (MODELS.md).
CONFIGS = [
    *(("aggressive", t) for t in FAMILY),
    ("tank", "combat_dqn"),
    ("defensive", "threat_assessment"),
    ("tank", "threat_assessment"),
    ("ranged", "spatial_vit"),
    ("mage", "combat_dqn"),  # a 12-wide head
]


@pytest.fixture(scope="module")
def data() -> dict[str, Any]:
    return {a: _data(ENCODER, a, 0) for a in {a for a, _ in CONFIGS}}


@pytest.mark.parametrize(("archetype", "model_type"), CONFIGS)
def test_phase11_sizes_match_the_fork_and_the_models_serve(
    archetype: str, model_type: str, data: dict[str, Any], tmp_path: Path
) -> None:
    rng = np.random.default_rng(1)
    heads = _heads(model_type, ENCODER, data[archetype], rng)
    width = _WIDE.get((archetype, model_type), N_ACTIONS)
    model, params = phase11.build(archetype, model_type, heads, width, rng)
    target = phase11.param_targets(archetype, model_type)
    assert abs(params / target - 1) < 0.05, f"{params:,} vs {target:,}"
    path = tmp_path / f"{model_type}_fp16.onnx"
    path.write_bytes(model.SerializeToString())
    loaded = load_model(path, archetype, model_type, ["CPUExecutionProvider"])
    assert loaded.precision == "fp16"
    x = ENCODER.sample(np.random.default_rng(3), 300, archetype)
    out = loaded.run(x)
    assert out.finite().all()
    if out.scores is not None:  # the fitted head decides, the random trunk barely moves it
        assert np.mean(out.scores.argmax(axis=1) == decide(x, archetype)[0]) >= 0.9
    if out.threat is not None:
        assert np.mean(np.abs(out.threat - threat(x))) < 0.06


def test_an_fp16_master_serves_the_cpu_as_its_fp32_and_int8_variants(
    models_dir: Path, tmp_path: Path
) -> None:
    from mltasks.models.variants import native, resolve, variant_path

    root = tmp_path / "m"
    shutil.copytree(models_dir / "tank", root / "tank")
    master = root / "tank" / "team_coordination_fp16.onnx"
    assert native(master) == "fp16"
    assert resolve(master, "fp16") == (master, "fp16")
    full, got = resolve(master, "fp32")
    assert (full, got) == (variant_path(master, "fp32"), "fp32")
    assert full.name == "team_coordination_fp16.fp32.onnx"
    model = load_model(full, "tank", "team_coordination", ["CPUExecutionProvider"])
    assert model.precision == "fp32"
    quant, got = resolve(root / "tank" / "soft_actor_critic_fp16.onnx", "int8")
    assert got == "int8" and quant.name == "soft_actor_critic_fp16.int8.onnx"
    verdict = json.loads(quant.with_name("soft_actor_critic_fp16.int8.verdict.json").read_text())
    assert next(iter(verdict["providers"].values()))["agreement"] >= 0.99
    # The variants are never taken for masters.
    from mltasks.models.check import check_dir

    assert {Path(r.file).name for r in check_dir(root)} == {
        p.name for p in (root / "tank").glob("*_fp16.onnx")
    }


def test_model_floor_answers_with_the_levels_fusion(
    config: Config, pg: psycopg.Connection[Any], models_dir: Path
) -> None:
    from mltasks.bench.floor import ModelFloor

    floor = ModelFloor(config.database.conninfo, level=3)
    stop = threading.Event()
    thread = threading.Thread(target=floor.run, args=(stop,))
    thread.start()
    try:
        rids = [
            game.insert(pg, ENCODER.state(a, hp=0.02, target_distance=0.05).tolist(), archetype=a)
            for a in ARCHETYPES
        ]
        wait_for(lambda: floor.answered >= len(rids), 30, "the model floor's answers")
    finally:
        stop.set()
        thread.join(10)
    rows = pg.execute(
        "SELECT action_id, model FROM ai_responses WHERE request_id = ANY(%s)", (rids,)
    ).fetchall()
    assert len(rows) == len(ARCHETYPES)
    types = {re.sub(r"@\w+", "", m.split("/", 1)[1]) for _, m in rows}  # versions aside
    assert types == {"combat_dqn+skill_dqn+threat_assessment"}
    assert {a for a, _ in rows} == {Action.FLEE}


def test_bench_models_reports_every_type_and_level(models_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "m"
    shutil.copytree(models_dir, root)
    out = tmp_path / "report"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mltasks.cli",
            "bench",
            "models",
            "--models-dir",
            str(root),
            "--batch",
            "1,8",
            "--threads",
            "1",
            "--repeats",
            "3",
            "--budget-s",
            "0.05",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    r = report["results"]
    assert set(r["types"]) == set(FAMILY)
    for model_type, row in r["types"].items():
        assert row["fp32"]["accepted"], model_type
        assert set(row["fp32"]["ms"]["1"]) == {"1", "8"}
    assert set(r["levels"]) == {"1", "2", "3"}
    assert r["levels"]["3"]["types"] == ["combat_dqn", "skill_dqn", "threat_assessment"]
    assert all(set(level["ms_mixed"]) == {"1", "8"} for level in r["levels"].values())
    assert r["memory"]["3"]["models"] == 18 and r["memory"]["1"]["models"] == 54
    assert r["gpu"] == "not measured: no GPU"
    text = (out / "report.md").read_text()
    assert "## Per level" in text and "six archetypes in turn" in text
