"""Demo ONNX models distilled from the rule policy, built without torch.

Every archetype x model type gets a small MLP (64 -> hidden -> ReLU -> 10
logits) fitted in numpy (full-batch Adam on softmax cross-entropy) to imitate
``mltasks.policy.decide`` on states drawn by ``mltasks.state.sample_states`` in the
configured layout (``state.layout``).  The models of
one archetype share a training set and differ by initialisation seed and hidden
width, so the service has 54 real, distinct networks to load while their
behaviour stays predictable (they agree with the policy on most states).

Only the slots the policy reads (the layout's ``read_slots``) get non-zero
first-layer weights, so like the teacher the models ignore the rest of the
state.  Input standardisation is folded into the first Gemm so the exported
graph is just Gemm -> Relu -> Gemm, input ``state`` float32 [N, 64], output
``logits`` float32 [N, 10].  Files are written atomically and are
byte-identical for the same seed on the same numpy build.

``python -m mltasks.demo_models [DIR]`` writes them and prints the agreement
with the policy on a held-out sample.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from mltasks.contract import ARCHETYPES, MODEL_TYPES, N_ACTIONS, STATE_DIM
from mltasks.files import write_atomic
from mltasks.policy import decide
from mltasks.state import DEFAULT_LAYOUT, get_layout, sample_states

FloatArray = npt.NDArray[np.float32]

OPSET: Final = 17
IR_VERSION: Final = 8
"""IR 8 pairs with opset 17 and loads in every onnxruntime >= 1.13."""

INPUT_NAME: Final = "state"
OUTPUT_NAME: Final = "logits"

_TRAIN_SAMPLES: Final = 6000
_STEPS: Final = 200
_LR: Final = 0.05
_WIDTHS: Final = (32, 48)


@dataclass(frozen=True, slots=True)
class _Mlp:
    """Weights in the exported layout: y = relu(x @ w1 + b1) @ w2 + b2."""

    w1: FloatArray  # [64, H]
    b1: FloatArray  # [H]
    w2: FloatArray  # [H, 10]
    b2: FloatArray  # [10]


# --------------------------------------------------------------------------- training


def _openblas_libraries() -> list[Path]:
    """Paths of the OpenBLAS builds loaded in this process (numpy's bundled one first)."""
    found: list[Path] = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/maps").read_text().splitlines():
            name = line.rsplit(" ", 1)[-1]
            if "openblas" in name.lower() and name.startswith("/"):
                found.append(Path(name))
    libs_dir = Path(np.__file__).resolve().parent.parent / "numpy.libs"
    found.extend(sorted(libs_dir.glob("*openblas*")))
    return list(dict.fromkeys(found))


@contextlib.contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """Run the block with OpenBLAS limited to one thread, if that can be arranged.

    The training matmuls are small and skinny: a second BLAS thread gains
    nothing when the machine is idle, and when another process holds a core
    OpenBLAS's spinning workers slow the fit down ten-fold.  Best effort: with
    another BLAS, or none found, the block simply runs as it is.
    """
    for lib_path in _openblas_libraries():
        try:
            lib = ctypes.CDLL(str(lib_path))
        except OSError:
            continue
        local = getattr(lib, "openblas_set_num_threads_local", None)
        if local is not None:  # OpenBLAS >= 0.3.27: per calling thread, returns the old value
            local.argtypes, local.restype = [ctypes.c_int], ctypes.c_int
            previous = int(local(1))
            try:
                yield
            finally:
                local(previous)
            return
        for prefix, suffix in (("scipy_openblas", "64_"), ("openblas", "64_"), ("openblas", "")):
            setter = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
            getter = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
            if setter is None or getter is None:
                continue
            setter.argtypes, setter.restype = [ctypes.c_int], None
            getter.argtypes, getter.restype = [], ctypes.c_int
            previous = int(getter())
            setter(1)
            try:
                yield
            finally:
                setter(previous)
            return
    yield


def _fit(
    x: FloatArray,
    y: npt.NDArray[np.int64],
    hidden: int,
    rng: np.random.Generator,
    read_slots: Sequence[int],
) -> _Mlp:
    """Full-batch Adam on softmax cross-entropy; returns weights for raw [N, 64] inputs.

    Only the slots the policy reads (``read_slots``) feed the network: the other
    first-layer weights are exactly zero, so the models ignore those slots just
    as the teacher does instead of fitting noise in them.  Training runs on
    standardised inputs (much better conditioned), with the scaling folded back
    into the first layer afterwards.

    For speed the loop is feature-major ([features, N]), biases ride along as a
    constant row of ones, and every N-sized array is preallocated: allocating
    fresh buffers each step costs more than the arithmetic.
    """
    slots = np.asarray(read_slots)
    xr = x[:, slots]
    mu = xr.mean(axis=0)
    sd = xr.std(axis=0)
    sd = np.where(sd < 1e-6, 1.0, sd).astype(np.float32)
    n, d = xr.shape
    xs = np.ones((d + 1, n), dtype=np.float32)  # last row: bias input
    xs[:d] = ((xr - mu) / sd).T
    target = np.zeros((N_ACTIONS, n), dtype=np.float32)
    target[y, np.arange(n)] = 1.0

    w1 = np.zeros((hidden, d + 1), dtype=np.float32)
    w1[:, :d] = rng.standard_normal((hidden, d)) * np.sqrt(2.0 / d)
    w1[:, d] = 0.01
    w2 = np.zeros((N_ACTIONS, hidden + 1), dtype=np.float32)
    w2[:, :hidden] = rng.standard_normal((N_ACTIONS, hidden)) * np.sqrt(1.0 / hidden)
    params = [w1, w2]
    moment1 = [np.zeros_like(p) for p in params]
    moment2 = [np.zeros_like(p) for p in params]

    pre = np.empty((hidden, n), dtype=np.float32)
    act = np.ones((hidden + 1, n), dtype=np.float32)  # last row: bias input
    active = np.empty(pre.shape, dtype=np.bool_)
    dh = np.empty_like(pre)
    z = np.empty((N_ACTIONS, n), dtype=np.float32)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    inv_n = np.float32(1.0 / n)
    for t in range(1, _STEPS + 1):
        w1, w2 = params
        np.matmul(w1, xs, out=pre)
        np.maximum(pre, 0.0, out=act[:hidden])
        np.greater(pre, 0.0, out=active)
        np.matmul(w2, act, out=z)
        z -= z.max(axis=0, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=0, keepdims=True)
        z -= target
        z *= inv_n  # z is now dLoss/dlogits
        np.matmul(w2[:, :hidden].T, z, out=dh)
        dh *= active
        grads = [dh @ xs.T, z @ act.T]
        lr = _LR * (0.1 + 0.45 * (1.0 + np.cos(np.pi * t / _STEPS)))  # cosine decay to 10%
        step = lr * np.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
        for i, g in enumerate(grads):
            moment1[i] = beta1 * moment1[i] + (1.0 - beta1) * g
            moment2[i] = beta2 * moment2[i] + (1.0 - beta2) * (g * g)
            update = step * moment1[i] / (np.sqrt(moment2[i]) + eps)
            params[i] = (params[i] - update).astype(np.float32)

    w1, w2 = params
    w1_raw = np.zeros((STATE_DIM, hidden), dtype=np.float32)
    w1_raw[slots] = (w1[:, :d].T / sd[:, None]).astype(np.float32)
    b1_raw = (w1[:, d] - (mu / sd) @ w1[:, :d].T).astype(np.float32)
    w2_raw = np.ascontiguousarray(w2[:, :hidden].T, dtype=np.float32)
    return _Mlp(w1_raw, b1_raw, w2_raw, w2[:, hidden].astype(np.float32))


# --------------------------------------------------------------------------- ONNX


def _graph_model(name: str, layers: list[tuple[FloatArray, FloatArray]]) -> onnx.ModelProto:
    """Gemm (-> Relu -> Gemm)* graph from [in, out] weights; shapes [N, 64] -> [N, out]."""
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    current = INPUT_NAME
    for i, (w, b) in enumerate(layers):
        last = i == len(layers) - 1
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w, np.float32), f"w{i + 1}"))
        inits.append(numpy_helper.from_array(np.ascontiguousarray(b, np.float32), f"b{i + 1}"))
        out = OUTPUT_NAME if last else f"fc{i + 1}"
        nodes.append(helper.make_node("Gemm", [current, f"w{i + 1}", f"b{i + 1}"], [out]))
        current = out
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"relu{i + 1}"]))
            current = f"relu{i + 1}"
    n_out = int(layers[-1][0].shape[1])
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", STATE_DIM])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", n_out])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        producer_name="mltasks.demo_models",
        producer_version="1",
        opset_imports=[helper.make_opsetid("", OPSET)],
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def write_demo_models(
    models_dir: Path,
    *,
    seed: int = 0,
    archetypes: Sequence[str] = ARCHETYPES,
    layout: str = DEFAULT_LAYOUT,
) -> list[Path]:
    """Fit and write ``<models_dir>/<archetype>/<model_type>.onnx`` for every pair (54).

    ``archetypes`` narrows the set (tests); each archetype's models depend only
    on ``seed``, the layout and the archetype, so a subset has the same bytes as in a
    full write.  Returns the written paths in archetype-major order.
    """
    state_layout = get_layout(layout)
    unknown = [a for a in archetypes if a not in ARCHETYPES]
    if unknown:
        raise ValueError(f"unknown archetypes {unknown}; expected some of {ARCHETYPES}")
    models_dir = Path(models_dir)
    written: list[Path] = []
    with _single_threaded_blas():
        for archetype in archetypes:
            a_idx = ARCHETYPES.index(archetype)
            x = state_layout.sample(np.random.default_rng([seed, a_idx]), _TRAIN_SAMPLES, archetype)
            y, _ = decide(x, archetype, state_layout.name)
            for m_idx, model_type in enumerate(MODEL_TYPES):
                init_rng = np.random.default_rng([seed, a_idx, m_idx + 1])
                mlp = _fit(x, y, _WIDTHS[m_idx % len(_WIDTHS)], init_rng, state_layout.read_slots)
                layers = [(mlp.w1, mlp.b1), (mlp.w2, mlp.b2)]
                model = _graph_model(f"{archetype}_{model_type}", layers)
                path = models_dir / archetype / f"{model_type}.onnx"
                write_atomic(path, model.SerializeToString(deterministic=True))
                written.append(path)
    return written


