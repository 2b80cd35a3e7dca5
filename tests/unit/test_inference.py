"""Pure units: validation, the softmax choice, grouping, and the engine's model checks."""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import numpy as np
import pytest

from mltasks.config import Config
from mltasks.errors import ModelError
from mltasks.models.engine import Engine
from mltasks.models.loaded import TypeOutput, load_model
from mltasks.models.plain import candidates
from mltasks.models.variants import CPU
from mltasks.serving.inference import (
    answer_batch,
    answer_rows,
    as_confidence,
    softmax_choice,
)
from mltasks.serving.records import Row
from mltasks.serving.validation import validate, validate_rows
from tests.game import array_send

GOOD = [0.5] * 64


def test_validate_accepts_64_finite_floats_of_a_known_archetype() -> None:
    checked = validate([1, "mage", 1002, GOOD])
    assert not isinstance(checked, str)
    archetype, vec = checked
    assert archetype == "mage" and vec.dtype == np.float32 and vec.shape == (64,)


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ([1, None, 1, GOOD], "archetype_null"),
        ([1, "Mage", 1, GOOD], "archetype_unknown"),
        ([1, "../x", 1, GOOD], "archetype_unknown"),
        ([1, "mage", 1, None], "state_null"),
        ([1, "mage", 1, "0.5,0.5"], "state_not_array"),
        ([1, "mage", 1, [0.5] * 63], "state_length_63"),
        ([1, "mage", 1, [[0.5] * 32, [0.5] * 32]], "state_length_2"),
        ([1, "mage", 1, [None] + [0.5] * 63], "state_element_null"),
        ([1, "mage", 1, [float("nan")] + [0.5] * 63], "state_not_finite"),
        ([1, "mage", 1, [float("-inf")] + [0.5] * 63], "state_not_finite"),
        ([1, "mage", 1, [1e300] + [0.5] * 63], "state_not_finite"),
        ([1, "mage", 1, [True] + [0.5] * 63], "state_not_numeric"),
    ],
)
def test_validate_names_what_is_wrong(row: list[object], reason: str) -> None:
    assert validate(row) == reason


def test_the_bridges_bytes_decode_to_the_same_state_as_a_list() -> None:
    state = [float(np.float32(i / 7 - 4)) for i in range(64)]
    rows = [
        Row(1, "mage", 1, array_send(state)),
        Row(2, "tank", 1, state),
        Row(3, "mage", 1, array_send(GOOD)),
    ]
    checked = validate_rows(rows)
    assert [c[0] for c in checked] == ["mage", "tank", "mage"]
    assert checked[0][1].tolist() == checked[1][1].tolist() == state  # type: ignore[union-attr]
    assert checked[0][1].dtype == np.float32  # type: ignore[union-attr]
    assert checked[2][1].tolist() == GOOD  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        (array_send([None] + [0.5] * 63), "state_element_null"),
        (array_send([0.5] * 63), "state_length_63"),
        (array_send([0.5] * 64, dims=(8, 8)), "state_not_array"),
        (array_send([0.5] * 64, oid=701), "state_not_array"),  # float8: not what the table holds
        (array_send([float("nan")] + [0.5] * 63), "state_not_finite"),
        (array_send([float("inf")] + [0.5] * 63), "state_not_finite"),
        (array_send(GOOD)[:-4] + b"\xff" * 4, "state_not_finite"),  # a NaN's bits
        (
            array_send(GOOD).replace(struct.pack(">i", 4), struct.pack(">i", 5), 2),
            "state_not_array",
        ),
        (b"\x00" * 532, "state_not_array"),
        (b"\x00" * 3, "state_not_array"),
        (b"", "state_not_array"),
    ],
)
def test_bytes_that_are_no_usable_state_are_named(state: bytes, reason: str) -> None:
    # A hostile message may carry any bytes: a reason each, and the good row still answered.
    checked = validate_rows([Row(1, "mage", 1, state), Row(2, "mage", 1, array_send(GOOD))])
    assert checked[0] == reason
    assert not isinstance(checked[1], str)


