"""An archetype's fusion members as one ONNX Runtime session: the same outputs, one run.

Inside a batch a model call cost about 30 us on the benchmark machine, most of it ONNX
Runtime's own path per run rather than the model (11 us hot in a loop, 8 of them in
``InferenceSession.run``), and a level-3 batch of three archetypes made nine calls. The
members' graphs side by side in one session, each under a prefix of its own and all fed by
one state input, answer in one run: 13 against 33 us hot for the three demo members of
level 3 (docs/PERFORMANCE.md, "2026-12-07 (before noon)").

Merged only where nothing can differ: members that read the plain state, in one dtype, on
the CPU provider alone, whose graphs use the same opsets and no local functions; a merged
session serves only if its outputs are the members' own, bit for bit, on a probe batch.
Anything else (a sequence or critic member, a GPU level) keeps one call per member. So do
members whose files total more than ``models.merge_max_mb`` (4 MB): a merged model is held
twice, and a large model's cost is the model, not the call (the Phase 11-size level-3 set:
+146 MB a worker, 1.03x the decisions/s).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import compose, helper

from mltasks.contract import STATE_DIM
from mltasks.errors import ModelError
from mltasks.models.loaded import LoadedModel, TypeOutput, session_options

log = logging.getLogger(__name__)

STATE = "state"
CPU_ONLY = ["CPUExecutionProvider"]
_ONNX_DTYPES = {np.float32: onnx.TensorProto.FLOAT, np.float16: onnx.TensorProto.FLOAT16}


@dataclass(frozen=True, slots=True)
class Merged:
    """Several members of one archetype in one session (`merge`)."""

    members: tuple[LoadedModel, ...]
    session: Any
    dtype: Any
    outputs: list[str]
    """Every member's outputs, member after member, each in its ``outputs`` order."""

    def serves(self, members: Sequence[LoadedModel]) -> bool:
        """Made from exactly these loaded models (a deploy swaps in new ones)."""
        return same_models(members, self.members)

    def run(self, states: np.ndarray) -> list[TypeOutput]:
        """Each member's output for states float32 [N, 64]; raises ModelError."""
        n = int(states.shape[0])
        try:
            raw = self.session.run(self.outputs, {STATE: states.astype(self.dtype, copy=False)})
        except Exception as exc:  # onnxruntime raises its own, untyped errors
            names = "+".join(m.model_type for m in self.members)
            raise ModelError(
                f"{self.members[0].archetype}/{names}: inference failed: {exc}"
            ) from exc
        said, start = [], 0
        for m in self.members:
            said.append(m.read(n, raw[start : start + len(m.outputs)]))
            start += len(m.outputs)
        return said


def same_models(a: Sequence[LoadedModel], b: Sequence[LoadedModel]) -> bool:
    """The very same loaded models, in order: a deploy swaps in new objects."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def _size(member: LoadedModel) -> int:
    try:
        return member.path.stat().st_size
    except OSError:  # gone since it was loaded: nothing to merge from
        return 1 << 62


def mergeable(member: LoadedModel) -> bool:
    """Reads the plain state, alone, on the CPU provider alone."""
    return (
        member.sig.input == "state"
        and member.action_input is None
        and list(member.session.get_providers()) == CPU_ONLY
    )


def merge(
    members: Sequence[LoadedModel], probe: np.ndarray, max_bytes: int = 4 << 20
) -> Merged | None:
    """One session for ``members``, or None where it could differ from them, fails to
    build, or their files total more than ``max_bytes`` (the members then keep their own
    calls). ``probe``: states float32 [k, 64] the merged outputs must match the members'
    own on."""
    if len(members) < 2 or not all(mergeable(m) for m in members):
        return None
    if sum(_size(m) for m in members) > max_bytes:
        return None
    dtypes = {m.state_input.dtype for m in members}
    if len(dtypes) != 1:
        return None
    try:
        merged = _build(members, dtypes.pop())
    except Exception as exc:  # an unusual graph: the members serve as they are
        log.info(
            "%s members not merged: %s",
            members[0].archetype,
            exc,
            extra={"event": "models_not_merged", "archetype": members[0].archetype},
        )
        return None
    if merged is None or not _same(merged, members, probe):
        return None
    return merged


def _build(members: Sequence[LoadedModel], dtype: Any) -> Merged | None:
    protos = [onnx.load(str(m.path)) for m in members]
    opsets: dict[str, int] = {}
    for proto in protos:
        if proto.functions:
            return None
        for o in proto.opset_import:
            if opsets.setdefault(o.domain, o.version) != o.version:
                return None
    nodes: list[Any] = []
    initializers: list[Any] = []
    sparse: list[Any] = []
    outputs: list[Any] = []
    for i, (m, proto) in enumerate(zip(members, protos, strict=True)):
        graph = compose.add_prefix(proto, f"m{i}/").graph
        nodes.append(helper.make_node("Identity", [STATE], [f"m{i}/{m.state_input.name}"]))
        nodes.extend(graph.node)
        initializers.extend(graph.initializer)
        sparse.extend(graph.sparse_initializer)
        by_name = {o.name: o for o in graph.output}
        outputs.extend(by_name[f"m{i}/{name}"] for name, _ in m.outputs)
    state = helper.make_tensor_value_info(STATE, _ONNX_DTYPES[dtype], ["N", STATE_DIM])
    graph = helper.make_graph(
        nodes, "merged", [state], outputs, initializers, sparse_initializer=sparse
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
        ir_version=max(p.ir_version for p in protos),
    )
    threads = members[0].session.get_session_options().intra_op_num_threads
    session = ort.InferenceSession(
        model.SerializeToString(), sess_options=session_options(threads), providers=CPU_ONLY
    )
    return Merged(tuple(members), session, dtype, [o.name for o in outputs])


def _same(merged: Merged, members: Sequence[LoadedModel], probe: np.ndarray) -> bool:
    """The merged outputs are each member's own, bit for bit, on ``probe``."""
    joined = merged.run(probe)
    for m, got in zip(members, joined, strict=True):
        own = m.run(probe)
        pairs = ((own.scores, got.scores), (own.value, got.value), (own.threat, got.threat))
        if not all(_equal(a, b) for a, b in pairs):
            log.warning(
                "%s: a merged session differs from its own; served alone",
                m.name,
                extra={"event": "models_not_merged", "model": m.name},
            )
            return False
    return True


def _equal(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is b
    return bool(np.array_equal(a, b))
