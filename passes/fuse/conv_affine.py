"""conv_affine: a Conv whose only consumer is Mul/Add/Sub/Div by a per-channel constant, folded into W and b.

PP-LCNet's learnable affine blocks leave such pairs, and onnxruntime does not fold them. The anchor of a site is
a Conv feeding a Mul/Add/Sub/Div by a constant; past it, a check that fails (the constant varies along other
axes, the output has other consumers, the dtypes differ…) is a near-miss with its reason.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.graphs import is_default_domain
from graphopt.passes.fuse.match import Miss, const, fail, near
from graphopt.weights import constant_array, encoding_of, owned_initializer, replace_initializer, set_initializer


def _affine_constant(graph: ir.Graph, use: ir.Usage, out: ir.Value) -> tuple[ir.Node, np.ndarray] | None:
    """(the consumer, its constant) when ``use`` is a Mul/Add (either side) or Sub/Div (as the left operand)
    by a constant in this graph, else None."""
    user = use.node
    if user.graph is not graph or not is_default_domain(user) or len(user.inputs) != 2:
        return None
    if user.op_type in ("Mul", "Add"):
        other = user.inputs[1 - use.idx]
    elif user.op_type in ("Sub", "Div") and use.idx == 0:
        other = user.inputs[1]
    else:
        return None
    c = const(other) if other is not out else None
    return None if c is None else (user, c)


def fold_one(graph: ir.Graph, conv: ir.Node, notes: list[str]) -> ir.Node | Miss:
    """Fold the conv's single Mul/Add/Sub/Div-by-constant consumer into W and b; the consumer folded, or a Miss.

    The consumer is removed from the graph; the caller marks the conv."""
    out = conv.outputs[0]
    uses = list(out.uses())
    if not any(_affine_constant(graph, use, out) for use in uses):
        return fail("no Mul/Add/Sub/Div-by-constant consumer")
    if out.is_graph_output():
        return near("the Conv output is also a graph output", conv)
    if len(uses) != 1:
        return near("the Conv output has other consumers too", conv)
    user, c = _affine_constant(graph, uses[0], out)
    weight = conv.inputs[1]
    w = constant_array(weight)
    if w is None or not np.issubdtype(w.dtype, np.floating):
        return near("the Conv weight is not a float constant", conv)
    if c.dtype != w.dtype:
        return near(f"{user.op_type} constant is {c.dtype}, the weight {w.dtype}", conv)
    if encoding_of(weight) is not None:
        notes.append(f"conv_affine: {conv.name}: weight is {encoding_of(weight)}-encoded; left alone")
        return fail("the weight is in a compressed form")
    vec = _per_channel(c, w.ndim, w.shape[0])
    bias = conv.inputs[2] if len(conv.inputs) > 2 else None
    b = constant_array(bias) if bias is not None else np.zeros(w.shape[0], dtype=w.dtype)
    if vec is None:
        return near(f"{user.op_type} constant of shape {list(c.shape)} is not per output channel", conv)
    if b is None:
        return near("the Conv bias is not a constant", conv)
    if user.op_type == "Div" and not np.all(vec):
        return near("Div by a constant with zeros", conv)
    _fold(graph, conv, user, w, b, vec, bias is not None, c.dtype)
    return user


def _fold(graph: ir.Graph, conv: ir.Node, user: ir.Node, w: np.ndarray, b: np.ndarray, vec: np.ndarray,
          has_bias: bool, dtype: np.dtype) -> None:
    """New W and b for the conv, then the consumer removed (its output now the conv's)."""
    out = conv.outputs[0]
    column = vec.reshape(-1, *[1] * (w.ndim - 1))
    if user.op_type == "Mul":
        w, b = w * column, b * vec
    elif user.op_type == "Div":
        w, b = w / column, b / vec
    else:
        b = b + vec if user.op_type == "Add" else b - vec
    scaled = user.op_type in ("Mul", "Div")
    if scaled:
        _set_input(graph, conv, 1, w.astype(dtype))
    if not scaled or has_bias:
        _set_input(graph, conv, 2, b.astype(dtype))
    result = user.outputs[0]
    name = result.name
    result.replace_all_uses_with(out, replace_graph_outputs=True)
    graph.remove(user, safe=True)
    if out.is_graph_output():
        out.name = name  # the model's output keeps its name


def _per_channel(c: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """The (channels,) vector of a constant that varies along the conv output's axis 1 only, else None."""
    if c.ndim > rank:
        return None
    shape = (1,) * (rank - c.ndim) + tuple(c.shape)
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(c.reshape(shape[1]), (channels,)).copy()


def _set_input(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray) -> None:
    """Give the node's input ``index`` new constant contents: in place if only it uses it, else a new one."""
    owned = owned_initializer(node, index)
    if owned is not None:
        replace_initializer(owned, array, keep_marks=True)
        return
    hint = f"{node.name or node.op_type}_{'W' if index == 1 else 'B'}"
    if len(node.inputs) <= index:
        node.resize_inputs(index + 1)
    node.replace_input_with(index, set_initializer(graph, hint, array))