def test_confidence_is_the_softmax_probability_of_the_chosen_action() -> None:
    logits = np.array([[0.0] * 9 + [5.0], [1.0, 2.0] + [0.0] * 8], dtype=np.float32)
    actions, probs = softmax_choice(logits)
    assert actions.tolist() == [9, 1]
    e = np.exp(logits.astype(np.float64))
    expected = e.max(axis=1) / e.sum(axis=1)
    assert probs == pytest.approx(expected)
    assert probs[0] != probs[1]


@pytest.mark.parametrize(
    ("p", "want"), [(0.87654, 0.8765), (1.2, 1.0), (-0.1, 0.0), (float("nan"), 0.0), (1e-9, 0.0)]
)
def test_confidence_always_parses_as_a_float_in_range(p: float, want: float) -> None:
    assert as_confidence(p) == want


class FakeModel:
    """Stands in for a loaded model: a fixed output, or a failure, or scores from the state."""

    def __init__(
        self, out: np.ndarray | None = None, fail: bool = False, model_type: str = "fake"
    ) -> None:
        self.out, self.fail, self.model_type = out, fail, model_type
        self.name, self.source = f"x/{model_type}", "model"
        self.sequence = self.cacheable = False
        self.scores_kind = "logits"
        self.packed_width = 10

    def unpack(self, packed: np.ndarray) -> TypeOutput:
        return TypeOutput(scores=packed)

    def run(self, states: np.ndarray, windows: np.ndarray | None = None) -> TypeOutput:
        if self.fail:
            raise ModelError("fake: wrong number of rows")
        if self.out is not None:
            return TypeOutput(scores=self.out)
        z = np.zeros((len(states), 10), dtype=np.float32)
        z[:, 2] = states[:, 0] * 10
        return TypeOutput(scores=z)


class FakeEngine:
    def __init__(self, models: dict[str, list[FakeModel]]) -> None:
        self.models = models

    def fusion(self, archetype: str) -> list[tuple[FakeModel, float]]:
        return [(m, 1.0) for m in self.models.get(archetype, [])]


def test_one_bad_group_or_row_never_fails_the_others() -> None:
    nan_out = np.full((1, 10), np.nan, dtype=np.float32)
    engine = FakeEngine(
        {
            "mage": [FakeModel()],
            "tank": [FakeModel(fail=True)],
            "support": [FakeModel(out=nan_out)],
        }
    )
    rows = [
        [1, "mage", 1, GOOD],
        [2, "tank", 1, GOOD],
        [3, "ranged", 1, GOOD],
        [4, "mage", 1, None],
        [5, "support", 1, GOOD],
        [6, "mage", 1, [0.9] + [0.5] * 63],
    ]
    got = {a.request_id: a for a in answer_rows(rows, engine)}  # type: ignore[arg-type]
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    assert (got[1].action_id, got[1].source, got[1].status) == (2, "model", "completed")
    assert got[1].model == "mage/fake"
    assert (got[2].action_id, got[2].reason) == (255, "model_error")
    assert (got[3].action_id, got[3].reason) == (255, "no_model")
    assert (got[4].action_id, got[4].reason, got[4].status) == (255, "state_null", "invalid")
    assert (got[5].action_id, got[5].reason) == (255, "model_output_not_finite")
    assert got[6].confidence > got[1].confidence  # larger logit gap, higher confidence


def test_a_failing_member_drops_out_and_the_others_answer() -> None:
    ones = np.zeros((1, 10), dtype=np.float32)
    ones[0, 7] = 5.0
    engine = FakeEngine(
        {"mage": [FakeModel(fail=True, model_type="a"), FakeModel(out=ones, model_type="b")]}
    )
    outcome = answer_batch([[1, "mage", 1, GOOD]], engine)  # type: ignore[arg-type]
    (answer,) = outcome.answers
    assert (answer.action_id, answer.model) == (7, "mage/b")
    assert len(outcome.failures) == 1  # the ladder still hears of it


def test_archetype_never_reaches_a_path_unchecked() -> None:
    with pytest.raises(ModelError):
        candidates(Path("/m"), "../../etc", "combat_dqn")
    assert candidates(Path("/m"), "tank", "skill_dqn") == [
        Path("/m/tank/skill_dqn.onnx"),
        Path("/m/tank/skill_dqn_fp16.onnx"),
    ]


