"""Rule policy and the demo ONNX models distilled from it (pure: no database, no broker)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from mltasks.contract import ARCHETYPES, MODEL_TYPES, N_ACTIONS, STATE_DIM, Action
from mltasks.errors import ModelError
from mltasks.fallback.policy import PARAMS, decide, decide_history, logits, threat
from mltasks.models.demo import (
    sample_windows,
    write_corrupt_model,
    write_demo_models,
    write_misshaped_model,
)
from mltasks.models.family import FAMILY
from mltasks.models.loaded import LoadedModel, load_model
from mltasks.state import ENCODER, LAYOUT_NAMES, SEED, get_layout, sample_states

# --------------------------------------------------------------------------- helpers


def act(layout: str, archetype: str, **situation: object) -> Action:
    x = get_layout(layout).state(archetype, **situation)[None, :]
    actions, _ = decide(x, archetype, layout)
    return Action(int(actions[0]))


def conf(layout: str, archetype: str, **situation: object) -> float:
    x = get_layout(layout).state(archetype, **situation)[None, :]
    _, confidence = decide(x, archetype, layout)
    return float(confidence[0])


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- policy rules
# One test state per rule in each layout: (rule, archetype, {layout: situation}, action).
# A layout missing from a row cannot express that rule (see mltasks/state.py).

RULE_CASES: list[tuple[str, str, dict[str, dict[str, object]], Action]] = [
    (
        "stunned idles",
        "aggressive",
        {"seed": {"stunned": True, "hp": 0.05, "target_distance": 0.05}},
        Action.IDLE,
    ),
    (
        "low HP next to the target flees",
        "aggressive",
        {layout: {"hp": 0.1, "target_distance": 0.05} for layout in LAYOUT_NAMES},
        Action.FLEE,
    ),
    (
        "a tank fights on at the same HP",
        "tank",
        {layout: {"hp": 0.12, "target_distance": 0.05} for layout in LAYOUT_NAMES},
        Action.ATTACK,
    ),
    (
        "a support monster with a hurt pack heals",
        "support",
        {
            "seed": {
                "pack": 0.4,
                "pack_hp": 0.2,
                "skills_ready": 1.0,
                "sp": 0.5,
                "target_distance": 0.4,
            },
            # The encoder's pack HP is the monster's own: hurt, not yet fleeing.
            "encoder": {
                "pack": 0.3,
                "hp": 0.4,
                "skills_ready": 1.0,
                "sp": 0.5,
                "target_distance": 0.4,
            },
        },
        Action.SKILL_1,
    ),
    (
        "a tank taunts when its pack is hit",
        "tank",
        {
            "seed": {
                "pack": 0.4,
                "ally_under_attack": True,
                "skills_ready": 1.0,
                "sp": 0.5,
                "target_distance": 0.3,
            },
            "encoder": {
                "pack": 0.3,
                "hp": 0.8,
                "skills_ready": 1.0,
                "sp": 0.5,
                "target_distance": 0.3,
            },
        },
        Action.SKILL_3,
    ),
    (
        "no target: wanders",
        "defensive",
        {"seed": {"idle_time": 0.95}, "encoder": {"explores": True}},
        Action.MOVE_RANDOM,
    ),
    (
        "no target: idles",
        "defensive",
        {"seed": {"idle_time": 0.0}, "encoder": {"explores": False}},
        Action.IDLE,
    ),
    (
        "a much bigger threat: change target",
        "mage",
        {"seed": {"target_distance": 0.5, "target_threat": 0.1, "other_threat": 0.95}},
        Action.CHANGE_TARGET,
    ),
    (
        "a ranged monster keeps its distance",
        "ranged",
        {layout: {"target_distance": 0.1} for layout in LAYOUT_NAMES},
        Action.MOVE_AWAY,
    ),
    (
        "a mage casts in range",
        "mage",
        {
            layout: {"target_distance": 0.4, "skills_ready": 1.0, "sp": 0.6}
            for layout in LAYOUT_NAMES
        },
        Action.SKILL_2,
    ),
    (
        "a healthy aggressive monster next to its target attacks",
        "aggressive",
        {layout: {"hp": 1.0, "target_distance": 0.05} for layout in LAYOUT_NAMES},
        Action.ATTACK,
    ),
    (
        "a ranged monster attacks from range",
        "ranged",
        {layout: {"target_distance": 0.5} for layout in LAYOUT_NAMES},
        Action.ATTACK,
    ),
    (
        "a defensive monster holds beyond its chase limit",
        "defensive",
        {layout: {"target_distance": 0.7} for layout in LAYOUT_NAMES},
        Action.IDLE,
    ),
    (
        "out of range: moves closer",
        "aggressive",
        {layout: {"target_distance": 0.9} for layout in LAYOUT_NAMES},
        Action.MOVE_CLOSER,
    ),
]


@pytest.mark.parametrize(
    ("layout", "archetype", "situation", "expected"),
    [
        pytest.param(layout, archetype, by_layout[layout], expected, id=f"{layout}: {rule}")
        for rule, archetype, by_layout, expected in RULE_CASES
        for layout in LAYOUT_NAMES
        if layout in by_layout
    ],
)
def test_each_rule_in_each_layout(
    layout: str, archetype: str, situation: dict[str, object], expected: Action
) -> None:
    assert act(layout, archetype, **situation) is expected


def test_every_rule_has_a_case_in_the_encoder_layout_unless_it_cannot_exist() -> None:
    missing = {rule for rule, _, by_layout, _ in RULE_CASES if "encoder" not in by_layout}
    assert missing == {"stunned idles", "a much bigger threat: change target"}


def test_the_encoder_layout_by_its_indices() -> None:
    """CONTRACT.md 2b spelled out by index, as the C++ encoder fills it: HP at 0, enemies
    in view at 30, the target's distance at 31 (1.0 without one), its HP at 34."""
    hurt = np.zeros(STATE_DIM, dtype=np.float32)
    hurt[[0, 10, 24, 45]] = 0.1
    hurt[[42, 55]] = 0.9
    hurt[1], hurt[9], hurt[29], hurt[63] = 0.5, 0.75, 0.5, 0.5
    hurt[16], hurt[30], hurt[31], hurt[34], hurt[35] = 0.05, 0.1, 0.05, 0.8, 1.0
    healthy = hurt.copy()
    healthy[[0, 10, 24, 45, 49]] = 1.0
    healthy[[42, 55]] = 0.0
    alone = healthy.copy()
    alone[[16, 30, 32, 33, 34, 35, 36]] = 0.0
    alone[31] = 1.0
    actions, _ = decide(np.stack([hurt, healthy, alone]), "aggressive", "encoder")
    assert [Action(int(a)) for a in actions][:2] == [Action.FLEE, Action.ATTACK]
    assert Action(int(actions[2])) not in (Action.FLEE, Action.ATTACK)
    # Read through the seed's table, index 11 (0 in the encoder) is "an enemy adjacent":
    # the monster alone fights a ghost. What the encoder layout fixes.
    ghost = Action(int(decide(alone[None], "aggressive", "seed")[0][0]))
    assert ghost in (Action.ATTACK, Action.FLEE)


