"""Precision variants (fp16, int8) of the fp32 master models, built once and verified.

Beside each master ``<dir>/<archetype>/<model_type>.onnx`` this module caches
``<model_type>.fp16.onnx`` and ``<model_type>.int8.onnx``.  Both keep float32
inputs and outputs, so the engine feeds them exactly like the master.

A variant only serves after its argmax agrees with the master's on at least
``AGREEMENT_THRESHOLD`` of a fixed held-out set of states: a cheaper model that
picks other actions is a behaviour change, not an optimisation.  The verdict is
cached in a sidecar (``<model_type>.<precision>.verdict.json``) keyed by the
content hashes of master and variant, the execution provider, the onnxruntime
version and the states, so a worker start re-verifies nothing when nothing
changed, and anything that did change is checked again.

Why the content hash decides staleness rather than mtimes alone: deploys that
copy with preserved times (``cp -p``, ``rsync -t``, tar) can replace a master
with an older mtime, and rewriting identical bytes (``write_demo_models``) must
not trigger 108 rebuilds.  The master's sha256 is stored in the variant's
``metadata_props``; a variant is rebuilt when it is missing, unreadable, or
records another master hash.

int8 uses dynamic quantisation with **QInt8 weights, per output channel**
(activations are always uint8 in ORT's dynamic mode, so this is the U8S8 form).
Both QInt8 and QUInt8 run on the CPU provider for these graphs (Gemm ->
MatMulInteger); U8S8 is ORT's default and the form MLAS has its fastest x86
(AVX2/AVX-512 VNNI) and Arm kernels for.  Its known weakness, saturation in
VPMADDUBSW on AVX2 without VNNI, would show as a failed agreement check, and
the master would serve.  Per-channel scales matter here: with one scale per
tensor 21 of the 54 demo models fell below 99% agreement, per channel 1 does.
The remaining error comes from quantising the input state itself (uint8 steps
of 1/255 against the policy's sharp thresholds).

Which precision each model level asks for is the configuration's
(``fallback.level1..3``; the ladder, `mltasks.fallback.ladder`, holds the
defaults: FP16 on CUDA, INT8 on TensorRT, INT8 on the CPU) and `resolve` turns it
into a file: the variant when accepted, else the master.  So level 3 runs the
INT8 variant of every model that agrees, and the master (FP32, or an exporter's
FP16) of any that does not.  ``providers_for`` only hands out GPU providers when
onnxruntime has them and NVML sees a device, and otherwise degrades to the CPU.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from onnx import TensorProto, numpy_helper

from mltasks.contract import ARCHETYPES, MODEL_TYPES, STATE_DIM
from mltasks.fallback.ladder import PRECISIONS, Precision
from mltasks.files import write_atomic
from mltasks.hardware import gpu_count
from mltasks.state import sample_states

log = logging.getLogger(__name__)

ProviderSpec = str | tuple[str, dict[str, object]]

CPU: Final = "CPUExecutionProvider"
CUDA: Final = "CUDAExecutionProvider"
TENSORRT: Final = "TensorrtExecutionProvider"

AGREEMENT_THRESHOLD: Final = 0.99
HELDOUT_SEED: Final = 7919
"""Not a seed the demo models were trained on (those draw from ``[seed, archetype]``)."""
HELDOUT_SIZE: Final = 2000

MASTER_SHA_KEY: Final = "mltasks.master_sha256"
RECIPE_KEY: Final = "mltasks.variant_recipe"
RECIPES: Final[dict[str, str]] = {
    "fp16": "onnxconverter_common.float16 keep_io_types/1",
    "int8": "ort.quantize_dynamic QInt8 per_channel/1",
    "fp32": "fp16 weights and I/O widened to fp32/1",
}
"""How each variant is made; a variant recording another recipe is rebuilt."""
_VERDICT_VERSION: Final = 1

FloatArray = npt.NDArray[np.float32]


# --------------------------------------------------------------------------- providers


def _gpu_usable(provider: str) -> bool:
    return provider in ort.get_available_providers() and gpu_count() > 0


def providers_for(level_provider: str, device_id: int = 0) -> list[ProviderSpec]:
    """ONNX Runtime providers for a level's provider, degraded to what this host has.

    GPU providers are returned only when onnxruntime was built with them *and*
    NVML sees a device: onnxruntime-gpu installed on a host without a driver
    lists CUDA yet fails at session creation.  The CPU provider always closes
    the list, so nodes a GPU provider cannot take still run.
    """
    if level_provider == CPU:
        return [CPU]
    if level_provider not in (CUDA, TENSORRT):
        raise ValueError(f"unknown execution provider {level_provider!r}")
    chain: list[ProviderSpec] = []
    if level_provider == TENSORRT and _gpu_usable(TENSORRT):
        chain.append((TENSORRT, {"device_id": device_id}))
    if _gpu_usable(CUDA):
        chain.append((CUDA, {"device_id": device_id}))
    if not chain:
        log.info(
            "%s unavailable on this host: using the CPU",
            level_provider,
            extra={"event": "provider_fallback", "requested": level_provider, "provider": CPU},
        )
    chain.append(CPU)
    return chain


def _provider_name(spec: ProviderSpec) -> str:
    return spec if isinstance(spec, str) else spec[0]


# --------------------------------------------------------------------------- files


def native(master: Path) -> Precision:
    """The precision a master is in: an exporter's ``<type>_fp16.onnx`` is FP16."""
    return "fp16" if Path(master).name.endswith("_fp16.onnx") else "fp32"


