"""Matchers for spelled-out activations: HardSwish, HardSigmoid, SiLU, Mish, found by def-use walks on onnx_ir
(GELU: :mod:`~graphopt.passes.fuse.gelu`).

Each matcher looks at one candidate root node (the last node of the spelled-out form) and returns a
:class:`~graphopt.passes.fuse.match.Match` or a :class:`~graphopt.passes.fuse.match.Miss` with the reason.
Matchers only read the graph. Constants are compared with a tolerance of 1e-6 (relative), so Clip(x + 3, 0, 5)
or a divisor of 6.5 never match. The building blocks find a pattern's *structure* first and keep the first
constant that is off as ``wrong`` (:class:`Part`): a site whose structure reached the anchor but whose constant
is off is a near-miss with that reason; a site whose operands are not the same ``x`` (a gate such as
x·HardSigmoid(y)) is not this pattern at all.
"""

from __future__ import annotations

import dataclasses
import math

import onnx_ir as ir

from graphopt.graphs import is_default_domain
from graphopt.passes.fuse.match import (
    TOL, Match, Miss, attr_float, fail, is_scalar, near, nearest, number, operand, pairs, producer, scalar_of,
    source,
)


@dataclasses.dataclass
class Part:
    """A piece of a pattern found by structure: its input ``x``, its ``nodes`` (graph order), the first constant
    check it failed (``wrong``; None when all held) and the anchor node it contains, if any."""

    x: ir.Value | None
    nodes: list[ir.Node]
    wrong: str | None = None
    anchor: ir.Node | None = None


def first_wrong(*parts: Part) -> str | None:
    return next((p.wrong for p in parts if p.wrong is not None), None)


# ---------------------------------------------------------------- building blocks


def _add_const(value: ir.Value | None, target: float) -> Part | Miss:
    """value = x + target (either order) → Part(x, [the Add]); another scalar constant is ``wrong``."""
    node = producer(value, "Add")
    if node is None:
        return fail(f"{source(value)} where x + {number(target)} was expected")
    for x, c in pairs(node):
        if is_scalar(c, target):
            return Part(x, [node])
    for x, c in pairs(node):
        if scalar_of(c) is not None:
            return Part(x, [node], f"Add constant is {operand(c)}, not {number(target)}")
    return fail("Add of no scalar constant")


def _clip_bounds(node: ir.Node) -> tuple[float | None, float | None]:
    """Clip's (min, max): attributes before opset 11, optional constant inputs after; None if not constant."""
    if "min" in node.attributes or "max" in node.attributes:
        return attr_float(node, "min", -math.inf), attr_float(node, "max", math.inf)
    bounds: list[float | None] = []
    for index, missing in ((1, -math.inf), (2, math.inf)):
        value = node.inputs[index] if len(node.inputs) > index else None
        bounds.append(missing if value is None else scalar_of(value))
    return bounds[0], bounds[1]


def _close(a: float | None, b: float) -> bool:
    return a is not None and abs(a - b) <= TOL * max(1.0, abs(b))


def _clip(value: ir.Value | None, low: float, high: float) -> Part | Miss:
    """value = Clip(t, low, high), or Min(Relu(t), high) when low == 0 → Part(t, nodes), the Clip/Min its anchor."""
    node = producer(value, "Clip", "Min")
    if node is None:
        return fail(f"{source(value)} where a Clip was expected")
    if node.op_type == "Clip":
        if node.inputs[0] is None:
            return fail("Clip of no input")
        lo, hi = _clip_bounds(node)
        wrong = None
        if not (_close(lo, low) and _close(hi, high)):
            shown = "non-constant" if lo is None or hi is None else f"{number(lo)}, {number(hi)}"
            wrong = f"Clip({shown}), not ({number(low)}, {number(high)})"
        return Part(node.inputs[0], [node], wrong, node)
    if low != 0.0:
        return fail("Min(Relu(t), c) clips from 0")
    for r, c in pairs(node):
        relu = producer(r, "Relu")
        if relu is not None and is_scalar(c, high):
            return Part(relu.inputs[0], [relu, node], None, node)
    for r, c in pairs(node):
        relu = producer(r, "Relu")
        if relu is not None and scalar_of(c) is not None:
            return Part(relu.inputs[0], [relu, node], f"Min(Relu(t), {operand(c)}), not {number(high)}", node)
    return fail("Min is not Min(Relu(t), c)")


