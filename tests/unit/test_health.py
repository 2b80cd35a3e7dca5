"""Health probes: real readings on this GPU-less host, every assess() rule, OOM recognition."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pynvml
import pytest
from onnx import TensorProto, helper
from onnxruntime.capi.onnxruntime_pybind11_state import Fail as OrtFail
from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException as OrtRuntimeException

from mltasks.errors import ModelError
from mltasks.fallback import probes as health
from mltasks.fallback.probes import Readings, Thresholds, assess, is_oom_error, read_probes

GIB = 1 << 30


def make(**overrides: object) -> Readings:
    """Readings of a healthy GPU host, with some fields replaced."""
    base = Readings(
        gpu_present=True,
        vram_used_bytes=4 * GIB,
        vram_total_bytes=16 * GIB,
        cpu_load_per_core=0.5,
        ram_used_fraction=0.4,
        queue_lag_s=0.01,
        taken_at=1_700_000_000.0,
        gpu_status="ok",
    )
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


@pytest.fixture
def fresh_nvml(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A private NVML state, so a simulated GPU does not leak into other tests."""
    monkeypatch.setattr(health, "_nvml", health._Nvml())
    yield


# --------------------------------------------------------------------------- probes


def test_read_probes_without_a_gpu() -> None:
    before = time.time()
    r = read_probes(queue_lag_s=0.02)
    assert r.gpu_present is False and r.gpu_status == health.NO_GPU
    assert r.vram_used_bytes is None and r.vram_total_bytes is None
    assert r.vram_used_fraction is None
    assert r.cpu_load_per_core >= 0.0
    assert 0.0 < r.ram_used_fraction < 1.0
    assert r.queue_lag_s == 0.02
    assert before <= r.taken_at <= time.time()
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.gpu_present = True  # type: ignore[misc]


def test_cpu_percent_is_non_blocking_and_bounded() -> None:
    read_probes()  # primes psutil's baseline if nothing did yet
    r = read_probes()
    assert r.cpu_percent is not None and 0.0 <= r.cpu_percent <= 100.0


def test_read_probes_is_fast() -> None:
    read_probes()
    samples = []
    for _ in range(200):
        t0 = time.perf_counter()
        read_probes(queue_lag_s=0.0)
        samples.append(time.perf_counter() - t0)
    assert statistics.median(samples) < 0.005, f"median {statistics.median(samples) * 1e3:.2f} ms"


def test_read_probes_with_a_simulated_gpu(
    fresh_nvml: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: calls.append("init"))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 2)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: f"gpu{i}")
    monkeypatch.setattr(
        pynvml,
        "nvmlDeviceGetMemoryInfo",
        lambda h: SimpleNamespace(used=15 * GIB if h == "gpu1" else GIB, total=16 * GIB),
    )
    r = read_probes(device_id=1)
    assert r.gpu_present and r.gpu_status == "ok"
    assert (r.vram_used_bytes, r.vram_total_bytes) == (15 * GIB, 16 * GIB)
    assert r.vram_used_fraction == pytest.approx(15 / 16)
    read_probes(device_id=0)
    assert calls == ["init"], "NVML is initialised once per process, not per reading"
    assert read_probes(device_id=2).gpu_present is False  # no such device


def test_nvml_errors_never_escape(fresh_nvml: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 1)

    def lost(index: int) -> object:
        raise RuntimeError("GPU is lost")

    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lost)
    r = read_probes()
    assert r.gpu_present is False and "GPU is lost" in r.gpu_status

    def unsupported(handle: object) -> object:
        raise RuntimeError("Not Supported")

    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: "gpu0")
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", unsupported)
    monkeypatch.setattr(health._nvml, "next_try", 0.0)  # skip the re-init back-off
    r = read_probes()
    assert r.gpu_present is True and r.vram_used_bytes is None
    assert r.gpu_status.startswith("VRAM unknown")


# --------------------------------------------------------------------------- assess


def test_all_tiers_healthy() -> None:
    verdict = assess(make(), Thresholds())
    assert [t.tier for t in verdict.tiers] == list(health.TIERS)
    assert all(t.healthy and t.reason is None for t in verdict.tiers)
    assert verdict.best == "gpu_fp16"


def test_missing_gpu_takes_out_both_gpu_tiers() -> None:
    verdict = assess(make(gpu_present=False, vram_used_bytes=None, vram_total_bytes=None,
                          gpu_status=health.NO_GPU))  # fmt: skip
    for tier in ("gpu_fp16", "gpu_int8"):
        assert not verdict.healthy(tier)
        assert verdict.reason(tier) == "GPU missing (no GPU)"
    assert verdict.healthy("cpu") and verdict.best == "cpu"


def test_vram_above_limit_takes_out_only_fp16() -> None:
    verdict = assess(make(vram_used_bytes=int(0.96 * 16 * GIB)))
    assert not verdict.healthy("gpu_fp16")
    assert "VRAM 96.0% above 95%" in (verdict.reason("gpu_fp16") or "")
    assert verdict.healthy("gpu_int8") and verdict.best == "gpu_int8"


def test_vram_at_the_limit_is_still_healthy() -> None:
    assert assess(make(vram_used_bytes=95, vram_total_bytes=100)).healthy("gpu_fp16")