def test_defensive_flees_early_aggressive_late() -> None:
    for layout in LAYOUT_NAMES:
        engaged = {"hp": 0.25, "target_distance": 0.05}
        assert act(layout, "defensive", **engaged) is Action.FLEE
        assert act(layout, "aggressive", **engaged) is Action.ATTACK


def test_no_flight_without_a_target() -> None:
    assert act("seed", "defensive", hp=0.1, idle_time=0.0) is Action.IDLE
    assert act("encoder", "defensive", hp=0.1) is Action.IDLE


def test_heal_needs_skill_sp_and_a_hurt_pack() -> None:
    heal = {"pack": 0.4, "pack_hp": 0.2, "skills_ready": 1.0, "sp": 0.5, "target_distance": 0.4}
    assert act("seed", "support", **heal) is Action.SKILL_1
    assert act("seed", "support", **{**heal, "skills_ready": 0.0}) is not Action.SKILL_1
    assert act("seed", "support", **{**heal, "sp": 0.1}) is not Action.SKILL_1
    assert act("seed", "support", **{**heal, "pack_hp": 0.9}) is not Action.SKILL_1
    assert act("seed", "aggressive", **heal) is not Action.SKILL_1  # only support heals
    enc = {"pack": 0.3, "hp": 0.4, "skills_ready": 1.0, "sp": 0.5, "target_distance": 0.4}
    assert act("encoder", "support", **enc) is Action.SKILL_1
    assert act("encoder", "support", **{**enc, "skills_ready": 0.25}) is not Action.SKILL_1
    assert act("encoder", "support", **{**enc, "pack": 0.0}) is not Action.SKILL_1
    assert act("encoder", "support", **{**enc, "hp": 0.9}) is not Action.SKILL_1