def variant_path(master: Path, precision: Precision) -> Path:
    """``<dir>/<stem>.<precision>.onnx``; the master's own precision is the master itself."""
    master = Path(master)
    _check_precision(precision)
    if precision == native(master):
        return master
    return master.with_name(f"{master.stem}.{precision}.onnx")


def verdict_path(master: Path, precision: Precision) -> Path:
    """The sidecar holding agreement verdicts for one variant, per provider."""
    master = Path(master)
    return master.with_name(f"{master.stem}.{precision}.verdict.json")


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(master: Path) -> Iterator[None]:
    """Serialise builders of one master across processes (flock on the master itself).

    Without it every worker of a fresh host would quantise and verify the same
    108 variants at once; the atomic writes would keep the result correct, the
    lock just saves the duplicate work.  Locking the master avoids lock files.
    """
    with master.open("rb") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """Keep onnxruntime.quantization's ``logging.warning(...)`` calls from configuring logging.

    Module-level ``logging`` functions call ``basicConfig()`` when the root logger
    has no handler, which would leave a stray stderr handler in this process.
    """
    root = logging.getLogger()
    guard = logging.NullHandler() if not root.handlers else None
    if guard is not None:
        root.addHandler(guard)
    try:
        yield
    finally:
        if guard is not None:
            root.removeHandler(guard)


# --------------------------------------------------------------------------- building


def _recorded(variant: Path) -> dict[str, str]:
    """The variant's metadata_props; empty when it is missing, truncated or not ONNX."""
    try:
        model = onnx.load(str(variant), load_external_data=False)
    except Exception:
        return {}
    return {str(p.key): str(p.value) for p in model.metadata_props}


def _to_fp16(master: Path) -> Any:
    from onnxconverter_common import float16  # type: ignore[import-untyped]

    model = onnx.load(str(master))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = float16.convert_float_to_float16(model, keep_io_types=True)
    for w in caught:  # out-of-range weights are clamped: worth knowing, not fatal
        log.warning(
            "fp16 conversion of %s: %s",
            master,
            w.message,
            extra={"event": "fp16_clamped", "model": str(master)},
        )
    return converted


def _to_fp32(master: Path) -> Any:
    """An FP16 export widened to FP32: weights, constants, casts and I/O. The CPU runs FP32
    natively; on FP16 it inserts a cast around every operator it has no FP16 kernel for."""
    half, full = TensorProto.FLOAT16, TensorProto.FLOAT
    model = onnx.load(str(master))
    graph = model.graph
    for init in graph.initializer:
        if init.data_type == half:
            init.CopyFrom(
                numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name)
            )
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.tensor_type.elem_type == half:
            value.type.tensor_type.elem_type = full
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == half:
                attr.i = full
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == half:
                arr = numpy_helper.to_array(attr.t).astype(np.float32)
                attr.t.CopyFrom(numpy_helper.from_array(arr, attr.t.name))
    return model


