"""GELU spelled out, Erf and tanh forms, and bias + GELU: found by expanding the root as a polynomial in x.

Exporters write GELU in many orders: torch x * (1 + Erf(x / √2)) * 0.5 and 0.5 * (x * (1 + Tanh(β·(x + κ·x·x·x)))),
TF 0.5 * x * (1 + Erf(x * 1/√2)) and x * (1 + Tanh(x * β * (1 + κ·x²))) / 2, constants as initializers, Constant
nodes or Sqrt(2) left unfolded. Rather than list the orders, the matcher expands the root as a polynomial in x and
t, the output of the one Erf (or Tanh) it reaches, through Add/Sub/Mul/Div/Pow/Neg with constant scalars, and
compares coefficients numerically:

- Erf form: root = ½x + ½x·t, t = Erf(x/√2)
- tanh form: root = ½x + ½x·t, t = Tanh(β·x + β·κ·x³), β = √(2/π), κ = 0.044715

x is the one value the whole expansion bottoms out in; every other leaf must be a constant. The anchor is the
Erf/Tanh: a site whose expansion reached it and has the x·t term but whose coefficients are off is a near-miss
that names the coefficient (``Mul by 0.45, not 0.5``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from graphopt.graphs import is_default_domain
from graphopt.passes.fuse.match import (
    Match, Miss, close, const, fail, folded_scalar, near, not_float32, number, producer,
)

SQRT_HALF = math.sqrt(0.5)
BETA = math.sqrt(2.0 / math.pi)
KAPPA = 0.044715
ARITHMETIC = ("Add", "Sub", "Mul", "Div", "Pow", "Neg")
MAX_DEPTH = 12

# A polynomial in x and t: (power of x, power of t) → coefficient.
Poly = dict[tuple[int, int], float]


def _add(p: Poly, q: Poly, sign: float = 1.0) -> Poly:
    out = dict(p)
    for key, c in q.items():
        out[key] = out.get(key, 0.0) + sign * c
    return {k: c for k, c in out.items() if c != 0.0}


def _mul(p: Poly, q: Poly) -> Poly | None:
    out: Poly = {}
    for (a, b), c in p.items():
        for (d, e), f in q.items():
            if a + d > 3 or b + e > 1:  # no GELU needs more: give up rather than grow
                return None
            out[(a + d, b + e)] = out.get((a + d, b + e), 0.0) + c * f
    return {k: c for k, c in out.items() if c != 0.0}


def _show(p: Poly) -> str:
    """A polynomial for a reason: ``0.45·x + 0.45·x·t``."""
    terms = []
    for (a, b), c in sorted(p.items()):
        factors = [number(c)] + ["x" if a == 1 else f"x^{a}"] * (a > 0) + ["t"] * b
        terms.append("·".join(factors))
    return " + ".join(terms) or "0"


class _Expansion:
    """One try at expanding a root as a polynomial in ``x`` and the output t of a single Erf/Tanh node."""

    def __init__(self, x: ir.Value) -> None:
        self.x = x
        self.nodes: dict[ir.Node, None] = {}  # visited non-constant nodes, insertion-ordered
        self.anchor: ir.Node | None = None
        self.inner: Poly | None = None  # the anchor's argument as a polynomial in x

    def expand(self, value: ir.Value | None, depth: int = MAX_DEPTH) -> Poly | None:
        if value is None or depth == 0:
            return None
        if value is self.x:
            return {(1, 0): 1.0}
        scalar = folded_scalar(value)
        if scalar is not None:
            return {(0, 0): scalar} if scalar != 0.0 else {}
        node = producer(value, *ARITHMETIC, "Erf", "Tanh")
        if node is None:
            return None
        poly = self._node(node, depth - 1)
        if poly is not None:
            self.nodes[node] = None
        return poly

    def _node(self, node: ir.Node, depth: int) -> Poly | None:
        op = node.op_type
        if op in ("Erf", "Tanh"):
            if self.anchor is None:
                self.anchor = node
                self.inner = self.expand(node.inputs[0], depth)
                if self.inner is None or any(b for _, b in self.inner):
                    return None
            return {(0, 1): 1.0} if node is self.anchor else None
        if op == "Neg":
            p = self.expand(node.inputs[0], depth)
            return None if p is None else _add({}, p, -1.0)
        if len(node.inputs) != 2:
            return None
        if op in ("Div", "Pow"):
            p, k = self.expand(node.inputs[0], depth), folded_scalar(node.inputs[1])
            if p is None or k is None or k == 0.0:
                return None
            if op == "Div":
                return {key: c / k for key, c in p.items()}
            if k not in (1.0, 2.0, 3.0):
                return None
            out: Poly | None = {(0, 0): 1.0}
            for _ in range(int(k)):
                out = _mul(out, p) if out is not None else None
            return out
        p, q = self.expand(node.inputs[0], depth), self.expand(node.inputs[1], depth)
        if p is None or q is None:
            return None
        if op == "Mul":
            return _mul(p, q)
        return _add(p, q, 1.0 if op == "Add" else -1.0)


@dataclasses.dataclass
class Gelu:
    """A GELU site: its input ``x``, nodes (root last), the anchor and whether it is the tanh form."""

    x: ir.Value
    nodes: list[ir.Node]
    anchor: ir.Node
    tanh: bool


def _candidates(root: ir.Node, limit: int = 48) -> tuple[list[ir.Value], bool]:
    """The non-constant values an arithmetic walk up from ``root`` meets (nearest first, at most ``limit``), and
    whether it met an Erf or Tanh on the way (a GELU needs one)."""
    seen: dict[ir.Value, None] = {}
    frontier, met = [root], False
    for _ in range(MAX_DEPTH):
        nxt = []
        for node in frontier:
            met |= node.op_type in ("Erf", "Tanh")
            for value in node.inputs:
                if value is None or value in seen or len(seen) >= limit or folded_scalar(value) is not None:
                    continue
                seen[value] = None
                parent = producer(value, *ARITHMETIC, "Erf", "Tanh")
                if parent is not None:
                    nxt.append(parent)
        frontier = nxt
        if not frontier:
            break
    return list(seen), met


def find_gelu(root: ir.Node) -> Gelu | Miss:
    """The GELU whose last node is ``root`` (a Mul or Div), or why not."""
    if root.op_type not in ("Mul", "Div") or not is_default_domain(root):
        return fail(f"{root.op_type} is no GELU root")
    candidates, met = _candidates(root)
    if not met:
        return fail("no Erf or Tanh under the root")
    misses: list[Miss] = []
    for x in candidates:
        walk = _Expansion(x)
        poly = walk.expand(root.outputs[0])
        if poly is None or walk.anchor is None or walk.inner is None or (1, 1) not in poly:
            continue  # not a product of x and the Erf/Tanh of x: some other pattern
        why = _coefficients_miss(poly, walk.inner, walk.anchor.op_type == "Tanh")
        if why is not None:
            misses.append(near(why, walk.anchor))
            continue
        nodes = [n for n in root.graph if n in walk.nodes] if root.graph is not None else list(walk.nodes)
        return Gelu(x, nodes, walk.anchor, walk.anchor.op_type == "Tanh")
    return misses[0] if misses else fail("not x times a function of Erf/Tanh(x)")


def _coefficients_miss(poly: Poly, inner: Poly, tanh: bool) -> str | None:
    """Why ``poly`` (with ``inner`` under the Erf/Tanh) is not GELU, or None when every coefficient holds."""
    half_x, half_xt = poly.get((1, 0)), poly.get((1, 1))
    if set(poly) != {(1, 0), (1, 1)} or not close(half_x, half_xt or 0.0):
        return f"root is {_show(poly)}, not 0.5·x + 0.5·x·t"
    if not close(half_x, 0.5):
        return f"Mul by {number(half_x)}, not 0.5"
    if not tanh:
        if set(inner) != {(1, 0)} or not close(inner[(1, 0)], SQRT_HALF):
            return f"Erf of {_show(inner)}, not x/sqrt(2)"
        return None
    if set(inner) != {(1, 0), (3, 0)} or not close(inner[(1, 0)], BETA):
        return f"Tanh of {_show(inner)}, not sqrt(2/pi)·(x + 0.044715·x^3)"
    if not close(inner[(3, 0)] / inner[(1, 0)], KAPPA):
        return f"cubic coefficient {number(inner[(3, 0)] / inner[(1, 0)])}, not 0.044715"
    return None


def match_gelu(node: ir.Node) -> Match | Miss:
    """GELU spelled out (Erf or tanh form) → Gelu(x) (``approximate="tanh"`` for the tanh form)."""
    found = find_gelu(node)
    if isinstance(found, Miss):
        return found
    attrs = {"approximate": "tanh"} if found.tanh else {}
    return Match("gelu", found.nodes, "Gelu", [found.x], attrs, anchor=found.anchor)


def match_bias_gelu(node: ir.Node) -> Match | Miss:
    """GELU of Add(y, bias) with a constant bias along the last axis → com.microsoft BiasGelu(y, bias) (Erf form)
    or FastGelu(y, bias) (tanh form). y is typically a MatMul's output. A GELU that is off is the gelu family's
    near-miss, not this one's."""
    found = find_gelu(node)
    if isinstance(found, Miss):
        return fail(found.reason)
    add = producer(found.x, "Add")
    if add is None:
        return fail(f"GELU of {found.x.producer().op_type if found.x.producer() else 'an input'}, not of an Add")
    for y, b in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
        bias = const(b)
        if bias is None or const(y) is not None:
            continue
        why = not_float32(y) or _bias_miss(y, bias)
        if why is not None:
            return near(why, found.anchor)
        vector = bias.reshape(-1)
        op = "FastGelu" if found.tanh else "BiasGelu"
        match = Match("bias_gelu", [add, *found.nodes], op, [y, None], domain="com.microsoft", anchor=found.anchor)
        if list(bias.shape) != [vector.size]:
            match.new_constants.append((1, "bias", vector.copy()))
        else:
            match.inputs[1] = b
        return match
    return fail("GELU of an Add without a constant operand")


