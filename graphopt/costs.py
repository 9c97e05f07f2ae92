"""Model statistics from shapes: parameters and MACs per layer.

MACs come from the value dims graphopt.shapes infers on a weight-less copy of the model (the model given is never
modified): every Conv/ConvTranspose/Gemm/MatMul-like node, Einsum, fused attention, and MatMuls between two
activations (a transformer's Q·Kᵀ and scores·V) alike, at the input shapes given (batch 1 unless given).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import onnx_ir as ir

from graphopt.graphs import all_graphs, is_default_domain
from graphopt.shapes import DEFAULT_DIM, Dims, resolve_input_shapes, value_dims

__all__ = [
    "DEFAULT_DIM",
    "Dims",
    "LayerCost",
    "count_macs",
    "count_params",
    "is_constant",
    "value_dims",
    "layer_costs",
    "resolve_input_shapes",
    "stored_tensors",
]

# op_type -> (kind, index of the activation input, index of the weight input, index of the bias input)
_COMPUTE_OPS: dict[str, tuple[str, int, int, int | None]] = {
    "Conv": ("conv", 0, 1, 2),
    "FusedConv": ("conv", 0, 1, 2),
    "ConvInteger": ("conv", 0, 1, None),
    "QLinearConv": ("conv", 0, 3, 8),
    "ConvTranspose": ("convT", 0, 1, 2),
    "Gemm": ("gemm", 0, 1, 2),
    "QGemm": ("gemm", 0, 3, 6),
    "MatMul": ("matmul", 0, 1, None),
    "FusedMatMul": ("matmul", 0, 1, None),
    "MatMulInteger": ("matmul", 0, 1, None),
    "QLinearMatMul": ("matmul", 0, 3, None),
    "MatMulIntegerToFloat": ("matmul", 0, 1, 6),
    "DynamicQuantizeMatMul": ("matmul", 0, 1, 4),
    "MatMulNBits": ("nbits", 0, 1, 5),
    "Einsum": ("einsum", 0, 1, None),
    "Attention": ("attention", 0, 1, 2),  # com.microsoft's with the QKV projection; ONNX's (opset 23) without
    "MultiHeadAttention": ("mha", 0, 1, None),  # com.microsoft: Q·Kᵀ and scores·V of given Q, K, V
}


@dataclass
class LayerCost:
    node: str
    op: str
    macs: int
    params: int
    output_shape: tuple[int, ...] | None
    note: str = ""  # why macs is 0 (shape unknown), empty otherwise


# ---------------------------------------------------------------- parameters


def _numel(shape: Sequence[int | None] | None) -> int | None:
    if shape is None or any(not isinstance(d, int) for d in shape):
        return None
    return math.prod(shape)


def _ir_dims(value: ir.Value) -> Dims | None:
    if value.const_value is not None:
        return tuple(value.const_value.shape.numpy())
    if value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else None for d in value.shape.dims)


def stored_tensors(model: ir.Model) -> list[tuple[str, ir.TensorProtocol]]:
    """(name, tensor) of every initializer and Constant-node ``value``, subgraphs included.

    Constant nodes count because un-canonicalized exports (Paddle, older PyTorch) keep their weights there.
    """
    found = []
    for graph in all_graphs(model):
        for value in graph.initializers.values():
            if value.const_value is not None:
                found.append((value.name, value.const_value))
        for node in graph:
            attr = node.attributes.get("value")
            if node.op_type == "Constant" and is_default_domain(node) and attr is not None:
                if attr.type == ir.AttributeType.TENSOR:
                    found.append((node.outputs[0].name or node.name or "", attr.as_tensor()))
    return found


def count_params(model: ir.Model) -> int:
    """Elements of all initializers and Constant tensors, subgraphs included (int8 counts like float)."""
    return sum(math.prod(tensor.shape.numpy()) for _, tensor in stored_tensors(model))


# ---------------------------------------------------------------- MACs


def is_constant(value: ir.Value, memo: dict[int, bool]) -> bool:
    """True when the value depends on initializers/Constants only (a weight, perhaps dequantized or decoded)."""
    key = id(value)
    if key in memo:
        return memo[key]
    memo[key] = False  # guards against cycles in malformed graphs
    producer = value.producer()
    if value.const_value is not None or value.is_initializer():
        result = True
    elif producer is None:
        result = False
    elif producer.op_type == "Constant" and is_default_domain(producer):
        result = True
    else:
        inputs = [v for v in producer.inputs if v is not None]
        result = bool(inputs) and all(is_constant(v, memo) for v in inputs)
    memo[key] = result
    return result


def _dims(value: ir.Value | None, shapes: dict[str, Dims]) -> Dims | None:
    if value is None:
        return None
    dims = shapes.get(value.name)
    if dims is not None and all(d is not None for d in dims):
        return dims
    own = _ir_dims(value)  # the model's own annotation, e.g. for ops ONNX cannot infer
    if own is not None and all(d is not None for d in own):
        return own
    return dims


def _input(node: ir.Node, index: int | None) -> ir.Value | None:
    if index is None or index >= len(node.inputs):
        return None
    return node.inputs[index]


def _macs(kind: str, node: ir.Node, x: Dims | None, w: Dims | None, out: Dims | None) -> int | None:
    if kind == "conv":  # every output element: (C/group) * prod(kernel) MACs
        if _numel(out) is None or _numel(w) is None or len(w) < 2:
            return None
        return math.prod(out) * math.prod(w[1:])
    if kind == "convT":  # every input element scatters into (M/group) * prod(kernel) outputs
        if _numel(x) is None or _numel(w) is None or len(w) < 2:
            return None
        return math.prod(x) * math.prod(w[1:])
    if kind == "nbits":
        k = node.attributes.get("K")
        return math.prod(out) * k.as_int() if _numel(out) is not None and k is not None else None
    k_dim = _k_dim(node, x, w)
    if _numel(out) is None or k_dim is None:
        return None
    return math.prod(out) * k_dim  # every output element of a (batched) matrix product: K MACs


def _flag(node: ir.Node, name: str) -> bool:
    attr = node.attributes.get(name)
    return attr is not None and attr.as_int() == 1


def _k_dim(node: ir.Node, a: Dims | None, b: Dims | None) -> int | None:
    """The contracted dimension of A @ B (Gemm/FusedMatMul transA/transB honoured, 1-D operands too)."""
    if a:
        k = a[0] if len(a) == 1 else a[-2 if _flag(node, "transA") else -1]
        if k is not None:
            return k
    if b:
        return b[0] if len(b) == 1 else b[-1 if _flag(node, "transB") else -2]
    return None


def _einsum_macs(equation: str, operands: list[Dims | None], out: Dims | None) -> int | None:
    """Output elements × the sizes of the contracted letters (× operands - 1 beyond two); 0 for one operand."""
    terms, _, result = equation.replace(" ", "").partition("->")
    inputs = terms.split(",")
    if _numel(out) is None or len(inputs) != len(operands):
        return None
    if len(inputs) < 2:
        return 0
    letters = [c for c in terms if c.isalpha()]
    kept = set(result) if "->" in equation else {c for c in letters if letters.count(c) == 1}
    sizes: dict[str, int] = {}
    for subscript, dims in zip(inputs, operands):
        if dims is None or None in dims:
            return None
        head, dots, tail = subscript.partition("...")
        for i, c in enumerate(head):
            sizes[c] = max(sizes.get(c, 1), dims[i])
        for i, c in enumerate(reversed(tail if dots else "")):
            sizes[c] = max(sizes.get(c, 1), dims[-1 - i])
    contracted = math.prod(sizes.get(c, 1) for c in set(letters) - kept)
    return math.prod(out) * contracted * (len(inputs) - 1)


def _operand_macs(kind: str, node: ir.Node, shapes: dict[str, Dims], out: Dims | None) -> int | None:
    """MACs of ops read from all their operands: Einsum, and fused attention — onnxruntime's Attention (QKV
    projection, Q·Kᵀ and scores·V), MultiHeadAttention and ONNX's Attention (Q·Kᵀ and scores·V of given Q, K, V:
    [B, S, D] or [B, heads, S, d])."""
    dims = [_dims(v, shapes) for v in node.inputs]
    if kind == "einsum":
        equation = node.attributes.get("equation")
        return _einsum_macs(equation.as_string(), dims, out) if equation is not None else None
    if _numel(out) is None or len(out) < 3:
        return None
    rows = math.prod(out[:-1])  # query positions (× heads for [B, heads, S, d])
    if kind == "attention" and node.domain == "com.microsoft":  # input [B, S, D_in] · weights [D_in, Q+K+V]
        w = dims[1] if len(dims) > 1 else None
        if w is None or len(w) != 2:
            return None
        sizes = node.attributes.get("qkv_hidden_sizes")
        d_q = sizes.as_ints()[0] if sizes is not None else w[1] // 3
        return rows * w[0] * w[1] + rows * out[1] * (d_q + out[-1])
    query, key = dims[0], dims[1] if len(dims) > 1 else None
    if query is None or key is None or len(key) != len(out) or None in key:
        return None
    return rows * key[-2] * (query[-1] + out[-1])


def layer_costs(model: ir.Model, input_shapes: dict[str, tuple[int, ...]] | None = None) -> list[LayerCost]:
    """MACs and weight elements of each Conv/ConvTranspose/Gemm/MatMul-like node, If/Loop bodies included."""
    shapes = value_dims(model, input_shapes)
    memo: dict[int, bool] = {}
    costs = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        spec = _COMPUTE_OPS.get(node.op_type)
        if spec is None or not node.outputs:
            continue
        kind, xi, wi, bi = spec
        x, w, b = _input(node, xi), _input(node, wi), _input(node, bi)
        x_dims, w_dims, out_dims = _dims(x, shapes), _dims(w, shapes), _dims(node.outputs[0], shapes)
        params = 0
        for value, dims in ((x, x_dims), (w, w_dims), (b, _dims(b, shapes))):
            if value is not None and is_constant(value, memo):
                params += _numel(dims) or 0
        if kind == "nbits" and w is not None:  # packed blocks: count the logical N x K weight
            n, k = node.attributes.get("N"), node.attributes.get("K")
            if n is not None and k is not None:
                params += n.as_int() * k.as_int() - (_numel(w_dims) or 0)
        macs = _macs(kind, node, x_dims, w_dims, out_dims) if kind not in ("einsum", "attention", "mha") \
            else _operand_macs(kind, node, shapes, out_dims)
        note = "" if macs is not None else "shape unknown (symbolic dims? pass input shapes)"
        out = out_dims if _numel(out_dims) is not None else None
        name = node.name or node.outputs[0].name or ""
        costs.append(LayerCost(name, node.op_type, macs or 0, params, out, note))  # type: ignore[arg-type]
    return costs


def count_macs(model: ir.Model, input_shapes: dict[str, tuple[int, ...]] | None = None) -> int:
    return sum(cost.macs for cost in layer_costs(model, input_shapes))
