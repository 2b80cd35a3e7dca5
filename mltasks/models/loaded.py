"""One model file as a session: placed by its signature, fed in its dtype, checked by a probe.

A file loads only when the family table (`mltasks.models.family`) can place every input it
declares and the outputs its type needs, and a probe batch of two rows comes back in the
expected shapes with finite values. Anything else raises ``ModelError`` naming the input or
output that did not fit, and the engine skips that file.

Sessions are made after the fork (first use or ``worker_process_init``), never at import:
an ONNX Runtime session does not survive a fork.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from mltasks.contract import N_ACTIONS, STATE_DIM
from mltasks.errors import ModelError
from mltasks.models.family import SEQUENCE_LEN, Role, Scores, Signature, signature
from mltasks.models.versions import version_of

FloatArray = npt.NDArray[np.float32]
ProviderSpec = str | tuple[str, dict[str, object]]

_DTYPES: dict[str, Any] = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True, slots=True)
class TypeOutput:
    """What one model said about a batch of N rows (float32; None where it has no such role).

    ``scores`` are the action scores of actions 0-9 (logits or Q-values, as the signature
    says), ``value`` and ``threat`` one number per row.
    """

    scores: FloatArray | None = None
    value: FloatArray | None = None
    threat: FloatArray | None = None

    def rows(self) -> int:
        for a in (self.scores, self.value, self.threat):
            if a is not None:
                return int(a.shape[0])
        return 0

    def packed(self) -> FloatArray:
        """[N, k]: scores, then threat, then value, for the cache (L3)."""
        parts = [
            a if a.ndim == 2 else a[:, None]
            for a in (self.scores, self.threat, self.value)
            if a is not None
        ]
        return np.concatenate(parts, axis=1).astype(np.float32)

    def finite(self) -> npt.NDArray[np.bool_]:
        """Per row: every value this model gave is finite, in float32 as `packed` holds
        it (one check per output: no packed copy on the answering path)."""
        finite: npt.NDArray[np.bool_] | None = None
        for a in (self.scores, self.threat, self.value):
            if a is not None:
                ok = np.isfinite(a.astype(np.float32, copy=False))
                rows = ok if ok.ndim == 1 else np.asarray(ok.all(axis=1))
                finite = rows if finite is None else finite & rows
        return np.ones(self.rows(), dtype=np.bool_) if finite is None else finite


@dataclass(frozen=True, slots=True)
class _Input:
    name: str
    dtype: Any
    width: int


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A placed, probed model of one archetype and type, ready for batches."""

    archetype: str
    model_type: str
    path: Path
    session: Any
    sig: Signature
    state_input: _Input
    action_input: _Input | None
    outputs: tuple[tuple[str, Role], ...]
    """(output name, role) of the outputs this service reads, in the session's order."""
    precision: Literal["fp16", "fp32"]
    roles: frozenset[Role] = field(default_factory=frozenset)
    version: str = ""
    """The file's version id (`mltasks.models.versions.version_of`); "" when not known."""

    @property
    def name(self) -> str:
        return f"{self.archetype}/{self.model_type}"

    @property
    def source(self) -> str:
        return "model"

    @property
    def sequence(self) -> bool:
        return self.sig.input == "sequence"

    @property
    def cacheable(self) -> bool:
        """A sequence model's output depends on the history too: L3 does not keep it."""
        return not self.sequence

    @property
    def scores_kind(self) -> Scores:
        return self.sig.scores

    @property
    def packed_width(self) -> int:
        """Floats per row in this model's cached output (see `TypeOutput.packed`)."""
        return (
            (N_ACTIONS if self.roles & {"actions", "critic"} else 0)
            + ("threat" in self.roles)
            + ("value" in self.roles)
        )

    def unpack(self, packed: FloatArray) -> TypeOutput:
        """The inverse of `TypeOutput.packed` for this model's roles ([N, packed_width])."""
        i = 0
        scores = threat = value = None
        if self.roles & {"actions", "critic"}:
            scores, i = packed[:, :N_ACTIONS], N_ACTIONS
        if "threat" in self.roles:
            threat, i = packed[:, i], i + 1
        if "value" in self.roles:
            value = packed[:, i]
        return TypeOutput(scores, value, threat)

    def run(self, states: FloatArray, windows: FloatArray | None = None) -> TypeOutput:
        """One batch: states float32 [N, 64]; for a sequence model, windows [N, 10, 64]
        (oldest first; the current state repeated when not given). Raises ModelError."""
        n = int(states.shape[0])
        if self.sig.input == "sequence":
            if windows is None:
                windows = np.repeat(states[:, None, :], SEQUENCE_LEN, axis=1)
            feed = {self.state_input.name: windows.astype(self.state_input.dtype, copy=False)}
        elif self.action_input is not None:
            a = self.action_input
            eye = np.eye(N_ACTIONS, a.width, dtype=a.dtype)
            feed = {
                self.state_input.name: np.repeat(states, N_ACTIONS, axis=0).astype(
                    self.state_input.dtype, copy=False
                ),
                a.name: np.tile(eye, (n, 1)),
            }
        else:
            feed = {self.state_input.name: states.astype(self.state_input.dtype, copy=False)}
        names = [name for name, _ in self.outputs]
        try:
            raw = self.session.run(names, feed)
        except Exception as exc:  # onnxruntime raises its own, untyped errors
            raise ModelError(f"{self.name}: inference failed: {exc}") from exc
        return self.read(n, [np.asarray(r) for r in raw])

    def read(self, n: int, raw: Sequence[np.ndarray]) -> TypeOutput:
        """What this model said about ``n`` rows, from its outputs in ``self.outputs``'s
        order (its own run's, or its part of a merged one): shapes checked, float32."""
        scores = value = threat = None
        critics: list[FloatArray] = []
        for (name, role), out in zip(self.outputs, raw, strict=True):
            if role == "actions":
                if out.ndim != 2 or out.shape[0] != n or out.shape[1] not in self.sig.action_widths:
                    raise ModelError(
                        f"{self.name}: output {name!r} has shape {list(out.shape)} for {n} rows,"
                        f" expected [N, {' or '.join(map(str, self.sig.action_widths))}]"
                    )
                scores = out[:, :N_ACTIONS].astype(np.float32)
                continue
            rows = n * N_ACTIONS if role == "critic" else n
            if out.shape != (rows, 1):
                raise ModelError(
                    f"{self.name}: output {name!r} has shape {list(out.shape)}, "
                    f"expected [{rows}, 1]"
                )
            flat = out[:, 0].astype(np.float32)
            if role == "critic":
                critics.append(flat.reshape(n, N_ACTIONS))
            elif role == "value":
                value = flat
            elif role == "threat":
                threat = flat
        if critics:
            scores = np.minimum.reduce(critics)  # the lower of the twin critics
        return TypeOutput(scores, value, threat)