def test_layouts_refuse_features_they_do_not_have() -> None:
    with pytest.raises(ValueError, match="stunned"):
        ENCODER.state("tank", stunned=True)
    with pytest.raises(ValueError, match="explores"):
        SEED.state("tank", explores=True)
    with pytest.raises(ValueError, match="unknown state layout"):
        get_layout("csv")


def test_encoder_states_keep_the_encoders_couplings() -> None:
    x = sample_states(np.random.default_rng(8), 4000, "encoder", "mage")
    slots = ENCODER.slots
    for name in ("hp_again", "pack_hp", "hp_success"):
        np.testing.assert_array_equal(x[:, slots[name]], x[:, slots["hp"]])
    for name in ("damage_taken", "hp_urgency"):
        np.testing.assert_allclose(x[:, slots[name]], 1.0 - x[:, slots["hp"]], atol=1e-6)
    np.testing.assert_allclose(x[:, slots["sp_need"]], 1.0 - x[:, slots["sp"]], atol=1e-6)
    assert np.all(x[:, slots["role_confidence"]] == 0.75)
    assert np.all(x[:, slots["constant_29"]] == 0.5) and np.all(x[:, slots["constant_63"]] == 0.5)
    assert np.allclose(x[:, slots["archetype_id"]], 3 / 5)
    no_target = x[:, slots["target_distance"]] == 1.0
    assert 0.2 < no_target.mean() < 0.4
    for name in ("target_threat", "damage_received", "target_hp", "target_class"):
        assert np.all(x[no_target, slots[name]] == 0.0), name
    assert x.min() >= 0.0 and x.max() <= 1.0


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_confidence_tracks_the_margin(layout: str) -> None:
    # Deep below the flee threshold is surer than just below it.
    deep = conf(layout, "defensive", hp=0.05, target_distance=0.1)
    assert deep > conf(layout, "defensive", hp=0.34, target_distance=0.1)
    # Adjacent enemy: surer attack than one at the edge of the attack range.
    assert conf(layout, "ranged", target_distance=0.45) > conf(
        layout, "ranged", target_distance=0.64
    )


def test_stunned_is_certain() -> None:
    assert conf("seed", "tank", stunned=True) > 0.99


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
@pytest.mark.parametrize("archetype", ARCHETYPES)
def test_outputs_types_ranges_and_varying_confidence(layout: str, archetype: str) -> None:
    x = sample_states(np.random.default_rng(3), 3000, layout)
    actions, confidence = decide(x, archetype, layout)
    assert actions.dtype == np.int64 and actions.shape == (3000,)
    assert confidence.dtype == np.float32 and confidence.shape == (3000,)
    assert actions.min() >= 0 and actions.max() < N_ACTIONS
    assert np.all(confidence > 0.0) and np.all(confidence <= 1.0)
    assert np.all(confidence >= 0.5)
    assert len(np.unique(confidence)) > 100  # never a constant
    soft = logits(x, archetype, layout)
    assert soft.dtype == np.float32 and soft.shape == (3000, N_ACTIONS)
    np.testing.assert_array_equal(np.argmax(soft, axis=1), actions)


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
@pytest.mark.parametrize("archetype", ARCHETYPES)
def test_vectorised_equals_row_by_row(layout: str, archetype: str) -> None:
    x = sample_states(np.random.default_rng(4), 300, layout)
    actions, confidence = decide(x, archetype, layout)
    for i in range(len(x)):
        a, c = decide(x[i : i + 1], archetype, layout)
        assert a[0] == actions[i]
        assert c[0] == confidence[i]


