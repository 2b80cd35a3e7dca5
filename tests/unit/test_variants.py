"""Precision variants: building, verification against the master, caching, provider fallback.

Every test copies a few demo masters into its own tmp_path first, so the
session's models directory never receives variants or sidecars.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from mltasks.config import Config
from mltasks.contract import N_ACTIONS, STATE_DIM
from mltasks.fallback.ladder import PRECISIONS, Precision
from mltasks.models import timings
from mltasks.models import variants as v
from mltasks.models.engine import level_plan
from mltasks.state import sample_states

# Demo models whose int8 and fp16 variants agree with the master well above 99%
# (int8 >= 0.996 on the held-out set), so these tests do not hinge on the last
# rounding of one CPU's int8 kernels.
PICKS = ("aggressive/combat_dqn", "tank/movement_ppo")


@pytest.fixture
def masters(fp32_models_dir: Path, tmp_path: Path) -> list[Path]:
    out: list[Path] = []
    for name in PICKS:
        src = fp32_models_dir / f"{name}.onnx"
        dst = tmp_path / "models" / f"{name}.onnx"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        out.append(dst)
    return out


@pytest.fixture
def master(masters: list[Path]) -> Path:
    return masters[0]


def _fail(*args: object, **kwargs: object) -> Any:
    raise AssertionError("must not be called: the cached result should have been used")


def _permuted(master: Path, precision: Precision) -> bytes:
    """The master with its output columns rotated, labelled as a genuine variant of it."""
    model = onnx.load(str(master))
    for init in model.graph.initializer:
        if init.name in ("w2", "b2"):
            arr = np.roll(numpy_helper.to_array(init), 1, axis=-1)
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr), init.name))
    onnx.helper.set_model_props(
        model,
        {
            v.MASTER_SHA_KEY: v._sha256(master),
            v.RECIPE_KEY: v.RECIPES[precision],
        },
    )
    data: bytes = model.SerializeToString()
    return data


def _events(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == event]


# --------------------------------------------------------------------------- paths


def test_variant_paths_sit_beside_the_master(tmp_path: Path) -> None:
    master = tmp_path / "mage" / "combat_dqn.onnx"
    assert v.variant_path(master, "fp32") == master
    assert v.variant_path(master, "fp16") == tmp_path / "mage" / "combat_dqn.fp16.onnx"
    assert v.variant_path(master, "int8") == tmp_path / "mage" / "combat_dqn.int8.onnx"
    assert v.verdict_path(master, "int8").name == "combat_dqn.int8.verdict.json"
    with pytest.raises(ValueError, match="unknown precision"):
        v.variant_path(master, "bf16")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- building


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_built_variant_keeps_fp32_io_and_agrees(master: Path, precision: Precision) -> None:
    path = v.build_variant(master, precision)
    assert path == v.variant_path(master, precision) and path.is_file()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "temp file left"

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    (out,) = session.get_outputs()
    assert inp.type == "tensor(float)" and out.type == "tensor(float)"
    states = sample_states(np.random.default_rng(3), 5)
    logits = session.run(None, {inp.name: states})[0]
    assert logits.dtype == np.float32 and logits.shape == (5, N_ACTIONS)

    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props[v.MASTER_SHA_KEY] == v._sha256(master)
    assert props[v.RECIPE_KEY] == v.RECIPES[precision]
    assert v.agreement(master, path, v.heldout_states()) >= v.AGREEMENT_THRESHOLD


def test_fp16_variant_stores_half_weights(master: Path) -> None:
    model = onnx.load(str(v.build_variant(master, "fp16")))
    kinds = {init.data_type for init in model.graph.initializer}
    assert kinds == {onnx.TensorProto.FLOAT16}


def test_int8_variant_is_quantised(master: Path) -> None:
    model = onnx.load(str(v.build_variant(master, "int8")))
    ops = {n.op_type for n in model.graph.node}
    assert "MatMulInteger" in ops and "Gemm" not in ops


def test_agreement_of_a_model_with_itself_is_one(master: Path) -> None:
    assert v.agreement(master, master, v.heldout_states()) == 1.0
    with pytest.raises(ValueError, match="states must be"):
        v.agreement(master, master, np.zeros((3, STATE_DIM - 1), np.float32))


def test_heldout_states_are_fixed_and_read_only() -> None:
    states = v.heldout_states()
    assert states.shape == (v.HELDOUT_SIZE, STATE_DIM) and states.dtype == np.float32
    assert not states.flags.writeable
    fresh = sample_states(np.random.default_rng(v.HELDOUT_SEED), v.HELDOUT_SIZE)
    np.testing.assert_array_equal(states, fresh)


# --------------------------------------------------------------------------- resolve


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_resolve_accepts_a_good_variant(master: Path, precision: Precision) -> None:
    path, served = v.resolve(master, precision)
    assert (path, served) == (v.variant_path(master, precision), precision)
    doc = json.loads(v.verdict_path(master, precision).read_text())
    verdict = doc["providers"]["CPUExecutionProvider"]
    assert verdict["accepted"] is True
    assert verdict["agreement"] >= v.AGREEMENT_THRESHOLD
    assert verdict["states"] == v.HELDOUT_SIZE
    assert verdict["master_sha256"] == v._sha256(master)
    assert verdict["variant_sha256"] == v._sha256(path)


def test_resolve_fp32_is_the_master_and_touches_nothing(master: Path) -> None:
    before = sorted(master.parent.iterdir())
    assert v.resolve(master, "fp32") == (master, "fp32")
    assert sorted(master.parent.iterdir()) == before


def test_second_resolve_neither_rebuilds_nor_reverifies(
    master: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = v.resolve(master, "int8")
    variant, sidecar = v.variant_path(master, "int8"), v.verdict_path(master, "int8")
    stamps = (variant.stat().st_mtime_ns, sidecar.stat().st_mtime_ns)

    monkeypatch.setattr(v, "build_variant", _fail)
    monkeypatch.setattr(v, "agreement", _fail)
    assert v.resolve(master, "int8") == first
    assert (variant.stat().st_mtime_ns, sidecar.stat().st_mtime_ns) == stamps


def test_touched_master_with_same_bytes_is_not_rebuilt(
    master: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    v.resolve(master, "int8")
    variant = v.variant_path(master, "int8")
    stamp = variant.stat().st_mtime_ns
    later = stamp + 10_000_000_000  # the master now looks 10 s newer than its variant
    os.utime(master, ns=(later, later))

    monkeypatch.setattr(v, "build_variant", _fail)
    monkeypatch.setattr(v, "agreement", _fail)
    assert v.resolve(master, "int8") == (variant, "int8")
    assert variant.stat().st_mtime_ns == stamp


def test_changed_master_is_rebuilt_even_when_older(master: Path, tmp_path: Path) -> None:
    from mltasks.models.demo import write_demo_models

    (other,) = [
        p
        for p in write_demo_models(
            tmp_path / "retrained", seed=1, archetypes=["aggressive"], precision="fp32"
        )
        if p.name == master.name
    ]
    v.resolve(master, "int8")
    variant = v.variant_path(master, "int8")
    old_variant = variant.read_bytes()

    # New bytes, but an mtime in the past (as cp -p or a tar extraction would leave).
    shutil.copyfile(other, master)
    past = variant.stat().st_mtime_ns - 3_600_000_000_000
    os.utime(master, ns=(past, past))

    assert v.resolve(master, "int8") == (variant, "int8")
    assert variant.read_bytes() != old_variant
    props = {p.key: p.value for p in onnx.load(str(variant)).metadata_props}
    assert props[v.MASTER_SHA_KEY] == v._sha256(other)


def test_unreadable_variant_is_rebuilt(master: Path) -> None:
    variant = v.variant_path(master, "fp16")
    variant.write_bytes(b"\x00truncated")
    assert v.resolve(master, "fp16") == (variant, "fp16")
    onnx.checker.check_model(onnx.load(str(variant)))


def test_broken_variant_is_rejected_and_the_master_serves(
    master: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert v.resolve(master, "int8")[1] == "int8"  # a genuine variant and its verdict exist
    variant = v.variant_path(master, "int8")
    broken = _permuted(master, "int8")
    variant.write_bytes(broken)  # same master hash and recipe: it will not be rebuilt

    with caplog.at_level(logging.WARNING, logger="mltasks.models.variants"):
        assert v.resolve(master, "int8") == (master, "fp32")
    assert variant.read_bytes() == broken, "the broken variant should have been kept, not rebuilt"
    (record,) = _events(caplog, "variant_rejected")
    fields = vars(record)
    assert fields["precision"] == "int8" and fields["model"] == str(master)
    assert fields["provider"] == "CPUExecutionProvider"
    assert fields["agreement"] < v.AGREEMENT_THRESHOLD
    verdict = json.loads(v.verdict_path(master, "int8").read_text())["providers"]
    assert verdict["CPUExecutionProvider"]["accepted"] is False

    # The rejection is cached too, and still logged on every resolve.
    caplog.clear()
    monkeypatch.setattr(v, "agreement", _fail)
    with caplog.at_level(logging.WARNING, logger="mltasks.models.variants"):
        assert v.resolve(master, "int8") == (master, "fp32")
    assert len(_events(caplog, "variant_rejected")) == 1


def test_variant_that_cannot_run_is_rejected(
    master: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A variant with the wrong input width loads but fails verification: the master serves."""
    model = onnx.load(str(master))
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = STATE_DIM + 1
    onnx.helper.set_model_props(
        model, {v.MASTER_SHA_KEY: v._sha256(master), v.RECIPE_KEY: v.RECIPES["fp16"]}
    )
    v.variant_path(master, "fp16").write_bytes(model.SerializeToString())
    with caplog.at_level(logging.WARNING, logger="mltasks.models.variants"):
        assert v.resolve(master, "fp16") == (master, "fp32")
    (record,) = _events(caplog, "variant_rejected")
    assert vars(record)["reason"].startswith("verification failed")


