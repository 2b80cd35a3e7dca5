"""Phase 11-size models: the fork's nine architectures at their default sizes, in ONNX.

``mltasks models init DIR --profile phase11`` writes them (shared/MODELS.md has the
architectures and their parameter counts; `param_targets` holds those counts and a test
keeps every built model within 5% of them). They exist to make the service pay what the
game's real models cost: their trunks (LayerNorm MLPs, a BiLSTM with attention, ViT and
transformer encoders) are **random weights**. Their decisions are not random: each action
(or threat, or value) head adds the small network of the default demo profile, fitted to
the rule policy on the configured layout, to a trunk head scaled down to a hundredth. So the
service answers sensibly and computes what a real model computes.

Layouts follow the fork's code as MODELS.md reads it: post-norm encoder layers (PyTorch's
default), ReLU feed-forward, the inference path only (no dropout). What a model writes is
what the fork's exporter writes: ``<type>_fp16.onnx``, FP16 I/O, input ``state``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import onnx

from mltasks.contract import ARCHETYPES, MODEL_TYPES, N_ACTIONS, STATE_DIM
from mltasks.models.family import FAMILY, SEQUENCE_LEN
from mltasks.models.graph import Graph, Mlp, Precision, io

TRUNK_SCALE: Final = 0.01
"""The random trunk's head is scaled to a hundredth of the fitted head's typical logits."""


@dataclass(frozen=True, slots=True)
class Arch:
    """The size knobs of one type (the fork's default config, per archetype overrides)."""

    widths: tuple[int, ...] = ()
    depth: int = 0
    heads: int = 0
    dim: int = 0
    ff: int = 0
    extra: dict[str, int] = field(default_factory=dict)


_COMBAT = (1024, 1024, 512, 512, 256, 256, 128, 128, 64, 64)


def arch(archetype: str, model_type: str) -> Arch:
    """The default architecture of a type for an archetype (MODELS.md)."""
    if model_type == "combat_dqn":
        # tank: 12 x 1024 after the input layer (12.7M), as MODELS.md counts it
        return Arch(widths=(1024,) * 13 if archetype == "tank" else _COMBAT)
    if model_type == "movement_ppo":
        return Arch(widths=(1024, 1024, 512, 512, 256, 256), extra={"actor": 1})
    if model_type == "skill_dqn":
        return Arch(widths=(512, 256, 128), extra={"skills": 20, "embed": 32})
    if model_type == "threat_assessment":
        hidden = {"defensive": (352, 224), "tank": (512, 256)}.get(archetype, (256, 128))
        return Arch(widths=hidden)
    if model_type == "team_coordination":
        return Arch(depth=3, dim=256, heads=8, extra={"mlp": 256})
    if model_type == "spatial_vit":
        return Arch(depth=16 if archetype == "ranged" else 12, dim=192, heads=3, ff=768)
    if model_type == "temporal_transformer":
        return Arch(depth=4, dim=256, heads=8, ff=1024, extra={"positions": 500})
    if model_type == "pattern_recognition":
        return Arch(depth=6, dim=512, heads=16, ff=2048)
    if model_type == "soft_actor_critic":
        return Arch(widths=(256, 256, 256))
    raise ValueError(f"unknown model type {model_type!r}")


def param_targets(archetype: str, model_type: str) -> int:
    """The parameter count MODELS.md gives for a type's default config."""
    special = {
        ("tank", "combat_dqn"): 12_700_000,
        ("defensive", "threat_assessment"): 300_000,
        ("tank", "threat_assessment"): 500_000,
        ("ranged", "spatial_vit"): 7_140_000,
    }
    default = {
        "combat_dqn": 2_180_000,
        "movement_ppo": 2_190_000,
        "skill_dqn": 220_000,
        "threat_assessment": 150_000,
        "team_coordination": 5_030_000,
        "spatial_vit": 5_360_000,
        "temporal_transformer": 3_340_000,
        "pattern_recognition": 19_300_000,
        "soft_actor_critic": 460_000,
    }
    return special.get((archetype, model_type), default[model_type])


@dataclass(frozen=True, slots=True)
class Heads:
    """What the fitted part contributes: per output role, a network on the read slots."""

    actions: Mlp | None = None
    threat: Mlp | None = None
    value: tuple[np.ndarray, np.ndarray] | None = None  # linear: ([d, 1], [1])
    critics: tuple[Mlp, Mlp] | None = None
    rows: Sequence[int] = ()
    """Input rows the fitted heads read (read slots; for sequence types last, then first)."""


def _mlp_trunk(g: Graph, x: str, din: int, widths: Sequence[int], norm: bool) -> str:
    """Linear (-> LayerNorm) -> ReLU per width."""
    for w in widths:
        x = g.linear(x, din, w)
        if norm:
            x = g.layernorm(x, w)
        x = g.op("Relu", [x])
        din = w
    return x


def _plus_fitted(g: Graph, trunk: str, fitted: str, out: str) -> str:
    scaled = g.op("Mul", [trunk, g.const(TRUNK_SCALE)])
    return g.op("Add", [scaled, fitted], out)


def build(
    archetype: str,
    model_type: str,
    heads: Heads,
    width: int,
    rng: np.random.Generator,
    precision: Precision = "fp16",
) -> tuple[onnx.ModelProto, int]:
    """One Phase 11-size model and its parameter count."""
    sig = FAMILY[model_type]
    a = arch(archetype, model_type)
    g = Graph(f"{archetype}_{model_type}_phase11", rng)
    x = g.op("Identity", ["state"])
    names = list(sig.outputs)
    rows = list(heads.rows)

    if sig.input == "sequence":
        g.inputs.append(io("state", ["batch_size", SEQUENCE_LEN, STATE_DIM]))
        first = g.op("Gather", [x, g.const(0, np.int64)], axis=1)
        last = g.op("Gather", [x, g.const(SEQUENCE_LEN - 1, np.int64)], axis=1)
        both = g.op("Concat", [last, first], axis=1)
        assert heads.actions is not None
        fitted = g.mlp(both, rows, 2 * STATE_DIM, heads.actions)
        if model_type == "team_coordination":
            seq = g.op("Transpose", [x], perm=[1, 0, 2])  # [T, N, 64]
            din, h_ns = STATE_DIM, []
            for _ in range(a.depth):
                seq, h_n = g.lstm(seq, din, a.dim)
                h_ns.append(h_n)
                din = 2 * a.dim
            g.op("Concat", h_ns, names[1], axis=0)  # h_n: [layers x 2, N, 256]
            tokens = g.op("Transpose", [seq], perm=[1, 0, 2])  # [N, T, 512]
            attended = g.attention(tokens, din, a.heads)
            pooled = g.op("ReduceMean", [attended], axes=[1], keepdims=0)
            hidden = g.op("Relu", [g.linear(pooled, din, a.extra["mlp"])])
            trunk = g.linear(hidden, a.extra["mlp"], N_ACTIONS)
        else:
            positions = a.extra.get("positions", SEQUENCE_LEN)
            tokens = g.linear(x, STATE_DIM, a.dim)  # [N, T, dim]
            table = g.random((positions, a.dim), 0.02)
            pos = g.op("Slice", [table, g.const([0], np.int64), g.const([SEQUENCE_LEN], np.int64)])
            tokens = g.op("Add", [tokens, pos])
            for _ in range(a.depth):
                tokens = g.encoder_layer(tokens, a.dim, a.heads, a.ff)
            pooled = g.op("ReduceMean", [tokens], axes=[1], keepdims=0)
            trunk = g.linear(pooled, a.dim, N_ACTIONS)
        _plus_fitted(g, trunk, fitted, names[0])
        g.outputs.append(io(names[0], ["batch_size", N_ACTIONS]))
        if model_type == "team_coordination":
            g.outputs.append(io(names[1], [2 * a.depth, "batch_size", a.dim]))
        return g.model(precision, "mltasks.models.phase11"), g.params

    g.inputs.append(io("state", ["batch_size", STATE_DIM]))
    if model_type == "threat_assessment":
        assert heads.threat is not None
        outs = []
        for act in ("Relu", "Tanh", "LeakyRelu"):  # three MLPs, averaged
            h = x
            din = STATE_DIM
            for w in a.widths:
                h = g.op(act, [g.linear(h, din, w)])
                din = w
            outs.append(g.linear(h, din, 1))
        trunk = g.op("Mul", [g.op("Sum", outs), g.const(1.0 / 3.0)])
        _plus_fitted(g, trunk, g.mlp(x, rows, STATE_DIM, heads.threat), "output")
        g.outputs.append(io("output", ["batch_size", 1]))
        return g.model(precision, "mltasks.models.phase11"), g.params

    if model_type == "soft_actor_critic":
        assert heads.critics is not None
        g.inputs.append(io("action", ["batch_size", N_ACTIONS]))
        actor = _mlp_trunk(g, x, STATE_DIM, a.widths, norm=False)
        g.linear(actor, a.widths[-1], N_ACTIONS, "mean")
        g.linear(actor, a.widths[-1], N_ACTIONS, "log_std")
        g.outputs.append(io("mean", ["batch_size", N_ACTIONS]))
        g.outputs.append(io("log_std", ["batch_size", N_ACTIONS]))
        joint = g.op("Concat", [x, "action"], axis=1)
        for name, fitted_mlp in zip(("q1", "q2"), heads.critics, strict=True):
            trunk = g.linear(_mlp_trunk(g, joint, STATE_DIM + N_ACTIONS, a.widths, False), 256, 1)
            scores = g.mlp(x, rows, STATE_DIM, fitted_mlp, prefix=f"{name}_")
            picked = g.op("ReduceSum", [g.op("Mul", [scores, "action"]), g.const([1], np.int64)])
            _plus_fitted(g, trunk, picked, name)
            g.outputs.append(io(name, ["batch_size", 1]))
        return g.model(precision, "mltasks.models.phase11"), g.params

    assert heads.actions is not None
    fitted = g.mlp(x, rows, STATE_DIM, _pad(heads.actions, width))
    if model_type == "spatial_vit":
        patches = g.op("Reshape", [x, g.const([0, 8, 8], np.int64)])  # 8 patches of 8 values
        tokens = g.linear(patches, 8, a.dim)
        cls = g.random((1, 1, a.dim), 0.02)
        n = g.op("Gather", [g.op("Shape", [x]), g.const([0], np.int64)])
        shape = g.op("Concat", [n, g.const([1, a.dim], np.int64)], axis=0)
        tokens = g.op("Concat", [g.op("Expand", [cls, shape]), tokens], axis=1)
        tokens = g.op("Add", [tokens, g.random((1, 9, a.dim), 0.02)])
        for _ in range(a.depth):
            tokens = g.encoder_layer(tokens, a.dim, a.heads, a.ff)
        first = g.op("Gather", [g.layernorm(tokens, a.dim), g.const(0, np.int64)], axis=1)
        trunk = g.linear(first, a.dim, width)
    elif model_type == "skill_dqn":
        table = g.random((a.extra["skills"], a.extra["embed"]), 1.0)
        ids = g.const(np.zeros(1, dtype=np.int64), np.int64)  # no skill ids at export
        emb = g.op("Gather", [table, ids])  # [1, 32]
        n = g.op("Gather", [g.op("Shape", [x]), g.const([0], np.int64)])
        shape = g.op("Concat", [n, g.const([a.extra["embed"]], np.int64)], axis=0)
        joint = g.op("Concat", [x, g.op("Expand", [emb, shape])], axis=1)
        h = _mlp_trunk(g, joint, STATE_DIM + a.extra["embed"], a.widths, norm=False)
        trunk = g.linear(h, a.widths[-1], width)
    else:  # combat_dqn, movement_ppo
        h = g.layernorm(x, STATE_DIM) if model_type == "combat_dqn" else x
        h = _mlp_trunk(g, h, STATE_DIM, a.widths, norm=model_type == "combat_dqn")
        top = a.widths[-1]
        if model_type == "combat_dqn":  # dueling: V + A - mean(A)
            value = g.linear(h, top, 1)
            adv = g.linear(h, top, width)
            mean = g.op("ReduceMean", [adv], axes=[1], keepdims=1)
            trunk = g.op("Add", [value, g.op("Sub", [adv, mean])])
        else:
            actor = _mlp_trunk(g, h, top, (256, 128, 64), norm=False)
            trunk = g.linear(actor, 64, width)
            critic = g.linear(h, top, 1)
            assert heads.value is not None
            wv = np.zeros((STATE_DIM, 1), dtype=np.float32)
            wv[rows] = heads.value[0]
            fitted_value = g.op("Gemm", [x, g.const(wv), g.const(heads.value[1])])
            _plus_fitted(g, critic, fitted_value, "value")
    head = names[0]
    _plus_fitted(g, trunk, fitted, head)
    g.outputs.append(io(head, ["batch_size", width]))
    if "value" in sig.outputs:
        g.outputs.append(io("value", ["batch_size", 1]))
    return g.model(precision, "mltasks.models.phase11"), g.params


def _pad(m: Mlp, width: int) -> Mlp:
    """A 12-wide head: the extra columns score far below the rest, never the argmax."""
    extra = width - m.w2.shape[1]
    if extra <= 0:
        return m
    w2 = np.hstack([m.w2, np.zeros((m.w2.shape[0], extra), dtype=np.float32)])
    b2 = np.concatenate([m.b2, np.full(extra, -10.0, dtype=np.float32)])
    return Mlp(m.w1, m.b1, w2, b2)


def describe() -> Iterator[tuple[str, str, int]]:
    """(archetype, type, target parameters) for every model of the profile."""
    for archetype in ARCHETYPES:
        for model_type in MODEL_TYPES:
            yield archetype, model_type, param_targets(archetype, model_type)