_BASIC = {"IDLE", "ATTACK", "MOVE_CLOSER", "MOVE_RANDOM", "FLEE"}
_SKILLS = {
    "aggressive": set(),
    "defensive": set(),
    "support": {"MOVE_AWAY", "SKILL_1"},
    "mage": {"MOVE_AWAY", "SKILL_2"},
    "tank": {"SKILL_3"},
    "ranged": {"MOVE_AWAY"},
}


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_sampler_exercises_every_rule(layout: str) -> None:
    x = sample_states(np.random.default_rng(5), 5000, layout)
    assert x.dtype == np.float32 and x.shape == (5000, STATE_DIM)
    assert x.min() >= 0.0 and x.max() <= 1.0
    distance = get_layout(layout).slots["target_distance"]
    assert 0.15 < np.mean(x[:, distance] == 1.0) < 0.35  # mass at "no target"
    # The encoder sends no second threat: the rules never change target on it.
    switch = {"CHANGE_TARGET"} if layout == "seed" else set()
    for archetype in ARCHETYPES:
        actions, _ = decide(x, archetype, layout)
        seen = {Action(int(a)).name for a in np.unique(actions)}
        assert seen == _BASIC | _SKILLS[archetype] | switch, archetype


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
    calm = ENCODER.state()[None, :]
    with pytest.raises(ValueError, match="unknown archetype"):
        decide(calm, "necromancer")
    with pytest.raises(ValueError, match="unknown archetype"):
        logits(calm, "")


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


def _load(root: Path, archetype: str, model_type: str, suffix: str = "_fp16") -> LoadedModel:
    path = root / archetype / f"{model_type}{suffix}.onnx"
    return load_model(path, archetype, model_type, ["CPUExecutionProvider"])


def test_names_as_the_exporter_writes_them_and_no_leftover_temp_files(models_dir: Path) -> None:
    expected = {Path(a) / f"{m}_fp16.onnx" for a in ARCHETYPES for m in MODEL_TYPES}
    found = {p.relative_to(models_dir) for p in models_dir.rglob("*") if p.is_file()}
    assert found == expected


def test_every_model_has_its_types_real_signature_in_fp16(models_dir: Path) -> None:
    x = sample_states(np.random.default_rng(6), 37)
    for archetype in ARCHETYPES:
        for model_type in MODEL_TYPES:
            sess = session(models_dir / archetype / f"{model_type}_fp16.onnx")
            inputs = {i.name: i for i in sess.get_inputs()}
            outputs = {o.name: o for o in sess.get_outputs()}
            assert inputs["state"].type == "tensor(float16)"
            sig = FAMILY[model_type]
            assert set(outputs) == set(sig.outputs), model_type
            assert all(o.type == "tensor(float16)" for o in outputs.values())
            if sig.input == "sequence":
                assert inputs["state"].shape[1:] == [10, STATE_DIM]
            else:
                assert inputs["state"].shape[1:] == [STATE_DIM]
            if sig.input == "state_action":
                assert inputs["action"].shape[1:] == [N_ACTIONS]
            wide = (archetype, model_type) in {("mage", "combat_dqn"), ("ranged", "movement_ppo")}
            first = outputs[next(iter(sig.outputs))]
            if model_type not in ("threat_assessment", "soft_actor_critic"):
                assert first.shape[1] == (12 if wide else N_ACTIONS), (archetype, model_type)
            if model_type == "team_coordination":  # h_n, not a value
                assert outputs["value"].shape == [6, "batch_size", 256]
            out = _load(models_dir, archetype, model_type).run(x)
            assert out.finite().all()
            if out.scores is not None:
                assert out.scores.shape == (37, N_ACTIONS) and out.scores.dtype == np.float32


def test_models_of_an_archetype_differ(models_dir: Path) -> None:
    blobs = {(models_dir / "tank" / f"{m}_fp16.onnx").read_bytes() for m in MODEL_TYPES}
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
def test_every_acting_type_agrees_with_its_teacher(models_dir: Path, archetype: str) -> None:
    rng = np.random.default_rng(11)
    windows = sample_windows(ENCODER, rng, 2000, archetype)
    states = windows[:, -1]
    teacher, _ = decide(states, archetype)
    trend, _ = decide_history(windows, archetype)
    for model_type in MODEL_TYPES:
        model = _load(models_dir, archetype, model_type)
        out = model.run(states, windows)
        if out.scores is None:
            assert out.threat is not None
            assert np.mean(np.abs(out.threat - threat(states))) < 0.06
            continue
        expected = trend if model.sequence else teacher
        assert np.mean(out.scores.argmax(axis=1) == expected) >= 0.9, model_type