def session_options(threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return opts


def _dtype(path: Path, arg: Any) -> Any:
    dtype = _DTYPES.get(arg.type)
    if dtype is None:
        raise ModelError(f"{path}: input {arg.name!r} is {arg.type}, expected float or float16")
    return dtype


def _place_inputs(
    path: Path, sig: Signature, inputs: Sequence[Any]
) -> tuple[_Input, _Input | None]:
    """The state (or sequence) input and the critic's action input, by the signature."""
    want = 2 if sig.input == "state_action" else 1
    if len(inputs) != want:
        names = [i.name for i in inputs]
        raise ModelError(
            f"{path}: {sig.model_type} takes {want} input(s) ({sig.input}), found {names}"
        )
    state_shape = [SEQUENCE_LEN, STATE_DIM] if sig.input == "sequence" else [STATE_DIM]
    if sig.input != "state_action":
        (arg,) = inputs
        if list(arg.shape[1:]) != state_shape or len(arg.shape) != len(state_shape) + 1:
            raise ModelError(
                f"{path}: input {arg.name!r} has shape {arg.shape}, expected [N, "
                f"{', '.join(map(str, state_shape))}]"
            )
        return _Input(arg.name, _dtype(path, arg), STATE_DIM), None
    by_name = {i.name: i for i in inputs}
    state = by_name.get("state")
    action = by_name.get("action")
    if state is None or action is None:  # unnamed export: the 64-wide one is the state
        ordered = sorted(inputs, key=lambda i: i.shape[-1] != STATE_DIM)
        state, action = ordered
    if list(state.shape[1:]) != [STATE_DIM]:
        raise ModelError(f"{path}: input {state.name!r} has shape {state.shape}, expected [N, 64]")
    if len(action.shape) != 2 or action.shape[1] not in sig.action_widths:
        raise ModelError(
            f"{path}: input {action.name!r} has shape {action.shape}, expected [N, "
            f"{' or '.join(map(str, sig.action_widths))}]"
        )
    return (
        _Input(state.name, _dtype(path, state), STATE_DIM),
        _Input(action.name, _dtype(path, action), int(action.shape[1])),
    )


def _place_outputs(
    path: Path, sig: Signature, outputs: Sequence[Any]
) -> tuple[tuple[str, Role], ...]:
    """(name, role) of the outputs to read; other outputs are never fetched."""
    names = [o.name for o in outputs]
    needed = {n: r for n, r in sig.outputs.items() if r != "ignore"}
    placed = [(n, sig.outputs[n]) for n in names if n in sig.outputs]
    if not placed and len(names) == 1 and len(needed) == 1:
        placed = [(names[0], next(iter(needed.values())))]  # unnamed: placed by position
    else:
        missing = sorted(set(needed) - set(names))
        if missing:
            raise ModelError(f"{path}: {sig.model_type} needs output(s) {missing}, found {names}")
    return tuple((n, r) for n, r in placed if r != "ignore")


def load_model(
    path: Path,
    archetype: str,
    model_type: str,
    providers: Sequence[ProviderSpec],
    threads: int = 1,
    version: str | None = None,
) -> LoadedModel:
    """Load, place and probe one file; raises ModelError with what did not fit.

    ``version`` is the model's version id (the hash of the file, or of the master a
    precision variant was built from); computed from ``path`` when not given."""
    sig = signature(model_type)
    try:
        session = ort.InferenceSession(
            str(path), sess_options=session_options(threads), providers=list(providers)
        )
    except Exception as exc:
        raise ModelError(f"{path}: cannot load: {exc}") from exc
    state_input, action_input = _place_inputs(path, sig, session.get_inputs())
    outputs = _place_outputs(path, sig, session.get_outputs())
    precision: Literal["fp16", "fp32"] = "fp16" if state_input.dtype == np.float16 else "fp32"
    model = LoadedModel(
        archetype,
        model_type,
        Path(path),
        session,
        sig,
        state_input,
        action_input,
        outputs,
        precision,
        frozenset(r for _, r in outputs),
        version if version is not None else version_of(Path(path)),
    )
    # Two rows: catches a fixed batch dimension, a wrong output width, a NaN factory.
    probe = model.run(np.full((2, STATE_DIM), 0.5, dtype=np.float32))
    if not probe.finite().all():
        raise ModelError(f"{path}: the probe batch returned non-finite values")
    return model
