"""Demo models in the fork's exported form, distilled from the rule policy without torch.

``mltasks models init`` writes, for each archetype, the nine types as the Phase 11
exporter writes them (shared/MODELS.md): ``<type>_fp16.onnx``, opset 17, FP16 weights,
inputs and outputs, input ``state``; the three sequence types read ``[N, 10, 64]``;
``movement_ppo`` has a ``value`` head beside its ``action_logits``; ``team_coordination``
exports an h_n-shaped ``value`` ``[6, N, 256]``; ``threat_assessment`` a threat score
``[N, 1]``; ``soft_actor_critic`` twin critics ``q1``/``q2`` on (state, action); and the
fork's two 12-wide default heads (mage ``combat_dqn``, ranged ``movement_ppo``).

They are small (one hidden ReLU layer of 32-48 units), fitted in numpy (full-batch Adam) on
states sampled in the configured layout (``state.layout``), so they behave like the
policy and are checkable by hand:

- action heads imitate ``policy.decide`` (cross-entropy);
- the sequence types see the window's first and last states and imitate
  ``policy.decide_history`` (they flee earlier when HP is falling fast), trained on sampled
  10-state histories, a fifth of them front-padded as the service pads short histories;
- ``threat_assessment`` regresses ``policy.threat``; the ``value`` head a state value
  (HP minus half the threat, a linear fit); the critics are two fits of Q(s, a) = the
  action's score, so the lower of the two still prefers the teacher's action.

Only the slots the policy reads (the layout's ``read_slots``) get non-zero first-layer
weights. Graphs are built in FP32 with the onnx helper and converted to FP16 with
onnxconverter-common, I/O included. Files are written atomically and are byte-identical for
the same seed and layout on the same numpy build.
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

from mltasks.contract import ARCHETYPES, MODEL_TYPES, N_ACTIONS, STATE_DIM
from mltasks.fallback.policy import decide, decide_history, threat
from mltasks.files import write_atomic
from mltasks.models import phase11
from mltasks.models.family import FAMILY, SEQUENCE_LEN
from mltasks.models.graph import Graph, Mlp, Precision, io
from mltasks.models.phase11 import Heads
from mltasks.state import DEFAULT_LAYOUT, Layout, get_layout

FloatArray = npt.NDArray[np.float32]


INPUT_NAME: Final = "state"
PRODUCER: Final = "mltasks.models.demo"

_TRAIN_SAMPLES: Final = 6000
_STEPS: Final = 200
_LR: Final = 0.05
_WIDTHS: Final = (32, 48)
_WIDE: Final[dict[tuple[str, str], int]] = {
    ("mage", "combat_dqn"): 12,
    ("ranged", "movement_ppo"): 12,
}
"""The fork's default configs with a 12-wide action head (the game executes 0-9)."""
_H_N: Final = (6, 256)
"""team_coordination's second output is its BiLSTM's h_n: [layers x directions, N, 256]."""


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
    target: npt.NDArray[np.int64] | FloatArray,
    hidden: int,
    rng: np.random.Generator,
) -> Mlp:
    """Full-batch Adam; int targets: softmax cross-entropy over 10 actions, float targets
    [n, k]: mean squared error. Returns weights for the raw features ``x`` [n, d].

    Training runs on standardised inputs (much better conditioned), with the scaling folded
    back into the first layer afterwards. The loop is feature-major ([features, n]), biases
    ride along as a constant row of ones, and every n-sized array is preallocated.
    """
    classify = np.issubdtype(np.asarray(target).dtype, np.integer)
    mu = x.mean(axis=0)
    sd = x.std(axis=0)
    sd = np.where(sd < 1e-6, 1.0, sd).astype(np.float32)
    n, d = x.shape
    xs = np.ones((d + 1, n), dtype=np.float32)  # last row: bias input
    xs[:d] = ((x - mu) / sd).T
    if classify:
        out_dim = N_ACTIONS
        goal = np.zeros((out_dim, n), dtype=np.float32)
        goal[np.asarray(target), np.arange(n)] = 1.0
    else:
        goal = np.ascontiguousarray(np.asarray(target, dtype=np.float32).reshape(n, -1).T)
        out_dim = goal.shape[0]

    w1 = np.zeros((hidden, d + 1), dtype=np.float32)
    w1[:, :d] = rng.standard_normal((hidden, d)) * np.sqrt(2.0 / d)
    w1[:, d] = 0.01
    w2 = np.zeros((out_dim, hidden + 1), dtype=np.float32)
    w2[:, :hidden] = rng.standard_normal((out_dim, hidden)) * np.sqrt(1.0 / hidden)
    params = [w1, w2]
    moment1 = [np.zeros_like(p) for p in params]
    moment2 = [np.zeros_like(p) for p in params]

    pre = np.empty((hidden, n), dtype=np.float32)
    act = np.ones((hidden + 1, n), dtype=np.float32)  # last row: bias input
    active = np.empty(pre.shape, dtype=np.bool_)
    dh = np.empty_like(pre)
    z = np.empty((out_dim, n), dtype=np.float32)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    inv_n = np.float32(1.0 / n)
    for t in range(1, _STEPS + 1):
        w1, w2 = params
        np.matmul(w1, xs, out=pre)
        np.maximum(pre, 0.0, out=act[:hidden])
        np.greater(pre, 0.0, out=active)
        np.matmul(w2, act, out=z)
        if classify:
            z -= z.max(axis=0, keepdims=True)
            np.exp(z, out=z)
            z /= z.sum(axis=0, keepdims=True)
        z -= goal
        z *= inv_n  # z is now dLoss/dout (up to a constant for MSE)
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
    w1_raw = (w1[:, :d].T / sd[:, None]).astype(np.float32)
    b1_raw = (w1[:, d] - (mu / sd) @ w1[:, :d].T).astype(np.float32)
    w2_raw = np.ascontiguousarray(w2[:, :hidden].T, dtype=np.float32)
    return Mlp(w1_raw, b1_raw, w2_raw, w2[:, hidden].astype(np.float32))


