"""A hand-built SVTR/ViT-style transformer block, as PP-OCRv4 rec's neck and timm's ViT export it: one qkv MatMul
reshaped to [B, T, 3, H, d], transposed to [3, B, H, T, d], Q/K/V picked on the parts axis, scores, Softmax,
context, merge, output projection, residual, then an FFN (MatMul, x·Sigmoid(x), MatMul) and a residual.

Variants (keyword arguments of :func:`svtr_block`):
- ``pick``: how Q, K, V are picked — ``slice`` (Slice + Squeeze, Paddle), ``gather`` (Gather of a scalar,
  torch's unbind), ``split`` (Split into three + Squeeze);
- ``target``: the Reshape targets — ``constant`` ([0, 0, 3, H, d]) or ``paddle`` (Concat of Cast(int32
  constant) pieces and the sequence length read through Shape/Slice/Cast, as Paddle2ONNX writes them: ONNX
  shape inference then loses every rank after the Reshape);
- ``softmax``: ``last`` (Softmax(axis=-1)) or ``flat`` (Flatten(axis=3) → Softmax → Reshape to Shape(scores):
  onnx's version converter's spelling of an opset-12 Softmax(axis=3)).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.helpers import make_proto, randn, tensor_info

D, H, HEAD, FFN = 24, 4, 6, 40  # width, heads, head size, FFN neurons
QKV, PROJ, FC1, FC2 = "qkv/MatMul", "proj/MatMul", "fc1/MatMul", "fc2/MatMul"


def _target(name: str, tail: list[int], inits: list, nodes: list, form: str) -> str:
    """A Reshape target [0, T, *tail]: a constant, or Paddle's Concat of Cast pieces with T read from x."""
    if form == "constant":
        inits.append(numpy_helper.from_array(np.array([0, 0, *tail], np.int64), name))
        return name
    pieces = []
    for i, v in enumerate([0, None, *tail]):
        piece = f"{name}_p{i}"
        if v is None:  # the sequence length: Cast(Slice(Cast(Shape(x)), 1, 2)) as int64
            nodes += [helper.make_node("Shape", ["x"], [f"{name}_shape"]),
                      helper.make_node("Cast", [f"{name}_shape"], [f"{name}_shape32"], to=TensorProto.INT32),
                      helper.make_node("Slice", [f"{name}_shape32", "one", "two", "zero"], [f"{name}_t32"])]
            nodes.append(helper.make_node("Cast", [f"{name}_t32"], [piece], to=TensorProto.INT64))
        else:
            inits.append(numpy_helper.from_array(np.array([v], np.int32), f"{piece}_i32"))
            nodes.append(helper.make_node("Cast", [f"{piece}_i32"], [piece], to=TensorProto.INT64))
        pieces.append(piece)
    nodes.append(helper.make_node("Concat", pieces, [name], axis=0))
    return name


def _picks(nodes: list, inits: list, pick: str) -> list[str]:
    """Q, K, V picked from ``packed`` [3, B, H, T, d] on axis 0."""
    names = ["q", "k", "v"]
    if pick == "split":
        nodes.append(helper.make_node("Split", ["packed"], [f"{n}5" for n in names], axis=0))
        nodes += [helper.make_node("Squeeze", [f"{n}5", "zero"], [f"{n}4"]) for n in names]
        return [f"{n}4" for n in names]
    for i, n in enumerate(names):
        inits.append(numpy_helper.from_array(np.array([i], np.int64), f"{n}_lo"))
        inits.append(numpy_helper.from_array(np.array([i + 1], np.int64), f"{n}_hi"))
        if pick == "gather":
            inits.append(numpy_helper.from_array(np.array(i, np.int64), f"{n}_index"))
            nodes.append(helper.make_node("Gather", ["packed", f"{n}_index"], [f"{n}4"], axis=0))
        else:
            nodes += [helper.make_node("Slice", ["packed", f"{n}_lo", f"{n}_hi", "zero"], [f"{n}5"]),
                      helper.make_node("Squeeze", [f"{n}5", "zero"], [f"{n}4"])]
    return [f"{n}4" for n in names]