def test_different_states_are_verified_again(master: Path) -> None:
    v.resolve(master, "fp16")
    other = sample_states(np.random.default_rng(99), 300)
    assert v.resolve(master, "fp16", states=other) == (v.variant_path(master, "fp16"), "fp16")
    verdict = json.loads(v.verdict_path(master, "fp16").read_text())["providers"]
    assert verdict["CPUExecutionProvider"]["states"] == 300


# --------------------------------------------------------------------------- providers


def test_levels_pair_providers_and_precisions() -> None:
    fb = Config().fallback
    assert [fb.level_profile(n) for n in (1, 2, 3)] == [
        ("cuda", "fp16"),
        ("tensorrt", "int8"),
        ("cpu", "int8"),
    ]


def test_gpu_requests_fall_back_to_cpu_here() -> None:
    """This host (and CI) has no GPU: every level must land cleanly on the CPU."""
    assert v.providers_for("CUDAExecutionProvider") == ["CPUExecutionProvider"]
    assert v.providers_for("TensorrtExecutionProvider") == ["CPUExecutionProvider"]
    assert v.providers_for("CPUExecutionProvider") == ["CPUExecutionProvider"]
    for number in (1, 2, 3):  # a GPU level on the CPU takes the CPU level's precision
        assert level_plan(Config(), number) == (["CPUExecutionProvider"], "int8")
    with pytest.raises(ValueError, match="unknown execution provider"):
        v.providers_for("ROCMExecutionProvider")