def _to_int8(master: Path) -> Any:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="mltasks-int8-") as tmp, _quiet_root_logger():
        pre = Path(tmp) / "pre.onnx"
        out = Path(tmp) / "int8.onnx"
        src = Path(tmp) / "src.onnx"
        source = onnx.load(str(master)) if native(master) == "fp32" else _to_fp32(master)
        onnx.save(source, str(src))
        # Symbolic shape inference would need sympy and gains nothing on these graphs. Paths
        # inside the temporary folder: a ModelProto would be written out with its tensors as
        # external data, which onnx then refuses to read back.
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        # The ModelProto form: given a path, quantize_dynamic writes a temporary
        # "-inferred" copy beside the input, i.e. into the live models directory.
        quantize_dynamic(
            onnx.load(str(pre)), str(out), weight_type=QuantType.QInt8, per_channel=True
        )
        return onnx.load(str(out))


def build_variant(master: Path, precision: Precision) -> Path:
    """Build (unconditionally) the ``precision`` variant of ``master``; returns its path."""
    master = Path(master)
    _check_precision(precision)
    if precision == native(master):
        return master
    master_sha = _sha256(master)
    build = {"fp16": _to_fp16, "fp32": _to_fp32, "int8": _to_int8}[precision]
    model = build(master)
    props = {p.key: p.value for p in model.metadata_props}
    props.update({MASTER_SHA_KEY: master_sha, RECIPE_KEY: RECIPES[precision]})
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    onnx.checker.check_model(model)
    target = variant_path(master, precision)
    write_atomic(target, model.SerializeToString(deterministic=True))
    log.info(
        "built %s variant of %s",
        precision,
        master,
        extra={"event": "variant_built", "model": str(master), "precision": precision},
    )
    return target


def ensure_variant(master: Path, precision: Precision, master_sha: str | None = None) -> Path:
    """The variant's path, building it first when missing, or made from other master
    bytes or by another recipe."""
    master = Path(master)
    target = variant_path(master, precision)
    if precision == native(master):
        return target
    props = _recorded(target)
    want = {MASTER_SHA_KEY: master_sha or _sha256(master), RECIPE_KEY: RECIPES[precision]}
    if any(props.get(k) != v for k, v in want.items()):
        return build_variant(master, precision)
    return target


# --------------------------------------------------------------------------- verifying


@lru_cache(maxsize=1)
def heldout_states() -> FloatArray:
    """The fixed verification states (read-only: shared by every caller)."""
    states = sample_states(np.random.default_rng(HELDOUT_SEED), HELDOUT_SIZE)
    states.setflags(write=False)
    return states


def _session(path: Path, providers: Sequence[ProviderSpec], threads: int = 1) -> Any:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))


def _run(session: Any, states: FloatArray) -> npt.NDArray[np.float32]:
    name = session.get_inputs()[0].name
    out = np.asarray(session.run(None, {name: states})[0])
    if out.dtype != np.float32:
        raise ValueError(f"output dtype {out.dtype}, expected float32")
    return out


