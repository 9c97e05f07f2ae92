"""Matchers for the `fuse` pass: spelled-out activations and norms found by def-use walks on onnx_ir.

Each matcher looks at one candidate root node (the last node of the spelled-out form) and returns a
:class:`Match` naming the nodes it would replace and the single op that replaces them, or None. Matchers
only read the graph; :mod:`graphopt.passes.fuse` checks that every intermediate value stays inside the
match (no second consumer, not a graph output) and does the rewrite. Constants are compared with a
tolerance of 1e-6 (relative), so Clip(x + 3, 0, 5) or a divisor of 6.5 never match.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np
import onnx_ir as ir

from graphopt.graphs import is_default_domain
from graphopt.graphs import attr
from graphopt.weights import constant_array

TOL = 1e-6


@dataclasses.dataclass
class Match:
    """One fusion site: ``nodes`` (root last) are replaced by ``op_type(*inputs, **attributes)``."""

    family: str
    nodes: list[ir.Node]
    op_type: str
    inputs: list[ir.Value | None]
    attributes: dict[str, Any] = dataclasses.field(default_factory=dict)
    domain: str = ""
    # Initializers to create for the new node: (input slot, name hint, array); filled in at rewrite time.
    new_constants: list[tuple[int, str, np.ndarray]] = dataclasses.field(default_factory=list)

    @property
    def root(self) -> ir.Node:
        return self.nodes[-1]


# ---------------------------------------------------------------- small readers


def producer(value: ir.Value | None, *op_types: str) -> ir.Node | None:
    """The default-domain node of one of ``op_types`` that produces ``value``, else None."""
    node = value.producer() if value is not None else None
    if node is None or not is_default_domain(node) or node.op_type not in op_types:
        return None
    return node


def const(value: ir.Value | None) -> np.ndarray | None:
    """The value of a constant initializer or Constant output (never a graph input's default), else None."""
    return constant_array(value, nodes=True)


def is_scalar(value: ir.Value | None, target: float) -> bool:
    """``value`` is a one-element float constant equal to ``target`` within TOL (relative)."""
    array = const(value)
    if array is None or array.size != 1 or array.ndim > 1 or not np.issubdtype(array.dtype, np.floating):
        return False
    return abs(float(array.reshape(())) - target) <= TOL * max(1.0, abs(target))


def scalar_of(value: ir.Value | None) -> float | None:
    array = const(value)
    if array is None or array.size != 1 or array.ndim > 1 or not np.issubdtype(array.dtype, np.floating):
        return None
    return float(array.reshape(()))


def pairs(node: ir.Node) -> list[tuple[ir.Value, ir.Value]]:
    """Both operand orders of a commutative binary node."""
    if len(node.inputs) != 2 or node.inputs[0] is None or node.inputs[1] is None:
        return []
    a, b = node.inputs
    return [(a, b), (b, a)]


def attr_float(node: ir.Node, name: str, default: float) -> float:
    return float(attr(node, name, default))


# ---------------------------------------------------------------- building blocks


def _add_const(value: ir.Value | None, target: float) -> tuple[ir.Value, ir.Node] | None:
    """value = x + target (either order) → (x, the Add)."""
    node = producer(value, "Add")
    if node is None:
        return None
    for x, c in pairs(node):
        if is_scalar(c, target):
            return x, node
    return None


def _clip_bounds(node: ir.Node) -> tuple[float | None, float | None]:
    """Clip's (min, max): attributes before opset 11, optional constant inputs after; None if not constant."""
    if "min" in node.attributes or "max" in node.attributes:
        return attr_float(node, "min", -math.inf), attr_float(node, "max", math.inf)
    bounds: list[float | None] = []
    for index, missing in ((1, -math.inf), (2, math.inf)):
        value = node.inputs[index] if len(node.inputs) > index else None
        bounds.append(missing if value is None else scalar_of(value))
    return bounds[0], bounds[1]


def _clip(value: ir.Value | None, low: float, high: float) -> tuple[ir.Value, list[ir.Node]] | None:
    """value = Clip(t, low, high), or Min(Relu(t), high) when low == 0 → (t, nodes)."""
    node = producer(value, "Clip", "Min")
    if node is None:
        return None
    if node.op_type == "Clip":
        lo, hi = _clip_bounds(node)
        close = (lo is not None and hi is not None and abs(lo - low) <= TOL * max(1.0, abs(low))
                 and abs(hi - high) <= TOL * max(1.0, abs(high)))
        return (node.inputs[0], [node]) if close and node.inputs[0] is not None else None
    if low != 0.0:
        return None
    for r, c in pairs(node):
        relu = producer(r, "Relu")
        if relu is not None and is_scalar(c, high):
            return relu.inputs[0], [relu, node]
    return None


def _div_or_mul_recip(value: ir.Value | None, divisor: float) -> tuple[ir.Value, ir.Node] | None:
    """value = t / divisor or t * (1/divisor) (either order) → (t, the node)."""
    node = producer(value, "Div", "Mul")
    if node is None:
        return None
    if node.op_type == "Div":
        return (node.inputs[0], node) if is_scalar(node.inputs[1], divisor) else None
    for t, c in pairs(node):
        if is_scalar(c, 1.0 / divisor):
            return t, node
    return None


def hard_sigmoid_of(value: ir.Value | None) -> tuple[ir.Value, list[ir.Node]] | None:
    """value = Relu6(x + 3) / 6 (Div 6 or Mul 1/6) or HardSigmoid(x, 1/6, 0.5) → (x, nodes)."""
    hs = producer(value, "HardSigmoid")
    if hs is not None:
        if (abs(attr_float(hs, "alpha", 0.2) - 1 / 6) <= TOL and abs(attr_float(hs, "beta", 0.5) - 0.5) <= TOL):
            return hs.inputs[0], [hs]
        return None
    scaled = _div_or_mul_recip(value, 6.0)
    if scaled is None:
        return None
    clipped = _clip(scaled[0], 0.0, 6.0)
    if clipped is None:
        return None
    shifted = _add_const(clipped[0], 3.0)
    if shifted is None:
        return None
    return shifted[0], [shifted[1], *clipped[1], scaled[1]]


# ---------------------------------------------------------------- matchers (one per family)


def match_hardswish(node: ir.Node) -> Match | None:
    """x * HardSigmoid-like(x), or (x * Relu6(x + 3)) / 6 → HardSwish(x)."""
    if node.op_type == "Mul" and is_default_domain(node):
        for x, s in pairs(node):
            found = hard_sigmoid_of(s)
            if found is not None and found[0] is x:
                return Match("hardswish", [*found[1], node], "HardSwish", [x])
    scaled = _div_or_mul_recip(node.outputs[0], 6.0) if node.op_type in ("Div", "Mul") else None
    if scaled is None or scaled[1] is not node:
        return None
    prod = producer(scaled[0], "Mul")
    if prod is None:
        return None
    for x, c in pairs(prod):
        clipped = _clip(c, 0.0, 6.0)
        shifted = _add_const(clipped[0], 3.0) if clipped is not None else None
        if shifted is not None and shifted[0] is x:
            return Match("hardswish", [shifted[1], *clipped[1], prod, node], "HardSwish", [x])
    return None


def match_hardsigmoid(node: ir.Node) -> Match | None:
    """Relu6(x + 3) / 6 → HardSigmoid(1/6, 0.5); Clip(x * a + b, 0, 1) → HardSigmoid(a, b)."""
    if node.op_type in ("Div", "Mul"):
        found = hard_sigmoid_of(node.outputs[0])
        if found is not None and found[1][-1] is node:
            return Match("hardsigmoid", found[1], "HardSigmoid", [found[0]], {"alpha": 1 / 6, "beta": 0.5})
        return None
    clipped = _clip(node.outputs[0], 0.0, 1.0) if node.op_type == "Clip" else None
    add = producer(clipped[0], "Add") if clipped is not None else None
    if add is None:
        return None
    for m, b in pairs(add):
        mul, beta = producer(m, "Mul"), scalar_of(b)
        for x, a in pairs(mul) if mul is not None and beta is not None else []:
            alpha = scalar_of(a)
            if alpha is not None:
                return Match("hardsigmoid", [mul, add, node], "HardSigmoid", [x], {"alpha": alpha, "beta": beta})
    return None


def match_silu(node: ir.Node) -> Match | None:
    """x * Sigmoid(x) or x * Sigmoid(alpha * x) → QuickGelu(x, alpha) (com.microsoft) / Swish (opset 24)."""
    if node.op_type != "Mul" or not is_default_domain(node):
        return None
    for x, s in pairs(node):
        sig = producer(s, "Sigmoid")
        if sig is None:
            continue
        if sig.inputs[0] is x:
            return Match("silu", [sig, node], "Swish", [x], {"alpha": 1.0})
        scale = producer(sig.inputs[0], "Mul")
        for y, a in pairs(scale) if scale is not None else []:
            alpha = scalar_of(a)
            if y is x and alpha is not None:
                return Match("silu", [scale, sig, node], "Swish", [x], {"alpha": alpha})
    return None


def _erf_term(value: ir.Value | None) -> tuple[ir.Value, list[ir.Node]] | None:
    """value = 1 + Erf(x / sqrt 2) (Div sqrt2 or Mul 1/sqrt2) → (x, nodes)."""
    shifted = _add_const(value, 1.0)
    erf = producer(shifted[0], "Erf") if shifted is not None else None
    scaled = _div_or_mul_recip(erf.inputs[0], math.sqrt(2.0)) if erf is not None else None
    if scaled is None:
        return None
    return scaled[0], [scaled[1], erf, shifted[1]]


def match_gelu(node: ir.Node) -> Match | None:
    """x * 0.5 * (1 + Erf(x / sqrt 2)) in its three Mul orders → Gelu(x)."""
    if node.op_type != "Mul" or not is_default_domain(node):
        return None
    for p, q in pairs(node):
        inner = producer(p, "Mul")
        if inner is not None and _erf_term(q) is not None:  # (x * 0.5) * term
            x, nodes = _erf_term(q)
            if any(a is x and is_scalar(b, 0.5) for a, b in pairs(inner)):
                return Match("gelu", [*nodes, inner, node], "Gelu", [x])
        if inner is not None and is_scalar(q, 0.5):  # (x * term) * 0.5
            for x, t in pairs(inner):
                term = _erf_term(t)
                if term is not None and term[0] is x:
                    return Match("gelu", [*term[1], inner, node], "Gelu", [x])
        half = producer(q, "Mul")  # x * (term * 0.5)
        for t, h in pairs(half) if half is not None else []:
            term = _erf_term(t)
            if term is not None and term[0] is p and is_scalar(h, 0.5):
                return Match("gelu", [*term[1], half, node], "Gelu", [p])
    return None


def match_mish(node: ir.Node) -> Match | None:
    """x * Tanh(Softplus(x)) or x * Tanh(Log(Exp(x) + 1)) → Mish(x)."""
    if node.op_type != "Mul" or not is_default_domain(node):
        return None
    for x, t in pairs(node):
        tanh = producer(t, "Tanh")
        inner = producer(tanh.inputs[0], "Softplus", "Log") if tanh is not None else None
        if inner is None:
            continue
        if inner.op_type == "Softplus" and inner.inputs[0] is x:
            return Match("mish", [inner, tanh, node], "Mish", [x])
        shifted = _add_const(inner.inputs[0], 1.0) if inner.op_type == "Log" else None
        exp = producer(shifted[0], "Exp") if shifted is not None else None
        if exp is not None and exp.inputs[0] is x:
            return Match("mish", [exp, shifted[1], inner, tanh, node], "Mish", [x])
    return None


def _reduce_axes(node: ir.Node) -> list[int] | None:
    if node.attributes.get("keepdims") is not None and node.attributes["keepdims"].value == 0:
        return None
    if "axes" in node.attributes:
        return list(node.attributes["axes"].value)
    axes = const(node.inputs[1]) if len(node.inputs) > 1 else None
    return None if axes is None else [int(a) for a in axes.ravel()]


def _norm_axes(axes: list[int], rank: int | None) -> int | None:
    """The LayerNormalization ``axis`` if ``axes`` are the trailing axes, else None."""
    if rank is None:
        return -1 if axes == [-1] else None
    positive = sorted(a % rank for a in axes)
    if positive != list(range(rank - len(positive), rank)):
        return None
    return rank - len(positive)


def match_layernorm(node: ir.Node) -> Match | None:
    """(x - mean) / Sqrt(mean((x - mean)^2) + eps) [* gamma] [+ beta] → LayerNormalization."""
    if node.op_type not in ("Add", "Mul", "Div"):
        return None
    beta = gamma = None
    tail: list[ir.Node] = []
    current = node
    if current.op_type == "Add":
        for y, b in pairs(current):
            if const(b) is not None and producer(y, "Mul", "Div") is not None:
                beta, tail, current = b, [current], producer(y, "Mul", "Div")
                break
        else:
            return None
    if current.op_type == "Mul":
        for y, g in pairs(current):
            if const(g) is not None and producer(y, "Div") is not None:
                gamma, tail, current = g, [current, *tail], producer(y, "Div")
                break
        else:
            return None
    if current.op_type != "Div":
        return None
    sub, sqrt = producer(current.inputs[0], "Sub"), producer(current.inputs[1], "Sqrt")
    add_eps = producer(sqrt.inputs[0], "Add") if sqrt is not None else None
    if sub is None or add_eps is None:
        return None
    x, mean1 = sub.inputs
    red1 = producer(mean1, "ReduceMean")
    if red1 is None or red1.inputs[0] is not x:
        return None
    for v, e in pairs(add_eps):
        eps = scalar_of(e)
        red2 = producer(v, "ReduceMean")
        if eps is None or red2 is None:
            continue
        sq = producer(red2.inputs[0], "Pow", "Mul")
        if sq is None or sq.inputs[0] is not sub.outputs[0]:
            continue
        if not (is_scalar(sq.inputs[1], 2.0) if sq.op_type == "Pow" else sq.inputs[1] is sub.outputs[0]):
            continue
        axes1, axes2 = _reduce_axes(red1), _reduce_axes(red2)
        rank = x.shape.rank() if x.shape is not None else None
        axis = _norm_axes(axes1, rank) if axes1 is not None and axes1 == axes2 else None
        if axis is None:
            continue
        match = Match("layernorm", [red1, sub, sq, red2, add_eps, sqrt, current, *tail], "LayerNormalization",
                      [x, gamma, beta], {"axis": axis, "epsilon": eps})
        return match if _layernorm_params(match, x, axis) else None
    return None


def _layernorm_params(match: Match, x: ir.Value, axis: int) -> bool:
    """gamma/beta must broadcast onto the normalized shape only; they are materialized at that shape."""
    if x.shape is None or x.shape.rank() is None:
        return False
    dims = list(x.shape)[axis:]
    if not all(isinstance(d, int) for d in dims):
        return False
    for slot, hint in ((1, "ln_scale"), (2, "ln_bias")):
        array = const(match.inputs[slot])
        if array is None:
            continue
        shape = list(array.shape)
        while len(shape) > len(dims) and shape[0] == 1:
            shape.pop(0)
        if array.ndim > x.shape.rank() or (array.size != 1 and shape != dims):
            return False
        if list(array.shape) != dims:
            match.new_constants.append((slot, hint, np.broadcast_to(array.reshape(shape), dims).copy()))
    if match.inputs[1] is None:
        dtype = x.type.dtype.numpy() if x.type is not None else np.float32
        match.new_constants.append((1, "ln_scale", np.ones(dims, dtype=dtype)))
    return True


# family name → matcher, in the order the pass runs them (HardSwish before HardSigmoid: it contains one).
MATCHERS: dict[str, Callable[[ir.Node], Match | None]] = {
    "hardswish": match_hardswish,
    "hardsigmoid": match_hardsigmoid,
    "silu": match_silu,
    "gelu": match_gelu,
    "mish": match_mish,
    "layernorm": match_layernorm,
}