def _linear(x: FloatArray, target: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Least squares y = x @ w + b: ([d, 1], [1])."""
    a = np.hstack([x, np.ones((len(x), 1), dtype=np.float32)]).astype(np.float64)
    coef, *_ = np.linalg.lstsq(a, target.astype(np.float64), rcond=None)
    return coef[:-1, None].astype(np.float32), coef[-1:].astype(np.float32)


# --------------------------------------------------------------------------- histories


def sample_windows(
    layout: Layout, rng: np.random.Generator, n: int, archetype: str | None = None
) -> FloatArray:
    """``n`` plausible 10-state histories [n, 10, 64], oldest first, ending in a sampled
    state: HP steady in half of them, else moving from a start HP in a straight line; a
    fifth front-padded with copies of their oldest state, as the service pads (see
    `mltasks.models.history`)."""
    current = layout.sample(rng, n, archetype)
    hp_now = layout.read(current).hp
    moving = rng.random(n) < 0.5
    hp_then = np.where(moving, np.clip(hp_now + rng.uniform(-0.3, 0.6, n), 0.0, 1.0), hp_now)
    out = np.empty((n, SEQUENCE_LEN, STATE_DIM), dtype=np.float32)
    for t in range(SEQUENCE_LEN):
        share = t / (SEQUENCE_LEN - 1)
        out[:, t] = layout.with_hp(current, hp_then + (hp_now - hp_then) * share)
    padded = np.flatnonzero(rng.random(n) < 0.2)
    for i, real in zip(padded, rng.integers(1, SEQUENCE_LEN, len(padded)), strict=True):
        out[i, : SEQUENCE_LEN - real] = out[i, SEQUENCE_LEN - real]
    return out


# --------------------------------------------------------------------------- ONNX


def _widen(m: Mlp, width: int) -> Mlp:
    """A 12-wide head: the extra columns score far below the rest, never the argmax."""
    if width == m.w2.shape[1]:
        return m
    extra = width - m.w2.shape[1]
    w2 = np.hstack([m.w2, np.zeros((m.w2.shape[0], extra), dtype=np.float32)])
    b2 = np.concatenate([m.b2, np.full(extra, -10.0, dtype=np.float32)])
    return Mlp(m.w1, m.b1, w2, b2)


def _build(
    archetype: str,
    model_type: str,
    layout: Layout,
    data: _Data,
    rng: np.random.Generator,
    precision: Precision,
) -> onnx.ModelProto:
    """One type's model, fitted on the archetype's training data."""
    sig = FAMILY[model_type]
    slots = list(layout.read_slots)
    hidden = _WIDTHS[MODEL_TYPES.index(model_type) % len(_WIDTHS)]
    width = _WIDE.get((archetype, model_type), N_ACTIONS)
    g = Graph(f"{archetype}_{model_type}")
    # Every branch reads the input through one Identity: the FP16 converter casts an input
    # once per consumer, under one name, which breaks a graph with two.
    x = g.op("Identity", [INPUT_NAME])
    if sig.input == "sequence":
        g.inputs.append(io(INPUT_NAME, ["batch_size", SEQUENCE_LEN, STATE_DIM]))
        first = g.op("Gather", [x, g.const(0, np.int64)], axis=1)
        last = g.op("Gather", [x, g.const(SEQUENCE_LEN - 1, np.int64)], axis=1)
        both = g.op("Concat", [last, first], axis=1)
        m = _fit(data.seq_x, data.seq_y, hidden, rng)
        rows = [*slots, *(STATE_DIM + s for s in slots)]
        names = list(sig.outputs)
        g.mlp(both, rows, 2 * STATE_DIM, m, names[0])
        g.outputs.append(io(names[0], ["batch_size", N_ACTIONS]))
        if model_type == "team_coordination":  # an h_n-shaped second output, not a value
            proj = g.const(rng.standard_normal((STATE_DIM * 2, _H_N[1])) * 0.01)
            h = g.op("Unsqueeze", [g.op("MatMul", [both, proj]), g.const([0], np.int64)])
            g.op("Tile", [h, g.const([_H_N[0], 1, 1], np.int64)], names[1])
            g.outputs.append(io(names[1], [_H_N[0], "batch_size", _H_N[1]]))
        return g.model(precision, PRODUCER)
    g.inputs.append(io(INPUT_NAME, ["batch_size", STATE_DIM]))
    if model_type == "threat_assessment":
        m = _fit(data.x, data.threat, hidden, rng)
        g.mlp(x, slots, STATE_DIM, m, "output")
        g.outputs.append(io("output", ["batch_size", 1]))
        return g.model(precision, PRODUCER)
    if model_type == "soft_actor_critic":
        g.inputs.append(io("action", ["batch_size", N_ACTIONS]))
        for critic in ("q1", "q2"):
            fitted = _fit(data.x, data.y, hidden, rng)
            q = g.mlp(x, slots, STATE_DIM, fitted, prefix=f"{critic}_")
            picked = g.op("Mul", [q, "action"])
            g.op("ReduceSum", [picked, g.const([1], np.int64)], critic, keepdims=1)
            g.outputs.append(io(critic, ["batch_size", 1]))
        return g.model(precision, PRODUCER)
    m = _widen(_fit(data.x, data.y, hidden, rng), width)
    head = next(iter(sig.outputs))
    g.mlp(x, slots, STATE_DIM, m, head)
    g.outputs.append(io(head, ["batch_size", width]))
    if "value" in sig.outputs:
        w, b = _linear(data.x, data.value)
        wv = np.zeros((STATE_DIM, 1), dtype=np.float32)
        wv[slots] = w
        g.op("Gemm", [x, g.const(wv), g.const(b)], "value")
        g.outputs.append(io("value", ["batch_size", 1]))
    return g.model(precision, PRODUCER)


@dataclass(frozen=True, slots=True)
class _Data:
    """One archetype's training set: states and their labels, histories and theirs."""

    x: FloatArray  # read slots of sampled states [n, d]
    y: npt.NDArray[np.int64]
    threat: FloatArray
    value: FloatArray
    seq_x: FloatArray  # read slots of each window's last and first state [n, 2d]
    seq_y: npt.NDArray[np.int64]


def _data(layout: Layout, archetype: str, seed: int) -> _Data:
    a_idx = ARCHETYPES.index(archetype)
    rng = np.random.default_rng([seed, a_idx])
    states = layout.sample(rng, _TRAIN_SAMPLES, archetype)
    windows = sample_windows(layout, rng, _TRAIN_SAMPLES, archetype)
    slots = list(layout.read_slots)
    danger = threat(states, layout.name)
    hp = layout.read(states).hp
    return _Data(
        x=states[:, slots],
        y=decide(states, archetype, layout.name)[0],
        threat=danger,
        value=(hp - 0.5 * danger).astype(np.float32),
        seq_x=np.hstack([windows[:, -1, slots], windows[:, 0, slots]]),
        seq_y=decide_history(windows, archetype, layout.name)[0],
    )


def model_file(
    models_dir: Path, archetype: str, model_type: str, precision: Precision = "fp16"
) -> Path:
    """Where the exporter puts a model: ``<dir>/<archetype>/<type>_fp16.onnx``; the FP32
    form (the fork's continuous training) ``<type>.onnx``."""
    suffix = "_fp16.onnx" if precision == "fp16" else ".onnx"
    return Path(models_dir) / archetype / f"{model_type}{suffix}"


def _heads(model_type: str, layout: Layout, data: _Data, rng: np.random.Generator) -> Heads:
    """The fitted parts of a Phase 11-size model (see `mltasks.models.phase11`)."""
    sig = FAMILY[model_type]
    slots = list(layout.read_slots)
    hidden = _WIDTHS[MODEL_TYPES.index(model_type) % len(_WIDTHS)]
    if sig.input == "sequence":
        rows = [*slots, *(STATE_DIM + s for s in slots)]
        return Heads(actions=_fit(data.seq_x, data.seq_y, hidden, rng), rows=rows)
    if model_type == "threat_assessment":
        return Heads(threat=_fit(data.x, data.threat, hidden, rng), rows=slots)
    if model_type == "soft_actor_critic":
        critics = (_fit(data.x, data.y, hidden, rng), _fit(data.x, data.y, hidden, rng))
        return Heads(critics=critics, rows=slots)
    value = _linear(data.x, data.value) if "value" in sig.outputs else None
    return Heads(actions=_fit(data.x, data.y, hidden, rng), value=value, rows=slots)


PROFILES: Final[tuple[str, ...]] = ("demo", "phase11")
"""demo: small networks, seconds to write; phase11: the fork's default sizes (random
trunks, fitted decision heads), minutes to write, a benchmark's models."""


def demo_models(
    *,
    seed: int = 0,
    archetypes: Sequence[str] = ARCHETYPES,
    layout: str = DEFAULT_LAYOUT,
    precision: Precision = "fp16",
    profile: str = "demo",
) -> Iterator[tuple[str, str, bytes]]:
    """(archetype, type, serialized model) for every pair, fitted on ``layout``."""
    unknown = [a for a in archetypes if a not in ARCHETYPES]
    if unknown:
        raise ValueError(f"unknown archetypes {unknown}; expected some of {ARCHETYPES}")
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {PROFILES}")
    lay = get_layout(layout)
    with _single_threaded_blas():
        for archetype in archetypes:
            a_idx = ARCHETYPES.index(archetype)
            data = _data(lay, archetype, seed)
            for m_idx, model_type in enumerate(MODEL_TYPES):
                rng = np.random.default_rng([seed, a_idx, m_idx + 1])
                if profile == "phase11":
                    width = _WIDE.get((archetype, model_type), N_ACTIONS)
                    heads = _heads(model_type, lay, data, rng)
                    model, _ = phase11.build(archetype, model_type, heads, width, rng, precision)
                else:
                    model = _build(archetype, model_type, lay, data, rng, precision)
                yield archetype, model_type, model.SerializeToString(deterministic=True)


def write_demo_models(
    models_dir: Path,
    *,
    seed: int = 0,
    archetypes: Sequence[str] = ARCHETYPES,
    layout: str = DEFAULT_LAYOUT,
    precision: Precision = "fp16",
    profile: str = "demo",
) -> list[Path]:
    """Fit and write ``<models_dir>/<archetype>/<type>_fp16.onnx`` for every pair (54);
    with ``precision="fp32"``, ``<type>.onnx`` in FP32 I/O.

    ``archetypes`` narrows the set (tests); each archetype's models depend only on ``seed``,
    the layout and the archetype, so a subset has the same bytes as in a full write.
    Returns the written paths in archetype-major order.
    """
    written = []
    for archetype, model_type, blob in demo_models(
        seed=seed, archetypes=archetypes, layout=layout, precision=precision, profile=profile
    ):
        path = model_file(models_dir, archetype, model_type, precision)
        write_atomic(path, blob)
        written.append(path)
    return written


def write_corrupt_model(path: Path) -> None:
    """Write bytes that are not an ONNX model (for tests of the loader's skipping)."""
    write_atomic(Path(path), b"\x00not-an-onnx-model\xff" * 8)


def write_misshaped_model(path: Path) -> None:
    """Write a valid FP32 ONNX model whose output is [N, 7] instead of [N, 10]."""
    g = Graph("misshaped")
    g.inputs.append(io(INPUT_NAME, ["batch_size", STATE_DIM]))
    w = (np.random.default_rng(7).standard_normal((STATE_DIM, 7)) * 0.1).astype(np.float32)
    g.op("Gemm", [INPUT_NAME, g.const(w), g.const(np.zeros(7))], "output")
    g.outputs.append(io("output", ["batch_size", 7]))
    write_atomic(Path(path), g.model("fp32").SerializeToString(deterministic=True))