def test_engine_skips_corrupt_and_misshaped_files_and_loads_the_rest(
    all_models_cfg: Config,
) -> None:
    cfg = all_models_cfg
    from mltasks.models.demo import write_corrupt_model, write_misshaped_model

    write_corrupt_model(cfg.models.dir / "tank" / "combat_dqn_fp16.onnx")
    (cfg.models.dir / "mage" / "skill_dqn_fp16.onnx").unlink()
    write_misshaped_model(cfg.models.dir / "mage" / "skill_dqn.onnx")
    (cfg.models.dir / "ranged" / "spatial_vit_fp16.onnx").unlink()
    engine = Engine(cfg).load()
    assert len(engine.models) == 51
    assert set(engine.skipped) == {"tank/combat_dqn", "mage/skill_dqn", "ranged/spatial_vit"}
    assert engine.skipped["ranged/spatial_vit"] == "missing"
    assert "cannot load" in engine.skipped["tank/combat_dqn"]
    assert "'output' has shape [2, 7]" in engine.skipped["mage/skill_dqn"]
    assert "combat_dqn" not in {m.model_type for m, _ in engine.fusion("tank")}
    assert engine.fusion("mage")
    with pytest.raises(ModelError, match="shape"):
        load_model(cfg.models.dir / "mage" / "skill_dqn.onnx", "mage", "skill_dqn", [CPU])


def test_engine_on_cpu_when_no_gpu(all_models_cfg: Config) -> None:
    cfg = all_models_cfg
    from mltasks.hardware import cuda_usable, gpu_count

    assert gpu_count() == 0  # this host has no NVIDIA device; NVML absence is handled
    assert not cuda_usable(cfg.hardware)
    forced = dataclasses.replace(cfg, hardware=dataclasses.replace(cfg.hardware, device="cuda"))
    engine = Engine(forced, level=1).load()
    model = engine.models[("tank", "combat_dqn")]
    assert model.session.get_providers() == ["CPUExecutionProvider"]


def test_archetypes_answered_together_get_what_each_gets_alone() -> None:
    """Archetypes whose members line up are answered as one group (`_voices_alike`): a
    failing member, a non-finite row and each archetype's own models stay its own."""
    rng = np.random.default_rng(3)

    class Scaled(FakeModel):
        def __init__(self, scale: float, model_type: str, **kw: object) -> None:
            super().__init__(model_type=model_type, **kw)  # type: ignore[arg-type]
            self.scale = scale
            self.nan_column = 10 if model_type == "a" else 11

        def run(self, states: np.ndarray, windows: np.ndarray | None = None) -> TypeOutput:
            if self.fail:
                raise ModelError("fake: broken")
            z = (states[:, :10] * self.scale).astype(np.float32)
            z[states[:, self.nan_column] > 0.95] = np.nan  # some rows come back non-finite
            return TypeOutput(scores=z)

    engine = FakeEngine(
        {
            "mage": [Scaled(3.0, "a"), Scaled(-2.0, "b")],
            "tank": [Scaled(1.0, "a", fail=True), Scaled(5.0, "b")],
            "support": [Scaled(-4.0, "a"), Scaled(0.5, "b")],
        }
    )
    rows = [
        [i + 1, ["mage", "tank", "support"][i % 3], 1, rng.random(64).tolist()] for i in range(30)
    ]
    for r in rows:
        r[3][10] = r[3][11] = 0.1
    rows[6][3][10] = 0.99  # mage: a gives NaN, b alone answers
    rows[9][3][10] = rows[9][3][11] = 0.99  # mage: neither can
    together = answer_batch(rows, engine)  # type: ignore[arg-type]
    alone = [
        a
        for archetype in ("mage", "tank", "support")
        for a in answer_batch([r for r in rows if r[1] == archetype], engine).answers  # type: ignore[arg-type]
    ]
    assert sorted(together.answers, key=lambda a: a.request_id) == sorted(
        alone, key=lambda a: a.request_id
    )
    got = {a.request_id: a for a in together.answers}
    assert {got[i].model for i in (1, 4)} == {"mage/a+b"}
    assert {got[i].model for i in (2, 5) if got[i].action_id != 255} <= {"tank/b"}
    assert got[7].model == "mage/b"
    assert (got[10].action_id, got[10].reason) == (255, "model_output_not_finite")
    assert len(together.failures) == 1  # tank/a, once
