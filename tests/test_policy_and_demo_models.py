"""Rule policy and the demo ONNX models distilled from it (pure: no database, no broker)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from mltasks.contract import ARCHETYPES, MODEL_TYPES, N_ACTIONS, STATE_DIM, Action, Idx
from mltasks.demo_models import (
    sample_states,
    teacher_agreement,
    write_corrupt_model,
    write_demo_models,
    write_misshaped_model,
)
from mltasks.policy import PARAMS, decide, logits

# --------------------------------------------------------------------------- helpers


def state(**slots: float) -> np.ndarray:
    """A calm state (full HP/SP, nobody around, nothing ready) with the named slots overridden."""
    x = np.zeros((1, STATE_DIM), dtype=np.float32)
    x[0, Idx.HP] = 1.0
    x[0, Idx.SP] = 1.0
    x[0, Idx.ENEMY_DIST] = 1.0
    x[0, Idx.ALLY_MIN_HP] = 1.0
    for name, value in slots.items():
        x[0, getattr(Idx, name)] = value
    return x


def act(archetype: str, **slots: float) -> Action:
    actions, _ = decide(state(**slots), archetype)
    return Action(int(actions[0]))


def conf(archetype: str, **slots: float) -> float:
    _, confidence = decide(state(**slots), archetype)
    return float(confidence[0])


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- policy rules


@pytest.mark.parametrize("archetype", ARCHETYPES)
def test_stunned_idles_whatever_else_holds(archetype: str) -> None:
    assert act(archetype, STUNNED=1.0, HP=0.05, ENEMY_DIST=0.05) is Action.IDLE


def test_defensive_flees_early_aggressive_late() -> None:
    hurt_and_engaged = {"HP": 0.2, "ENEMY_DIST": 0.05, "ENEMY_THREAT": 0.5}
    assert act("defensive", **hurt_and_engaged) is Action.FLEE
    assert act("aggressive", **hurt_and_engaged) is Action.ATTACK
    assert act("aggressive", **{**hurt_and_engaged, "HP": 0.1}) is Action.FLEE


def test_no_flight_without_an_enemy_in_sight() -> None:
    assert act("defensive", HP=0.1, ENEMY_DIST=1.0, IDLE_TIME=0.0) is Action.IDLE


def test_support_heals_weak_ally_when_skill_and_sp_allow() -> None:
    heal = {"ALLY_MIN_HP": 0.2, "SKILL_1_READY": 1.0, "SP": 0.5, "ENEMY_DIST": 0.4}
    assert act("support", **heal) is Action.SKILL_1
    assert act("support", **{**heal, "SKILL_1_READY": 0.0}) is not Action.SKILL_1
    assert act("support", **{**heal, "SP": 0.1}) is not Action.SKILL_1
    assert act("support", **{**heal, "ALLY_MIN_HP": 0.9}) is not Action.SKILL_1
    assert act("aggressive", **heal) is not Action.SKILL_1  # only support heals


def test_support_keeps_out_of_melee_and_holds_far_away() -> None:
    assert act("support", ENEMY_DIST=0.1) is Action.MOVE_AWAY
    assert act("support", ENEMY_DIST=0.3) is Action.ATTACK
    assert act("support", ENEMY_DIST=0.5) is Action.MOVE_CLOSER
    assert act("support", ENEMY_DIST=0.8) is Action.IDLE


def test_mage_casts_in_range_backs_off_when_close() -> None:
    cast = {"ENEMY_DIST": 0.4, "SKILL_2_READY": 1.0, "SP": 0.6}
    assert act("mage", **cast) is Action.SKILL_2
    assert act("mage", **{**cast, "SP": 0.1}) is Action.ATTACK
    assert act("mage", **{**cast, "ENEMY_DIST": 0.6, "SP": 0.1}) is Action.MOVE_CLOSER
    assert act("mage", **{**cast, "ENEMY_DIST": 0.1}) is Action.MOVE_AWAY
    assert act("mage", **{**cast, "ENEMY_DIST": 0.9}) is Action.MOVE_CLOSER


def test_tank_taunts_when_ally_under_attack() -> None:
    taunt = {"ALLY_UNDER_ATTACK": 1.0, "SKILL_3_READY": 1.0, "SP": 0.5, "ENEMY_DIST": 0.3}
    assert act("tank", **taunt) is Action.SKILL_3
    assert act("tank", **{**taunt, "ALLY_UNDER_ATTACK": 0.0}) is Action.MOVE_CLOSER
    assert act("tank", **{**taunt, "SKILL_3_READY": 0.0}) is Action.MOVE_CLOSER
    assert act("defensive", **taunt) is not Action.SKILL_3


def test_ranged_kites() -> None:
    assert act("ranged", ENEMY_DIST=0.1) is Action.MOVE_AWAY
    assert act("ranged", ENEMY_DIST=0.5) is Action.ATTACK
    assert act("ranged", ENEMY_DIST=0.8) is Action.MOVE_CLOSER


def test_melee_archetypes_close_in_then_attack_defensive_holds() -> None:
    assert act("aggressive", ENEMY_DIST=0.9) is Action.MOVE_CLOSER
    assert act("aggressive", ENEMY_DIST=0.05) is Action.ATTACK
    assert act("aggressive", ENEMY_DIST=0.05, SKILL_2_READY=1.0, SP=0.8) is Action.SKILL_2
    assert act("defensive", ENEMY_DIST=0.3) is Action.MOVE_CLOSER
    assert act("defensive", ENEMY_DIST=0.7) is Action.IDLE


@pytest.mark.parametrize("archetype", ARCHETYPES)
def test_change_target_only_for_a_much_bigger_threat(archetype: str) -> None:
    base = {"ENEMY_DIST": 0.5, "ENEMY_THREAT": 0.1}
    assert act(archetype, **base, SECOND_THREAT=0.95) is Action.CHANGE_TARGET
    assert act(archetype, **base, SECOND_THREAT=0.15) is not Action.CHANGE_TARGET


@pytest.mark.parametrize("archetype", ARCHETYPES)
def test_no_enemy_idles_then_wanders(archetype: str) -> None:
    assert act(archetype, ENEMY_DIST=1.0, IDLE_TIME=0.0) is Action.IDLE
    assert act(archetype, ENEMY_DIST=1.0, IDLE_TIME=0.95) is Action.MOVE_RANDOM


def test_confidence_tracks_the_margin() -> None:
    # Deep below the flee threshold is surer than just below it.
    assert conf("defensive", HP=0.05, ENEMY_DIST=0.1) > conf("defensive", HP=0.34, ENEMY_DIST=0.1)
    # Adjacent enemy: surer attack than one at the edge of the attack range.
    assert conf("ranged", ENEMY_DIST=0.45) > conf("ranged", ENEMY_DIST=0.64)
    # Stunned is certain.
    assert conf("tank", STUNNED=1.0) > 0.99


@pytest.mark.parametrize("archetype", ARCHETYPES)
def test_outputs_types_ranges_and_varying_confidence(archetype: str) -> None:
    x = sample_states(np.random.default_rng(3), 3000)
    actions, confidence = decide(x, archetype)
    assert actions.dtype == np.int64 and actions.shape == (3000,)
    assert confidence.dtype == np.float32 and confidence.shape == (3000,)
    assert actions.min() >= 0 and actions.max() < N_ACTIONS
    assert np.all(confidence > 0.0) and np.all(confidence <= 1.0)
    assert np.all(confidence >= 0.5)
    assert len(np.unique(confidence)) > 100  # never a constant
    soft = logits(x, archetype)
    assert soft.dtype == np.float32 and soft.shape == (3000, N_ACTIONS)
    np.testing.assert_array_equal(np.argmax(soft, axis=1), actions)


@pytest.mark.parametrize("archetype", ARCHETYPES)
def test_vectorised_equals_row_by_row(archetype: str) -> None:
    x = sample_states(np.random.default_rng(4), 300)
    actions, confidence = decide(x, archetype)
    for i in range(len(x)):
        a, c = decide(x[i : i + 1], archetype)
        assert a[0] == actions[i]
        assert c[0] == confidence[i]


def test_sampler_exercises_every_rule() -> None:
    x = sample_states(np.random.default_rng(5), 5000)
    assert x.dtype == np.float32 and x.shape == (5000, STATE_DIM)
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert 0.15 < np.mean(x[:, Idx.ENEMY_DIST] == 1.0) < 0.35  # mass at "nobody in sight"
    expected = {
        "aggressive": {
            "IDLE",
            "ATTACK",
            "MOVE_CLOSER",
            "MOVE_RANDOM",
            "SKILL_2",
            "CHANGE_TARGET",
            "FLEE",
        },
        "defensive": {"IDLE", "ATTACK", "MOVE_CLOSER", "MOVE_RANDOM", "CHANGE_TARGET", "FLEE"},
        "support": {
            "IDLE",
            "ATTACK",
            "MOVE_CLOSER",
            "MOVE_AWAY",
            "MOVE_RANDOM",
            "SKILL_1",
            "CHANGE_TARGET",
            "FLEE",
        },
        "mage": {
            "IDLE",
            "ATTACK",
            "MOVE_CLOSER",
            "MOVE_AWAY",
            "MOVE_RANDOM",
            "SKILL_2",
            "CHANGE_TARGET",
            "FLEE",
        },
        "tank": {
            "IDLE",
            "ATTACK",
            "MOVE_CLOSER",
            "MOVE_RANDOM",
            "SKILL_3",
            "CHANGE_TARGET",
            "FLEE",
        },
        "ranged": {
            "IDLE",
            "ATTACK",
            "MOVE_CLOSER",
            "MOVE_AWAY",
            "MOVE_RANDOM",
            "CHANGE_TARGET",
            "FLEE",
        },
    }
    seen_any: set[str] = set()
    for archetype in ARCHETYPES:
        actions, _ = decide(x, archetype)
        seen = {Action(int(a)).name for a in np.unique(actions)}
        assert seen == expected[archetype], archetype
        seen_any |= seen
    assert seen_any == {a.name for a in Action if a is not Action.TRADITIONAL_AI}


def test_every_archetype_has_parameters() -> None:
    assert set(PARAMS) == set(ARCHETYPES)


@pytest.mark.parametrize(
    "bad",
    [np.zeros(STATE_DIM), np.zeros((3, STATE_DIM - 1)), np.zeros((2, 3, STATE_DIM))],
    ids=["1d", "63-wide", "3d"],
)
def test_wrong_shape_raises(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        decide(bad, "tank")
    with pytest.raises(ValueError):
        logits(bad, "tank")


def test_unknown_archetype_raises() -> None:
    with pytest.raises(ValueError, match="unknown archetype"):
        decide(state(), "necromancer")
    with pytest.raises(ValueError, match="unknown archetype"):
        logits(state(), "")


def test_empty_batch() -> None:
    actions, confidence = decide(np.zeros((0, STATE_DIM), dtype=np.float32), "mage")
    assert actions.shape == (0,) and confidence.shape == (0,)


# --------------------------------------------------------------------------- demo models


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    paths = write_demo_models(root, seed=0)
    assert len(paths) == len(ARCHETYPES) * len(MODEL_TYPES) == 54
    return root


def test_layout_and_no_leftover_temp_files(models_dir: Path) -> None:
    expected = {Path(a) / f"{m}.onnx" for a in ARCHETYPES for m in MODEL_TYPES}
    found = {p.relative_to(models_dir) for p in models_dir.rglob("*") if p.is_file()}
    assert found == expected


def test_every_model_runs_in_onnxruntime(models_dir: Path) -> None:
    x = sample_states(np.random.default_rng(6), 37)
    for archetype in ARCHETYPES:
        for model_type in MODEL_TYPES:
            sess = session(models_dir / archetype / f"{model_type}.onnx")
            (inp,) = sess.get_inputs()
            (out,) = sess.get_outputs()
            assert inp.name == "state" and inp.type == "tensor(float)"
            assert inp.shape[1] == STATE_DIM and not isinstance(inp.shape[0], int)
            assert out.name == "logits" and out.shape[1] == N_ACTIONS
            for n in (1, 37):
                (y,) = sess.run(None, {"state": x[:n]})
                assert y.shape == (n, N_ACTIONS) and y.dtype == np.float32
                assert np.all(np.isfinite(y))


def test_models_of_an_archetype_differ(models_dir: Path) -> None:
    blobs = {(models_dir / "tank" / f"{m}.onnx").read_bytes() for m in MODEL_TYPES}
    assert len(blobs) == len(MODEL_TYPES)


def test_same_seed_same_bytes_other_seed_other_bytes(models_dir: Path, tmp_path: Path) -> None:
    again = write_demo_models(tmp_path / "again", seed=0, archetypes=["support"])
    other = write_demo_models(tmp_path / "other", seed=1, archetypes=["support"])
    for a, b in zip(again, other, strict=True):
        original = (models_dir / "support" / a.name).read_bytes()
        assert a.read_bytes() == original
        assert b.read_bytes() != original


def test_unknown_archetype_subset_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_demo_models(tmp_path, archetypes=["necromancer"])


@pytest.mark.parametrize("archetype", ARCHETYPES)
def test_combat_dqn_agrees_with_teacher(models_dir: Path, archetype: str) -> None:
    assert teacher_agreement(models_dir / archetype / "combat_dqn.onnx", archetype) >= 0.9


def test_corrupt_model_fails_to_load(tmp_path: Path) -> None:
    path = tmp_path / "mage" / "combat_dqn.onnx"
    write_corrupt_model(path)
    assert path.stat().st_size > 0
    with pytest.raises(Exception):  # noqa: B017 - onnxruntime raises its own error types
        session(path)


def test_misshaped_model_loads_with_seven_outputs(tmp_path: Path) -> None:
    path = tmp_path / "mage" / "combat_dqn.onnx"
    write_misshaped_model(path)
    sess = session(path)
    assert sess.get_outputs()[0].shape[1] == 7
    (y,) = sess.run(None, {"state": np.zeros((5, STATE_DIM), dtype=np.float32)})
    assert y.shape == (5, 7)