def test_gpu_level_resolve_verifies_on_the_cpu(master: Path) -> None:
    path, served = v.resolve(master, "fp16", "CUDAExecutionProvider")
    assert (path, served) == (v.variant_path(master, "fp16"), "fp16")
    verdicts = json.loads(v.verdict_path(master, "fp16").read_text())["providers"]
    assert list(verdicts) == ["CPUExecutionProvider"]


@pytest.mark.parametrize(
    ("available", "gpus", "requested", "expected"),
    [
        (["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], 1,
         "TensorrtExecutionProvider",
         ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]),
        (["CUDAExecutionProvider", "CPUExecutionProvider"], 1,
         "TensorrtExecutionProvider", ["CUDAExecutionProvider", "CPUExecutionProvider"]),
        (["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], 1,
         "CUDAExecutionProvider", ["CUDAExecutionProvider", "CPUExecutionProvider"]),
        # onnxruntime-gpu installed, but no driver or device: still the CPU.
        (["CUDAExecutionProvider", "CPUExecutionProvider"], 0,
         "CUDAExecutionProvider", ["CPUExecutionProvider"]),
    ],
)  # fmt: skip
def test_gpu_providers_need_both_the_build_and_a_device(
    monkeypatch: pytest.MonkeyPatch,
    available: list[str],
    gpus: int,
    requested: str,
    expected: list[str],
) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(available))
    monkeypatch.setattr(v, "gpu_count", lambda: gpus)
    chain = v.providers_for(requested, device_id=1)
    assert [p if isinstance(p, str) else p[0] for p in chain] == expected
    assert all(p[1] == {"device_id": 1} for p in chain if not isinstance(p, str))