def write_corrupt_model(path: Path) -> None:
    """Write bytes that are not an ONNX model (for tests of the loader's skipping)."""
    write_atomic(Path(path), b"\x00not-an-onnx-model\xff" * 8)


def write_misshaped_model(path: Path) -> None:
    """Write a valid ONNX model whose output is [N, 7] instead of [N, 10]."""
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((STATE_DIM, 7)) * 0.1).astype(np.float32)
    b = np.zeros(7, dtype=np.float32)
    model = _graph_model("misshaped", [(w, b)])
    write_atomic(Path(path), model.SerializeToString(deterministic=True))


def teacher_agreement(
    model_path: Path,
    archetype: str,
    n: int = 2000,
    seed: int = 1,
    layout: str = DEFAULT_LAYOUT,
) -> float:
    """Fraction of ``n`` sampled states on which the model's argmax equals the policy's action."""
    import onnxruntime as ort  # only here: writing models must not need the runtime

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(
        str(model_path), sess_options=opts, providers=["CPUExecutionProvider"]
    )
    x = sample_states(np.random.default_rng(seed), n, layout, archetype)
    (out,) = session.run([OUTPUT_NAME], {INPUT_NAME: x})
    expected, _ = decide(x, archetype, layout)
    return float(np.mean(np.argmax(np.asarray(out), axis=1) == expected))


def main() -> None:
    """Write the demo models to ``./models`` (or argv[1]) and print agreement per archetype."""
    import sys
    import time

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("models")
    start = time.perf_counter()
    paths = write_demo_models(target)
    elapsed = time.perf_counter() - start
    print(f"wrote {len(paths)} models to {target} in {elapsed:.1f}s")
    for archetype in ARCHETYPES:
        scores = [
            teacher_agreement(target / archetype / f"{mt}.onnx", archetype) for mt in MODEL_TYPES
        ]
        print(
            f"{archetype:<11} agreement combat_dqn {scores[0]:.3f}"
            f"  min {min(scores):.3f}  mean {np.mean(scores):.3f}  max {max(scores):.3f}"
        )


if __name__ == "__main__":
    main()