def test_a_sequence_model_answers_two_histories_of_one_state_differently(
    models_dir: Path,
) -> None:
    """HP steady at 30% next to the target: attack; HP falling from 90% to 30%: flee."""
    now = ENCODER.state("aggressive", hp=0.3, target_distance=0.05)
    earlier = ENCODER.with_hp(now[None], 0.9)[0]
    steady = np.stack([now] * 10)
    falling = np.stack([earlier + (now - earlier) * t / 9 for t in range(10)])
    windows = np.stack([steady, falling]).astype(np.float32)
    states = np.stack([now, now])
    for model_type in ("team_coordination", "temporal_transformer", "pattern_recognition"):
        out = _load(models_dir, "aggressive", model_type).run(states, windows)
        assert out.scores is not None
        assert [Action(int(a)) for a in out.scores.argmax(axis=1)] == [
            Action.ATTACK,
            Action.FLEE,
        ], model_type


def test_fp32_export_is_the_same_network(tmp_path: Path, models_dir: Path) -> None:
    write_demo_models(tmp_path, archetypes=["tank"], precision="fp32")
    x = sample_states(np.random.default_rng(2), 200, archetype="tank")
    for model_type in MODEL_TYPES:
        full = _load(tmp_path, "tank", model_type, suffix="")
        half = _load(models_dir, "tank", model_type)
        assert (full.precision, half.precision) == ("fp32", "fp16")
        a, b = full.run(x), half.run(x)
        if a.scores is not None and b.scores is not None:
            assert np.mean(a.scores.argmax(axis=1) == b.scores.argmax(axis=1)) > 0.97


def test_seed_layout_models_agree_with_the_seed_teacher(tmp_path: Path) -> None:
    write_demo_models(tmp_path, archetypes=["mage"], layout="seed")
    model = _load(tmp_path, "mage", "combat_dqn")
    x = sample_states(np.random.default_rng(1), 2000, "seed", "mage")
    out = model.run(x).scores
    assert out is not None
    assert np.mean(out.argmax(axis=1) == decide(x, "mage", "seed")[0]) >= 0.9
    # Fitted on the seed's table, it does not understand the encoder's.
    y = sample_states(np.random.default_rng(1), 2000, "encoder", "mage")
    out = model.run(y).scores
    assert out is not None
    assert np.mean(out.argmax(axis=1) == decide(y, "mage", "encoder")[0]) < 0.8


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_models_answer_the_three_situations(tmp_path: Path, layout: str) -> None:
    """FLEE at 10% HP next to the target, ATTACK at full HP, neither without a target."""
    write_demo_models(tmp_path, archetypes=["aggressive"], layout=layout)
    lay = get_layout(layout)
    x = np.stack(
        [
            lay.state("aggressive", hp=0.1, target_distance=0.05),
            lay.state("aggressive", hp=1.0, target_distance=0.05),
            lay.state("aggressive", hp=1.0),
        ]
    )
    for model_type in MODEL_TYPES:
        out = _load(tmp_path, "aggressive", model_type).run(x).scores
        if out is None:
            continue
        got = [Action(int(a)) for a in np.argmax(out, axis=1)]
        assert got[:2] == [Action.FLEE, Action.ATTACK], model_type
        assert got[2] not in (Action.FLEE, Action.ATTACK), model_type


def test_corrupt_model_fails_to_load(tmp_path: Path) -> None:
    path = tmp_path / "mage" / "combat_dqn.onnx"
    write_corrupt_model(path)
    assert path.stat().st_size > 0
    with pytest.raises(ModelError, match="cannot load"):
        load_model(path, "mage", "combat_dqn", ["CPUExecutionProvider"])


def test_misshaped_model_loads_in_onnxruntime_with_seven_outputs(tmp_path: Path) -> None:
    path = tmp_path / "mage" / "combat_dqn.onnx"
    write_misshaped_model(path)
    sess = session(path)
    assert sess.get_outputs()[0].shape[1] == 7
    (y,) = sess.run(None, {"state": np.zeros((5, STATE_DIM), dtype=np.float32)})
    assert y.shape == (5, 7)


def test_docs_state_table_matches_the_layouts() -> None:
    """docs/state.md's slot table is what mltasks/state.py says, row for row."""
    import re

    text = (Path(__file__).resolve().parents[2] / "docs" / "state.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| (\d+|-) \| (\d+|-) \|$", text, re.M)
    documented = {name: (enc, seed) for name, enc, seed in rows}
    expected = {
        name: (str(ENCODER.slots.get(name, "-")), str(SEED.slots.get(name, "-")))
        for name in {*ENCODER.slots, *SEED.slots}
    }
    assert documented == expected