def _div_or_mul_recip(value: ir.Value | None, divisor: float) -> Part | Miss:
    """value = t / divisor or t * (1/divisor) (either order) → Part(t, [the node]); another scalar is ``wrong``."""
    node = producer(value, "Div", "Mul")
    if node is None:
        return fail(f"{source(value)} where a Div by {number(divisor)} was expected")
    if node.op_type == "Div":
        ok = is_scalar(node.inputs[1], divisor)
        return Part(node.inputs[0], [node], None if ok else f"Div by {operand(node.inputs[1])}, not {number(divisor)}")
    for t, c in pairs(node):
        if is_scalar(c, 1.0 / divisor):
            return Part(t, [node])
    for t, c in pairs(node):
        if scalar_of(c) is not None:
            return Part(t, [node], f"Mul by {operand(c)}, not 1/{number(divisor)}")
    return fail("Mul of no scalar constant")


def hard_sigmoid_of(value: ir.Value | None) -> Part | Miss:
    """value = Relu6(x + 3) / 6 (Div 6 or Mul 1/6) or HardSigmoid(x, 1/6, 0.5) → Part(x, nodes).

    The anchor is the HardSigmoid, or the Clip/Min(Relu) of the spelled-out form."""
    hs = producer(value, "HardSigmoid")
    if hs is not None:
        alpha, beta = attr_float(hs, "alpha", 0.2), attr_float(hs, "beta", 0.5)
        wrong = None
        if not (abs(alpha - 1 / 6) <= TOL and abs(beta - 0.5) <= TOL):
            wrong = f"HardSigmoid(alpha={number(alpha)}, beta={number(beta)}), not (1/6, 0.5)"
        return Part(hs.inputs[0], [hs], wrong, hs)
    scaled = _div_or_mul_recip(value, 6.0)
    if isinstance(scaled, Miss):
        return scaled
    clipped = _clip(scaled.x, 0.0, 6.0)
    if isinstance(clipped, Miss):
        return clipped
    shifted = _add_const(clipped.x, 3.0)
    if isinstance(shifted, Miss):
        return near(shifted, clipped.anchor)
    return Part(shifted.x, [*shifted.nodes, *clipped.nodes, *scaled.nodes], first_wrong(scaled, clipped, shifted),
                clipped.anchor)


# ---------------------------------------------------------------- matchers (one per family)


def match_hardswish(node: ir.Node) -> Match | Miss:
    """x * HardSigmoid-like(x), or (x * Relu6(x + 3)) / 6 → HardSwish(x)."""
    misses: list[Miss] = []
    if node.op_type == "Mul" and is_default_domain(node):
        for x, s in pairs(node):
            found = hard_sigmoid_of(s)
            if isinstance(found, Miss):
                misses.append(found)
            elif found.x is not x:
                misses.append(fail("x * HardSigmoid(y) with y not x"))
            elif found.wrong is not None:
                misses.append(near(found.wrong, found.anchor))
            else:
                return Match("hardswish", [*found.nodes, node], "HardSwish", [x], anchor=found.anchor)
    if node.op_type not in ("Div", "Mul"):
        return fail(f"{node.op_type} is no HardSwish root")
    scaled = _div_or_mul_recip(node.outputs[0], 6.0)
    prod = producer(scaled.x, "Mul") if isinstance(scaled, Part) else None
    if prod is None:
        return nearest(misses, "no x * Relu6(x + 3) / 6")
    for x, c in pairs(prod):
        clipped = _clip(c, 0.0, 6.0)
        if isinstance(clipped, Miss):
            misses.append(clipped)
            continue
        shifted = _add_const(clipped.x, 3.0)
        if isinstance(shifted, Miss):
            misses.append(near(shifted, clipped.anchor))
        elif shifted.x is not x:
            misses.append(fail("y * Relu6(x + 3) with y not x"))
        elif (wrong := first_wrong(scaled, clipped, shifted)) is not None:
            misses.append(near(wrong, clipped.anchor))
        else:
            return Match("hardswish", [*shifted.nodes, *clipped.nodes, prod, node], "HardSwish", [x],
                         anchor=clipped.anchor)
    return nearest(misses, "no x * Relu6(x + 3) / 6")


