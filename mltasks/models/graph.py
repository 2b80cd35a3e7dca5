"""Building ONNX graphs in the exporter's form, with the onnx helper (no torch).

The demo models (`mltasks.models.demo`) and the Phase 11-size models
(`mltasks.models.phase11`) are built here: FP32 weights in numpy, the graph with
``onnx.helper``, then converted to FP16 with onnxconverter-common, inputs and outputs
included, as the fork's exporter writes them (opset 17).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

FloatArray = npt.NDArray[np.float32]
Precision = Literal["fp16", "fp32"]

OPSET: Final = 17
IR_VERSION: Final = 8
"""IR 8 pairs with opset 17 and loads in every onnxruntime >= 1.13."""


@dataclass(frozen=True, slots=True)
class Mlp:
    """Fitted weights in the exported layout: y = relu(x @ w1 + b1) @ w2 + b2."""

    w1: FloatArray  # [d, H]
    b1: FloatArray  # [H]
    w2: FloatArray  # [H, out]
    b2: FloatArray  # [out]


def io(name: str, shape: Sequence[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


class Graph:
    """A graph under construction; `model` converts it to the exporter's FP16."""

    def __init__(self, name: str, rng: np.random.Generator | None = None) -> None:
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.rng = rng or np.random.default_rng(0)
        self.params = 0
        self._n = 0

    # -- primitives ----------------------------------------------------------------------

    def const(self, value: npt.ArrayLike, dtype: npt.DTypeLike = np.float32, name: str = "") -> str:
        self._n += 1
        name = name or f"c{self._n}"
        arr = np.asarray(value, dtype=dtype)
        if arr.dtype == np.float32:
            self.params += int(arr.size)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        out: str | None = None,
        **attrs: Any,
    ) -> str:
        self._n += 1
        out = out or f"t{self._n}"
        node = helper.make_node(op_type, list(inputs), [out])
        node.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
        self.nodes.append(node)
        return out

    def ops(self, op_type: str, inputs: Sequence[str], n_out: int, **attrs: Any) -> list[str]:
        """A node with several outputs."""
        self._n += 1
        outs = [f"t{self._n}_{i}" for i in range(n_out)]
        node = helper.make_node(op_type, list(inputs), outs)
        node.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
        self.nodes.append(node)
        return outs

    def random(self, shape: Sequence[int], scale: float) -> str:
        return self.const(self.rng.standard_normal(tuple(shape)) * scale)

    # -- layers (random weights) ---------------------------------------------------------

    def linear(self, x: str, din: int, dout: int, out: str | None = None, gain: float = 1.0) -> str:
        """x @ W + b for x [..., din]; weights ~ N(0, gain^2 / din)."""
        w = self.random((din, dout), gain / math.sqrt(din))
        b = self.const(np.zeros(dout))
        return self.op("Add", [self.op("MatMul", [x, w]), b], out)

    def layernorm(self, x: str, d: int) -> str:
        return self.op(
            "LayerNormalization", [x, self.const(np.ones(d)), self.const(np.zeros(d))], axis=-1
        )

    def attention(self, x: str, d: int, heads: int) -> str:
        """Multi-head self-attention over x [N, T, d] (PyTorch's layout of weights)."""
        dh = d // heads
        split = self.const([0, 0, heads, dh], np.int64)
        merge = self.const([0, 0, d], np.int64)

        def project(name: str) -> str:
            y = self.op("Reshape", [self.linear(x, d, d), split])
            return self.op("Transpose", [y], perm=[0, 2, 1, 3] if name != "k" else [0, 2, 3, 1])

        q, k, v = project("q"), project("k"), project("v")
        scores = self.op("Mul", [self.op("MatMul", [q, k]), self.const(1.0 / math.sqrt(dh))])
        weights = self.op("Softmax", [scores], axis=-1)
        ctx = self.op("Transpose", [self.op("MatMul", [weights, v])], perm=[0, 2, 1, 3])
        return self.linear(self.op("Reshape", [ctx, merge]), d, d)

    def encoder_layer(self, x: str, d: int, heads: int, ff: int) -> str:
        """A post-norm transformer encoder layer (``nn.TransformerEncoderLayer``'s default)."""
        x = self.layernorm(self.op("Add", [x, self.attention(x, d, heads)]), d)
        hidden = self.op("Relu", [self.linear(x, d, ff)])
        return self.layernorm(self.op("Add", [x, self.linear(hidden, ff, d)]), d)

    def lstm(self, x: str, din: int, hidden: int) -> tuple[str, str]:
        """One bidirectional LSTM layer over x [T, N, din]: (Y [T, N, 2h], Y_h [2, N, h])."""
        w = self.random((2, 4 * hidden, din), 1 / math.sqrt(hidden))
        r = self.random((2, 4 * hidden, hidden), 1 / math.sqrt(hidden))
        b = self.const(np.zeros((2, 8 * hidden)))
        y, y_h = self.ops("LSTM", [x, w, r, b], 2, hidden_size=hidden, direction="bidirectional")
        # Y [T, 2, N, h] -> [T, N, 2, h] -> [T, N, 2h]
        y = self.op("Transpose", [y], perm=[0, 2, 1, 3])
        return self.op("Reshape", [y, self.const([0, 0, 2 * hidden], np.int64)]), y_h

    # -- the fitted decision head --------------------------------------------------------

    def mlp(
        self,
        x: str,
        rows: Sequence[int],
        width: int,
        m: Mlp,
        out: str | None = None,
        prefix: str = "",
    ) -> str:
        """Gemm -> Relu -> Gemm of ``m`` (weights ``<prefix>w1`` .. ``<prefix>b2``), its
        first layer scattered onto ``rows`` of an input ``width`` wide (zeros elsewhere)."""
        w1 = np.zeros((width, m.w1.shape[1]), dtype=np.float32)
        w1[list(rows)] = m.w1
        layer1 = [x, self.const(w1, name=f"{prefix}w1"), self.const(m.b1, name=f"{prefix}b1")]
        hidden = self.op("Relu", [self.op("Gemm", layer1)])
        layer2 = [
            hidden,
            self.const(m.w2, name=f"{prefix}w2"),
            self.const(m.b2, name=f"{prefix}b2"),
        ]
        return self.op("Gemm", layer2, out)

    # -- the file ------------------------------------------------------------------------

    def model(self, precision: Precision = "fp16", producer: str = "mltasks") -> onnx.ModelProto:
        from onnxconverter_common import float16  # type: ignore[import-untyped]

        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.inits)
        model = helper.make_model(
            graph,
            producer_name=producer,
            producer_version="2",
            opset_imports=[helper.make_opsetid("", OPSET)],
        )
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model)
        if precision == "fp32":
            return model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tiny weights clamped to FP16's range
            half = float16.convert_float_to_float16(model, keep_io_types=False)
        half.ir_version = IR_VERSION
        onnx.checker.check_model(half)
        out: onnx.ModelProto = half
        return out