def test_plan_keeps_the_gpu_precision_when_the_gpu_is_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(v, "gpu_count", lambda: 1)
    chain, precision = level_plan(Config(), 1)
    assert chain[0] == ("CUDAExecutionProvider", {"device_id": 0}) and precision == "fp16"
    assert level_plan(Config(), 2)[1] == "int8"


# --------------------------------------------------------------------------- benchmark


def test_time_precisions_reports_every_cell(masters: list[Path]) -> None:
    models = masters[0].parent.parent
    result = timings.time_precisions(models, batch_sizes=(1, 8), repeats=3, warmup=1)
    assert result["models"] == len(masters) and result["batch_sizes"] == [1, 8]
    for precision in PRECISIONS:
        for batch in (1, 8):
            assert result["median_us"][precision][batch] > 0
    assert result["ratio_to_fp32"]["fp32"] == {1: 1.0, 8: 1.0}
    assert timings.fastest_precision(result, 8) in PRECISIONS
    with pytest.raises(ValueError, match="not measured"):
        timings.fastest_precision(result, 64)


def test_time_precisions_needs_models(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        timings.time_precisions(tmp_path)


def test_time_precisions_takes_the_exporters_fp16_masters(models_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "m"
    shutil.copytree(models_dir / "mage", root / "mage")
    result = timings.time_precisions(root, batch_sizes=(1,), repeats=2, warmup=1)
    assert result["models"] == 5  # the state-input types of one archetype
    assert all(result["median_us"][p][1] > 0 for p in PRECISIONS)


def test_a_deployed_fp16_version_gets_its_int8_variant(models_dir: Path, tmp_path: Path) -> None:
    """A stored version (``<type>.versions/<version>_fp16.onnx``) is verified as the model
    it is: fed float16, and served as the level's int8 variant, not as the FP16 master."""
    stored = tmp_path / "aggressive" / "combat_dqn.versions" / "0123456789ab_fp16.onnx"
    stored.parent.mkdir(parents=True)
    shutil.copy2(models_dir / "aggressive" / "combat_dqn_fp16.onnx", stored)
    path, precision = v.resolve(stored, "int8")
    assert (path.name, precision) == ("0123456789ab_fp16.int8.onnx", "int8")
    verdict = json.loads(v.verdict_path(stored, "int8").read_text())
    assert verdict["providers"][v.CPU]["accepted"] is True