def match_hardsigmoid(node: ir.Node) -> Match | Miss:
    """Relu6(x + 3) / 6 → HardSigmoid(1/6, 0.5); Clip(x * a + b, 0, 1) → HardSigmoid(a, b)."""
    if node.op_type in ("Div", "Mul"):
        found = hard_sigmoid_of(node.outputs[0])
        if isinstance(found, Miss):
            return found
        if found.wrong is not None:
            return near(found.wrong, found.anchor)
        return Match("hardsigmoid", found.nodes, "HardSigmoid", [found.x], {"alpha": 1 / 6, "beta": 0.5},
                     anchor=found.anchor)
    if node.op_type != "Clip":
        return fail(f"{node.op_type} is no HardSigmoid root")
    clipped = _clip(node.outputs[0], 0.0, 1.0)
    if isinstance(clipped, Miss) or clipped.wrong is not None:  # a Clip to other bounds (Relu6) is another op
        return fail("not a Clip(t, 0, 1)")
    add = producer(clipped.x, "Add")
    if add is None:
        return near(f"Clip(t, 0, 1) of {source(clipped.x)}, not of a·x + b", node)
    for m, b in pairs(add):
        mul, beta = producer(m, "Mul"), scalar_of(b)
        for x, a in pairs(mul) if mul is not None and beta is not None else []:
            alpha = scalar_of(a)
            if alpha is not None:
                return Match("hardsigmoid", [mul, add, node], "HardSigmoid", [x], {"alpha": alpha, "beta": beta},
                             anchor=node)
    return near("Clip(t, 0, 1) of an Add that is not a·x + b with scalar a, b", node)


def match_silu(node: ir.Node) -> Match | Miss:
    """x * Sigmoid(x) or x * Sigmoid(alpha * x) → QuickGelu(x, alpha) (com.microsoft) / Swish (opset 24)."""
    if node.op_type != "Mul" or not is_default_domain(node):
        return fail(f"{node.op_type} is no SiLU root")
    misses: list[Miss] = []
    for x, s in pairs(node):
        sig = producer(s, "Sigmoid")
        if sig is None:
            continue
        if sig.inputs[0] is x:
            return Match("silu", [sig, node], "Swish", [x], {"alpha": 1.0}, anchor=sig)
        scale = producer(sig.inputs[0], "Mul")
        for y, a in pairs(scale) if scale is not None else []:
            alpha = scalar_of(a)
            if y is x and alpha is not None:
                return Match("silu", [scale, sig, node], "Swish", [x], {"alpha": alpha}, anchor=sig)
            if y is x:
                misses.append(near(f"Sigmoid(a·x) with a {operand(a)}, not a scalar constant", sig))
        misses.append(fail("x * Sigmoid(y) with y neither x nor a·x"))
    return nearest(misses, "no Sigmoid operand")


def match_mish(node: ir.Node) -> Match | Miss:
    """x * Tanh(Softplus(x)) or x * Tanh(Log(Exp(x) + 1)) → Mish(x)."""
    if node.op_type != "Mul" or not is_default_domain(node):
        return fail(f"{node.op_type} is no Mish root")
    misses: list[Miss] = []
    for x, t in pairs(node):
        tanh = producer(t, "Tanh")
        inner = producer(tanh.inputs[0], "Softplus", "Log") if tanh is not None else None
        if inner is None:  # x * Tanh(anything else) is a gate (LSTM), not a Mish
            continue
        if inner.op_type == "Softplus":
            if inner.inputs[0] is x:
                return Match("mish", [inner, tanh, node], "Mish", [x], anchor=tanh)
            misses.append(fail("y * Tanh(Softplus(x)) with y not x"))
            continue
        shifted = _add_const(inner.inputs[0], 1.0)
        exp = producer(shifted.x, "Exp") if isinstance(shifted, Part) else None
        if exp is None:
            misses.append(near(f"Tanh(Log({source(inner.inputs[0])})), not Tanh(Log(Exp(x) + 1))", tanh))
        elif exp.inputs[0] is not x:
            misses.append(fail("y * Tanh(Log(Exp(x) + 1)) with y not x"))
        elif shifted.wrong is not None:
            misses.append(near(shifted.wrong, tanh))
        else:
            return Match("mish", [exp, *shifted.nodes, inner, tanh, node], "Mish", [x], anchor=tanh)
    return nearest(misses, "no Tanh(Softplus) operand")
