"""Matcher for LayerNormalization(a + b) [with a = y + bias] → com.microsoft SkipLayerNormalization.

The residual Add of a transformer block feeds a LayerNormalization over the last axis; when the Add's other
operand comes from a Linear (MatMul + Add(bias)), the bias joins too. The sum itself is often read again further
on (pre-norm blocks: ViT, Whisper): the fused op's fourth output, input + skip + bias, replaces it.

SkipLayerNormalization adds input and skip without broadcasting them onto each other, so both must have the same
shape, provably: the same inferred dims (equal ints or the same symbolic name), rank 2 or 3. The anchor is the
LayerNormalization of an Add of two non-constant values: past it, each failing check is a near-miss.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.graphs import attr, is_default_domain
from graphopt.passes.fuse.match import Match, Miss, const, fail, near, not_float32, producer, source

MS_DOMAIN = "com.microsoft"


def _dims(value: ir.Value) -> list | None:
    """The inferred dims (ints, symbolic names, None when unnamed), or None when the rank is unknown."""
    if value.shape is None or value.shape.rank() is None:
        return None
    return [d if isinstance(d, int) else d.value for d in value.shape]


def _same_shape(a: ir.Value, b: ir.Value) -> str | None:
    """Why a and b are not provably of one shape (rank 2 or 3), or None when they are."""
    da, db = _dims(a), _dims(b)
    if da is None or db is None:
        return "the rank of input or skip is unknown"
    if len(da) not in (2, 3) or len(da) != len(db):
        return f"input and skip of rank {len(da)} and {len(db)}, not both 2 or 3"
    if any(x is None or x != y for x, y in zip(da, db)):
        return f"input and skip shapes are not provably equal: {da} vs {db}"
    return None


def _vector(value: ir.Value | None, size: int | None, what: str) -> str | None:
    """Why ``value`` is not a constant float vector of ``size`` values (or absent), or None."""
    if value is None:
        return None
    array = const(value)
    if array is None or not np.issubdtype(array.dtype, np.floating):
        return f"{what} is {source(value)}, not a float constant"
    if array.ndim != 1 or (size is not None and array.shape[0] != size):
        return f"{what} of shape {list(array.shape)} is not a vector of the hidden size {size}"
    return None


def _bias_of(add: ir.Node, value: ir.Value) -> tuple[ir.Node, ir.Value, ir.Value] | None:
    """(the Add, y, bias) when ``value`` = y + bias with a constant 1-D bias and the Add read only by ``add``."""
    node = producer(value, "Add")
    if node is None or value.is_graph_output() or {u.node for u in value.uses()} != {add}:
        return None
    for y, b in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
        array = const(b)
        if array is not None and array.ndim == 1 and const(y) is None and _same_shape(y, value) is None:
            return node, y, b
    return None


def match_skip_layernorm(node: ir.Node) -> Match | Miss:
    """LayerNormalization(a + b) [a = y + bias] → SkipLayerNormalization(a or y, b, gamma, beta[, bias])."""
    if node.op_type != "LayerNormalization" or not is_default_domain(node):
        return fail(f"{node.op_type} is no LayerNormalization")
    add = producer(node.inputs[0], "Add")
    if add is None or any(v is None or const(v) is not None for v in add.inputs):
        return fail(f"LayerNormalization of {source(node.inputs[0])}, not of a sum of two tensors")
    a, b = add.inputs
    why = not_float32(a) or _same_shape(a, b)
    rank = len(_dims(a) or [])
    axis = int(attr(node, "axis", -1))
    hidden = (_dims(a) or [None])[-1]
    if why is None and axis not in (-1, rank - 1):
        why = f"LayerNormalization over axis {axis}, not the last"
    if why is None and int(attr(node, "stash_type", 1)) != 1:
        why = "LayerNormalization with stash_type other than float"
    if why is None and any(v.uses() or v.is_graph_output() for v in node.outputs[1:]):
        why = "the LayerNormalization's mean or inverse deviation is read"
    gamma, beta = node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None
    why = why or _vector(gamma, hidden if isinstance(hidden, int) else None, "gamma") or \
        _vector(beta, hidden if isinstance(hidden, int) else None, "beta")
    if why is not None:
        return near(why, node)
    biased = _bias_of(add, a) or _bias_of(add, b)
    nodes = [add, node]
    inputs: list[ir.Value | None] = [a, b, gamma, beta, None]
    if biased is not None:
        bias_add, y, bias = biased
        skip = b if bias_add.outputs[0] is a else a
        nodes, inputs = [bias_add, add, node], [y, skip, gamma, beta, bias]
        if _vector(bias, hidden if isinstance(hidden, int) else None, "bias") is not None:
            nodes, inputs = [add, node], [a, b, gamma, beta, None]
    total = add.outputs[0]
    read_outside = total.is_graph_output() or any(u.node is not node for u in total.uses())
    outputs = [node.outputs[0], total] if read_outside else [node.outputs[0]]
    epsilon = float(attr(node, "epsilon", 1e-5))
    return Match("skip_layernorm", nodes, "SkipLayerNormalization", inputs, {"epsilon": epsilon},
                 domain=MS_DOMAIN, anchor=node, outputs=outputs, build=_builder(inputs, epsilon, outputs))


def _builder(inputs: list[ir.Value | None], epsilon: float, replaced: list[ir.Value]):
    """The node that replaces the match: output 0 the normalized value, output 3 (when read) the sum."""
    def build(graph: ir.Graph, name: str) -> tuple[list[ir.Node], list[ir.Value]]:
        used = list(inputs)
        while used and used[-1] is None:
            used.pop()
        node = ir.node("SkipLayerNormalization", used, {"epsilon": epsilon}, domain=MS_DOMAIN,
                       num_outputs=4 if len(replaced) > 1 else 1, name=name)
        for unused in node.outputs[1:3]:
            unused.name = ""  # optional outputs not computed
        new = [node.outputs[0], node.outputs[3]] if len(replaced) > 1 else [node.outputs[0]]
        for old, value in zip(replaced, new):  # same shapes: later matchers read them
            value.shape, value.type = old.shape, old.type
        return [node], new
    return build
