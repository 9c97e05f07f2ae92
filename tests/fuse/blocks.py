"""Small BERT-like encoder blocks built with onnx.helper, spelled as exporters write them (for the fuse tests).

``encoder_block(style)`` returns a model (shapes inferred, as canonicalize leaves it) and feeds:

- ``sdpa``: torch 2.x's SDPA export (transformers ≥ 4.48, legacy exporter): head splits to Concat(Shape-derived
  batch and sequence, -1, head size), K transposed by perm [0, 2, 3, 1], sqrt of the scale on Q and on Kᵀ, a
  boolean padding mask made additive with Where(mask, 0, -inf), the IsNaN guard after Softmax, an identity
  Reshape after P·V whose target comes from Shapes of Q, V and P·V; post-norm residual blocks; Erf GELU.
- ``eager``: older eager attention: constant head-split targets [0, 0, heads, d], K through two Transposes,
  scores divided by sqrt(d), the mask (1 - m) · -10000 of shape [b, 1, 1, t]; tanh GELU.
- ``prenorm``: a ViT/Whisper-style pre-norm block: no mask, Q scaled before its head split, K without bias, the
  residual sum read again after its LayerNorm.
- ``dynamo``: torch's dynamo exporter: head-split targets from the Shape of another input (``attention_mask``,
  equal dims by name only), Kᵀ as Reshape to 3-D → Transpose → Reshape back (targets from Slices of a Shape), the
  mask Where(mask, 0, float32 min), allowzero=1 on the head Reshapes.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper

from graphopt.graphs import infer_shapes
from tests.helpers import make_model, randn, tensor_info

BATCH, SEQ, HIDDEN, HEADS, FFN = 3, 6, 16, 2, 24
SIZE = HIDDEN // HEADS


class Builder:
    """Nodes and initializers, each op's output named after a counter."""

    def __init__(self, seed: int = 0) -> None:
        self.nodes: list = []
        self.inits: dict[str, np.ndarray] = {}
        self.count = 0
        self.seed = seed

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        self.count += 1
        out = f"{op_type.lower()}{self.count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, value, dtype=np.float32) -> str:
        self.count += 1
        name = f"c{self.count}"
        self.inits[name] = np.asarray(value, dtype)
        return name

    def weight(self, *shape: int, scale: float = 0.3) -> str:
        self.seed += 1
        return self.const(randn(list(shape), seed=self.seed) * scale)

    def linear(self, x: str, n_in: int, n_out: int, bias: bool = True) -> str:
        y = self.op("MatMul", x, self.weight(n_in, n_out))
        return self.op("Add", self.weight(n_out, scale=0.1), y) if bias else y

    def dim(self, x: str, axis: int) -> str:
        """Unsqueeze(Gather(Shape(x), axis)): one entry of a shape the export computes."""
        return self.op("Unsqueeze", self.op("Gather", self.op("Shape", x), self.const(axis, np.int64), axis=0),
                       self.const([0], np.int64))

    def layernorm(self, x: str) -> str:
        return self.op("LayerNormalization", x, self.const(1 + 0.1 * randn([HIDDEN], seed=90 + self.count)),
                       self.const(0.1 * randn([HIDDEN], seed=91 + self.count)), axis=-1, epsilon=1e-12)


def _gelu(b: Builder, x: str, tanh: bool) -> str:
    if tanh:  # 0.5 * (x * (1 + Tanh(beta * (x + kappa * x^3))))
        cube = b.op("Mul", x, b.op("Mul", x, x))
        inner = b.op("Mul", b.const(math.sqrt(2 / math.pi)), b.op("Add", x, b.op("Mul", b.const(0.044715), cube)))
        return b.op("Mul", b.const(0.5), b.op("Mul", x, b.op("Add", b.const(1.0), b.op("Tanh", inner))))
    erf = b.op("Erf", b.op("Div", x, b.const(math.sqrt(2))))
    return b.op("Mul", b.op("Mul", x, b.op("Add", erf, b.const(1.0))), b.const(0.5))


def _split(b: Builder, x: str, y: str, style: str, perm: list[int]) -> str:
    """[b, s, hidden] → heads, then Transpose(perm)."""
    if style == "eager":
        target = b.const([0, 0, HEADS, SIZE], np.int64)
    elif style == "dynamo":  # batch and sequence from the Shape of the mask input: the same dims by name
        whole = b.op("Shape", "attention_mask", start=0)
        target = b.op("Concat", whole, b.const([-1, SIZE], np.int64), axis=0)
    else:
        target = b.op("Concat", b.dim(x, 0), b.dim(x, 1), b.const([-1], np.int64), b.const([SIZE], np.int64), axis=0)
    return b.op("Transpose", b.op("Reshape", y, target, allowzero=int(style == "dynamo")), perm=perm)


def _transposed_in_3d(b: Builder, k: str) -> str:
    """[b, n, t, d] → [b, n, d, t] the dynamo way: Reshape to [b·n, t, d], Transpose, Reshape back."""
    shape = b.op("Shape", k, start=0)
    last, second = (b.op("Slice", shape, b.const([lo], np.int64), b.const([hi], np.int64))
                    for lo, hi in ((-1, 2 ** 63 - 1), (-2, -1)))
    lead = b.op("Slice", shape, b.const([-2 ** 63], np.int64), b.const([-2], np.int64))
    flat = b.op("Reshape", k, b.op("Concat", b.const([-1], np.int64), second, last, axis=0))
    return b.op("Reshape", b.op("Transpose", flat, perm=[0, 2, 1]), b.op("Concat", lead, last, second, axis=0))