def svtr_block(pick: str = "slice", target: str = "constant", softmax: str = "last", seed: int = 0,
               opset: int = 17) -> onnx.ModelProto:
    """The block (see the module); x and y are [B, T, D] with B and T dynamic."""
    w = lambda shape, k, scale=0.3: (randn(shape, seed + k) * scale).astype(np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(a, n) for n, a in (
        ("w_qkv", w((D, 3 * D), 1)), ("b_qkv", w((3 * D,), 2, 0.1)), ("w_proj", w((D, D), 3)),
        ("b_proj", w((D,), 4, 0.1)), ("w_fc1", w((D, FFN), 5)), ("b_fc1", w((FFN,), 6, 0.1)),
        ("w_fc2", w((FFN, D), 7)), ("b_fc2", w((D,), 8, 0.1)))]
    inits += [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in (("zero", 0), ("one", 1), ("two", 2))]
    inits.append(numpy_helper.from_array(np.array(HEAD ** -0.5, np.float32), "scale"))
    nodes = [helper.make_node("MatMul", ["x", "w_qkv"], ["qkv_mm"], name=QKV),
             helper.make_node("Add", ["qkv_mm", "b_qkv"], ["qkv"], name="qkv/Add")]
    split = _target("split_shape", [3, H, HEAD], inits, nodes, target)
    nodes += [helper.make_node("Reshape", ["qkv", split], ["qkv5"], name="split"),
              helper.make_node("Transpose", ["qkv5"], ["packed"], perm=[2, 0, 3, 1, 4])]
    q, k, v = _picks(nodes, inits, pick)
    nodes += [helper.make_node("Mul", [q, "scale"], ["q_scaled"]),
              helper.make_node("Transpose", [k], ["k_t"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q_scaled", "k_t"], ["scores"], name="scores/MatMul")]
    if softmax == "flat":
        nodes += [helper.make_node("Shape", ["scores"], ["scores_shape"]),
                  helper.make_node("Flatten", ["scores"], ["scores_2d"], axis=3),
                  helper.make_node("Softmax", ["scores_2d"], ["probs_2d"], axis=-1),
                  helper.make_node("Reshape", ["probs_2d", "scores_shape"], ["probs"])]
    else:
        nodes.append(helper.make_node("Softmax", ["scores"], ["probs"], axis=-1))
    merge = _target("merge_shape", [D], inits, nodes, target)
    nodes += [helper.make_node("MatMul", ["probs", v], ["context4"], name="context/MatMul"),
              helper.make_node("Transpose", ["context4"], ["context_t"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["context_t", merge], ["context"], name="merge"),
              helper.make_node("MatMul", ["context", "w_proj"], ["proj_mm"], name=PROJ),
              helper.make_node("Add", ["proj_mm", "b_proj"], ["proj"]),
              helper.make_node("Add", ["x", "proj"], ["h"]),
              helper.make_node("MatMul", ["h", "w_fc1"], ["fc1_mm"], name=FC1),
              helper.make_node("Add", ["fc1_mm", "b_fc1"], ["fc1"], name="fc1/Add"),
              helper.make_node("Sigmoid", ["fc1"], ["fc1_sig"]),
              helper.make_node("Mul", ["fc1", "fc1_sig"], ["swish"]),
              helper.make_node("MatMul", ["swish", "w_fc2"], ["fc2_mm"], name=FC2),
              helper.make_node("Add", ["fc2_mm", "b_fc2"], ["fc2"]),
              helper.make_node("Add", ["h", "fc2"], ["y"])]
    arrays = {t.name: numpy_helper.to_array(t) for t in inits}
    dims = ["B", "T", D]
    return make_proto(nodes, [tensor_info("x", np.float32, dims)], [tensor_info("y", np.float32, dims)], arrays,
                      opset=opset)


def block_feeds(batch: int, sequence: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": randn((batch, sequence, D), seed)}