def _bias_miss(y: ir.Value, bias: np.ndarray) -> str | None:
    """Why ``y + bias`` is not a bias along y's last axis that BiasGelu can take, or None."""
    if not np.issubdtype(bias.dtype, np.floating):
        return f"bias is {bias.dtype}"
    if bias.ndim == 0 or any(d != 1 for d in bias.shape[:-1]):
        return f"bias of shape {list(bias.shape)} is not a vector along the last axis"
    rank = y.shape.rank() if y.shape is not None else None
    last = _last_dim(y)
    if bias.ndim > 1 and (rank is None or rank < bias.ndim):  # a [1, 1, n] bias would raise y's rank
        return "the biased input's rank is unknown or below the bias's"
    if last != bias.shape[-1]:
        return f"bias of {bias.shape[-1]} values, the input's last dim is {last if last is not None else 'unknown'}"
    return None


def _last_dim(y: ir.Value) -> int | None:
    """y's last dim when static: from its inferred shape, or from the MatMul weight that made it."""
    if y.shape is not None and y.shape.rank() and isinstance(y.shape[-1], int):
        return y.shape[-1]
    matmul = producer(y, "MatMul")
    weight = const(matmul.inputs[1]) if matmul is not None else None
    return int(weight.shape[-1]) if weight is not None and weight.ndim >= 2 else None