def agreement(
    master_path: Path,
    variant_path: Path,
    states: FloatArray,
    providers: Sequence[ProviderSpec] = (CPU,),
) -> float:
    """Fraction of ``states`` on which the variant's argmax equals the master's.

    Raises when the variant cannot load or breaks the I/O contract (float32
    [N, 10] from float32 [N, 64]); ``resolve`` treats that as a rejection.
    """
    x = np.ascontiguousarray(states, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != STATE_DIM or x.shape[0] == 0:
        raise ValueError(f"states must be [N>0, {STATE_DIM}], got {x.shape}")
    named = _model_of(Path(master_path))
    if named is None:  # a file outside the family's names: one [N, 64] input, output 0
        ref = _run(_session(Path(master_path), providers), x)
        got = _run(_session(Path(variant_path), providers), x)
    else:
        ref = _family_output(Path(master_path), *named, x, providers)
        got = _family_output(Path(variant_path), *named, x, providers)
    if got.shape != ref.shape:
        raise ValueError(f"variant output shape {got.shape}, master {ref.shape}")
    if ref.shape[1] == 1:  # a threat score: agreement within 0.05
        return float(np.mean(np.abs(ref - got) < 0.05))
    return float(np.mean(np.argmax(ref, axis=1) == np.argmax(got, axis=1)))


def _model_of(master: Path) -> tuple[str, str] | None:
    """(archetype, type) of ``<archetype>/<type>.onnx`` or of a deployed version,
    ``<archetype>/<type>.versions/<version>.onnx`` (else a deployed FP16 export was fed
    float32, failed its check and served unconverted); None for other paths."""
    folder, stem = master.parent.name, master.name.removesuffix(".onnx").removesuffix("_fp16")
    if folder.endswith(".versions"):
        folder, stem = master.parent.parent.name, folder.removesuffix(".versions")
    return (folder, stem) if folder in ARCHETYPES and stem in MODEL_TYPES else None


def _family_output(
    path: Path,
    archetype: str,
    model_type: str,
    states: FloatArray,
    providers: Sequence[ProviderSpec],
) -> npt.NDArray[np.float32]:
    """The model's action scores (or threat column), fed as the service feeds it."""
    from mltasks.models.loaded import load_model

    out = load_model(path, archetype, model_type, providers).run(states)
    scores = out.scores if out.scores is not None else out.threat
    if scores is None:
        raise ValueError(f"{path}: no scores and no threat to compare")
    return scores if scores.ndim == 2 else scores[:, None]


def _read_verdicts(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) and doc.get("version") == _VERDICT_VERSION else {}


def _reject(
    master: Path, precision: Precision, provider: str, score: float | None, reason: str
) -> None:
    log.warning(
        "%s variant of %s rejected (%s): serving the master",
        precision,
        master,
        reason,
        extra={
            "event": "variant_rejected",
            "model": str(master),
            "precision": precision,
            "provider": provider,
            "agreement": score,
            "threshold": AGREEMENT_THRESHOLD,
            "reason": reason,
        },
    )


def resolve(
    master: Path,
    precision: Precision,
    provider: str = CPU,
    *,
    states: FloatArray | None = None,
) -> tuple[Path, Precision]:
    """The file to load for ``master`` at ``precision`` on ``provider``, and its precision.

    Builds the variant when needed, verifies it on the provider it will serve on
    (fp16 numerics differ between CPU and CUDA), caches the verdict, and returns
    the variant when accepted, else the master with a ``variant_rejected`` log
    line.  Never raises for a bad variant: the master always remains servable.
    """
    master = Path(master)
    _check_precision(precision)
    if precision == native(master):
        return master, precision
    chain = providers_for(provider)
    ep = _provider_name(chain[0])
    x = heldout_states() if states is None else np.ascontiguousarray(states, dtype=np.float32)
    states_sha = hashlib.sha256(x.tobytes()).hexdigest()
    sidecar = verdict_path(master, precision)

    with _locked(master):
        master_sha = _sha256(master)
        try:
            variant = ensure_variant(master, precision, master_sha)
        except Exception as exc:
            _reject(master, precision, ep, None, f"build failed: {exc}")
            return master, native(master)
        key = {
            "master_sha256": master_sha,
            "variant_sha256": _sha256(variant),
            "onnxruntime": ort.__version__,
            "states_sha256": states_sha,
            "threshold": AGREEMENT_THRESHOLD,
        }
        doc = _read_verdicts(sidecar)
        verdict = doc.get("providers", {}).get(ep)
        cached = isinstance(verdict, dict) and all(verdict.get(k) == v for k, v in key.items())
        if not cached:
            reason = ""
            try:
                score: float | None = agreement(master, variant, x, chain)
            except Exception as exc:
                score, reason = None, f"verification failed: {exc}"
            accepted = score is not None and score >= AGREEMENT_THRESHOLD
            if score is not None and not accepted:
                reason = f"agreement {score:.4f} < {AGREEMENT_THRESHOLD}"
            verdict = {
                **key,
                "agreement": score,
                "accepted": accepted,
                "reason": reason,
                "states": int(x.shape[0]),
                "checked_at": time.time(),
            }
            providers = doc.get("providers", {}) if doc else {}
            providers[ep] = verdict
            body = {"version": _VERDICT_VERSION, "precision": precision, "providers": providers}
            write_atomic(sidecar, (json.dumps(body, indent=1, sort_keys=True) + "\n").encode())

    assert isinstance(verdict, dict)
    if verdict.get("accepted") is True:
        return variant, precision
    _reject(master, precision, ep, verdict.get("agreement"), str(verdict.get("reason")))
    return master, native(master)