def _attention(b: Builder, x: str, mask: str | None, style: str, scale_last: bool = False) -> str:
    q3 = b.linear(x, HIDDEN, HIDDEN)
    if style == "prenorm":
        q3 = b.op("Mul", q3, b.const(SIZE ** -0.5))  # Whisper scales Q before its split
    k3 = b.linear(x, HIDDEN, HIDDEN, bias=style != "prenorm")
    v3 = b.linear(x, HIDDEN, HIDDEN)
    q = _split(b, x, q3, style, [0, 2, 1, 3])
    v = _split(b, x, v3, style, [0, 2, 1, 3])
    if style in ("sdpa", "dynamo"):
        root = b.const(SIZE ** -0.25 if not scale_last else 1.0)
        kt = _split(b, x, k3, style, [0, 2, 3, 1]) if style == "sdpa" else \
            _transposed_in_3d(b, _split(b, x, k3, style, [0, 2, 1, 3]))
        scores = b.op("MatMul", b.op("Mul", q, root), b.op("Mul", kt, root))
    else:
        kt = b.op("Transpose", _split(b, x, k3, style, [0, 2, 1, 3]), perm=[0, 1, 3, 2])
        scores = b.op("MatMul", q, kt)
        if style == "eager":
            scores = b.op("Div", scores, b.const(math.sqrt(SIZE)))
    if mask is not None:
        scores = b.op("Add", scores, mask)
    if scale_last:  # the mask scaled too: not what MultiHeadAttention computes
        scores = b.op("Mul", scores, b.const(SIZE ** -0.5))
    probs = b.op("Softmax", scores, axis=-1)
    if style in ("sdpa", "dynamo"):
        probs = b.op("Where", b.op("IsNaN", probs), b.const([0.0]), probs)
    context = b.op("MatMul", probs, v)
    if style == "sdpa":  # the identity Reshape torch's SDPA export writes
        same = b.op("Concat", b.dim(context, 0), b.const([-1], np.int64), b.dim(q, 2), b.dim(v, 3), axis=0)
        context = b.op("Reshape", context, same)
    merged = b.op("Transpose", context, perm=[0, 2, 1, 3])
    target = b.const([0, 0, HIDDEN], np.int64) if style == "eager" else \
        b.op("Concat", b.dim(x, 0), b.dim(x, 1), b.const([-1], np.int64), axis=0)
    return b.linear(b.op("Reshape", merged, target, allowzero=int(style == "dynamo")), HIDDEN, HIDDEN)


def _mask(b: Builder, x: str, style: str) -> str | None:
    if style == "sdpa":  # bool [b, 1, s, t] → Where(mask, 0, -inf)
        flag = b.op("Cast", b.op("Unsqueeze", "attention_mask", b.const([1, 2], np.int64)), to=TensorProto.BOOL)
        shape = b.op("Concat", b.dim(x, 0), b.const([1], np.int64), b.dim(x, 1), b.dim(x, 1), axis=0)
        return b.op("Where", b.op("Expand", flag, shape), b.const([0.0]), b.const([-np.inf]))
    if style == "dynamo":  # bool [b, 1, 1, t] → Where(mask, 0, float32 min)
        flag = b.op("Cast", b.op("Unsqueeze", "attention_mask", b.const([1, 2], np.int64)), to=TensorProto.BOOL)
        return b.op("Where", flag, b.const(0.0), b.const(np.finfo(np.float32).min))
    if style == "eager":  # (1 - m) * -10000, [b, 1, 1, t]
        m = b.op("Cast", b.op("Unsqueeze", "attention_mask", b.const([1, 2], np.int64)), to=TensorProto.FLOAT)
        return b.op("Mul", b.op("Sub", b.const(1.0), m), b.const(-10000.0))
    return None


def encoder_block(style: str, scale_last: bool = False) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """One encoder layer of the given style (see the module), shapes inferred; and feeds with a full row, a padded
    row and, with a mask, a row masked entirely. ``scale_last``: the scale applied after the mask (sdpa)."""
    b = Builder()
    x = "x"
    mask = _mask(b, x, style)
    tanh = style == "eager"
    if style == "prenorm":
        h = b.op("Add", x, _attention(b, b.layernorm(x), None, style))
        ffn = b.linear(_gelu(b, b.linear(b.layernorm(h), HIDDEN, FFN), tanh), FFN, HIDDEN)
        out = b.op("Add", h, ffn)
    else:
        h = b.layernorm(b.op("Add", _attention(b, x, mask, style, scale_last), x))
        ffn = b.linear(_gelu(b, b.linear(h, HIDDEN, FFN), tanh), FFN, HIDDEN)
        out = b.layernorm(b.op("Add", ffn, h))
    assert b.nodes[-1].output[0] == out
    b.nodes[-1].output[0] = "y"
    inputs = [tensor_info("x", np.float32, ["batch", "sequence", HIDDEN])]
    feeds = {"x": randn([BATCH, SEQ, HIDDEN], seed=7)}
    if mask is not None:
        inputs.append(tensor_info("attention_mask", np.int64, ["batch", "sequence"]))
        attention = np.ones((BATCH, SEQ), np.int64)
        attention[1, 4:] = 0
        attention[2, :] = 0
        feeds["attention_mask"] = attention
    model = make_model(b.nodes, inputs, [tensor_info("y", np.float32, ["batch", "sequence", HIDDEN])],
                       initializers=b.inits, opset=17)
    infer_shapes(model)
    return model, feeds