def test_unknown_vram_does_not_gate_fp16() -> None:
    verdict = assess(make(vram_used_bytes=None, vram_total_bytes=None, gpu_status="VRAM unknown"))
    assert verdict.healthy("gpu_fp16")


def test_cpu_load_above_limit_takes_out_the_cpu_tier() -> None:
    verdict = assess(make(cpu_load_per_core=2.5))
    assert not verdict.healthy("cpu")
    assert verdict.reason("cpu") == "load 2.50/core above 2"
    assert verdict.healthy("gpu_fp16") and verdict.healthy("gpu_int8")


def test_queue_lag_above_limit_takes_out_the_cpu_tier() -> None:
    verdict = assess(make(queue_lag_s=0.08))
    assert verdict.reason("cpu") == "queue lag 80 ms above 50 ms"
    assert assess(make(queue_lag_s=None)).healthy("cpu")
    assert assess(make(queue_lag_s=0.05)).healthy("cpu")


def test_ram_above_limit_takes_out_the_cpu_tier() -> None:
    assert "RAM 98.0%" in (assess(make(ram_used_fraction=0.98)).reason("cpu") or "")


def test_non_finite_readings_fail_safe() -> None:
    assert not assess(make(cpu_load_per_core=float("nan"))).healthy("cpu")
    assert not assess(make(queue_lag_s=float("inf"))).healthy("cpu")


def test_every_reason_is_reported_and_nothing_may_serve() -> None:
    verdict = assess(
        make(gpu_present=False, cpu_load_per_core=9.0, queue_lag_s=1.0),
        Thresholds(),
    )
    assert verdict.best is None
    assert verdict["cpu"].reasons == ("load 9.00/core above 2", "queue lag 1000 ms above 50 ms")
    with pytest.raises(KeyError):
        verdict["gpu"]  # type: ignore[index]


def test_custom_thresholds() -> None:
    strict = Thresholds(vram_fraction=0.2, cpu_load_per_core=0.25, queue_lag_s=0.001)
    verdict = assess(make(), strict)
    assert not verdict.healthy("gpu_fp16") and not verdict.healthy("cpu")
    assert Thresholds.for_latency_budget(100).queue_lag_s == pytest.approx(0.05)
    assert Thresholds.for_latency_budget(400).queue_lag_s == pytest.approx(0.2)


def test_assess_on_real_readings_here() -> None:
    verdict = assess(read_probes())
    assert not verdict.healthy("gpu_fp16") and not verdict.healthy("gpu_int8")


# --------------------------------------------------------------------------- OOM


class RuntimeException(Exception):
    """Stands in for onnxruntime's pybind11 exception class of the same name."""


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeException(
            "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while"
            " running Gemm node. Status Message: BFCArena::AllocateRawInternal Available memory"
            " of 0 is smaller than requested bytes of 268435456"
        ),
        RuntimeError("Failed to allocate memory for requested buffer of size 1073741824"),
        RuntimeError("std::bad_alloc"),
        RuntimeError("bad allocation"),
        RuntimeError("CUDA failure 2: out of memory ; GPU=0 ; expr=cudaMalloc(&p, size);"),
        RuntimeError("CUBLAS failure 3: CUBLAS_STATUS_ALLOC_FAILED"),
        MemoryError(),
    ],
    ids=lambda e: type(e).__name__ + ":" + str(e)[:24],
)
def test_allocation_failures_are_recognised(exc: BaseException) -> None:
    assert is_oom_error(exc)


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("Got invalid dimensions for input: state"),
        RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Unexpected input data type"),
        ModelError("aggressive/combat_dqn: returned shape (2, 7) for 2 rows"),
        KeyboardInterrupt(),
    ],
)
def test_other_errors_are_not_oom(exc: BaseException) -> None:
    assert not is_oom_error(exc)


def test_wrapped_allocation_failure_is_recognised() -> None:
    try:
        try:
            raise RuntimeError("Failed to allocate memory for requested buffer")
        except RuntimeError as inner:
            raise ModelError("mage/combat_dqn: inference failed") from inner
    except ModelError as outer:
        assert is_oom_error(outer)
    try:
        try:
            raise MemoryError
        except MemoryError:
            raise ModelError("implicit context") from None
    except ModelError as outer:
        assert not is_oom_error(outer), "`from None` cuts the chain on purpose"


def test_cyclic_chain_terminates() -> None:
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__cause__, b.__cause__ = b, a
    assert not is_oom_error(a)


def test_real_onnxruntime_allocation_failure() -> None:
    """A genuine BFC arena failure from the CPU provider (2**60 floats: never allocatable)."""
    value = helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["shape"], ["out"], value=value)],
        "oom",
        [helper.make_tensor_value_info("shape", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    session = ort.InferenceSession(
        model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    try:
        session.run(None, {"shape": np.array([1 << 60], dtype=np.int64)})
    except (OrtFail, OrtRuntimeException) as exc:  # onnxruntime's own classes
        assert is_oom_error(exc), str(exc)
        wrapped = ModelError("oom/model: inference failed")
        wrapped.__cause__ = exc
        assert is_oom_error(wrapped)
    else:
        pytest.fail("onnxruntime allocated 2**62 bytes")
