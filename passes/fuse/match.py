"""What a fuse matcher returns, and the small readers every matcher walks the graph with.

A matcher looks at one candidate root node (the last node of the spelled-out form) and returns a
:class:`Match` naming the nodes it would replace and the op that replaces them, or a :class:`Miss` saying why
not — in the spirit of onnxscript's rewriter ``MatchResult.fail(reason)``. A miss is *near* when the site
had the pattern's anchor (the op only this pattern puts there: HardSigmoid or the Clip/Relu6 for hardswish,
Sigmoid for silu, Erf for gelu, Tanh for mish, Div(Sub, Sqrt) for layernorm, a Conv whose consumer is
Mul/Add/Sub/Div for conv_affine) and a later check failed: the pass counts those per family and reports the
commonest reasons (:class:`NearMisses`). Other misses say only that the node is not this pattern; they are
not reported. Reasons name op types and constants, never node names, so equal reasons add up.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable

import numpy as np
import onnx_ir as ir

from graphopt.graphs import attr, is_default_domain
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
    anchor: ir.Node | None = None  # the pattern's anchor node: where a rejection of this match is counted
    # Patterns that write more than one node or output (attention, skip+LayerNorm): the values seen outside the
    # match, root output first, and ``build(graph, name) -> (new nodes, their replacements of those values)``.
    outputs: list[ir.Value] = dataclasses.field(default_factory=list)
    build: Callable[[ir.Graph, str], tuple[list[ir.Node], list[ir.Value]]] | None = None

    @property
    def exposed(self) -> list[ir.Value]:
        """The values of the match that nodes outside it (or the graph's outputs) may read."""
        return self.outputs or [self.root.outputs[0]]

    @property
    def site(self) -> ir.Node:
        return self.anchor or self.root

    @property
    def root(self) -> ir.Node:
        return self.nodes[-1]


@dataclasses.dataclass(frozen=True)
class Miss:
    """Why a node is not the root of a fusion. ``site``: the pattern's anchor node when the site had one (a
    near-miss, reported), else None (the node is just not this pattern)."""

    reason: str
    site: ir.Node | None = None

    @property
    def near(self) -> bool:
        return self.site is not None


def fail(reason: str) -> Miss:
    """Not this pattern: the walk did not reach the anchor."""
    return Miss(reason)


def near(reason: str | Miss, site: ir.Node) -> Miss:
    """A near-miss at the anchor node ``site``: the anchor was there, a later check failed."""
    return Miss(reason.reason if isinstance(reason, Miss) else reason, site)


def nearest(misses: list[Miss], default: str) -> Miss:
    """The first near miss of several tries (operand orders), else the first miss, else ``default``."""
    return next((m for m in misses if m.near), misses[0] if misses else fail(default))


class NearMisses:
    """Near-misses per family, one per anchor node (the first reason, from the outermost root), by reason."""

    def __init__(self) -> None:
        self.sites: dict[str, dict[ir.Node, str]] = {}

    def add(self, family: str, miss: Miss) -> None:
        if miss.site is not None:
            self.sites.setdefault(family, {}).setdefault(miss.site, miss.reason)

    def notes(self, top: int = 3) -> list[str]:
        """One line per family: ``hardswish: 3 near-misses left unfused: 2 'Add constant is 2.9, not 3', 1 '…'``.

        Sites whose anchor a later rewrite removed (fused in a smaller form or by another family) are left out."""
        lines = []
        for family, sites in self.sites.items():
            counts = collections.Counter(reason for site, reason in sites.items() if site.graph is not None)
            total = sum(counts.values())
            if not total:
                continue
            common = ", ".join(f"{n} '{reason}'" for reason, n in counts.most_common(top))
            more = f", {len(counts) - top} other reason(s)" if len(counts) > top else ""
            lines.append(f"{family}: {total} near-miss{'es' if total > 1 else ''} left unfused: {common}{more}")
        return lines


# ---------------------------------------------------------------- small readers


def producer(value: ir.Value | None, *op_types: str) -> ir.Node | None:
    """The default-domain node of one of ``op_types`` that produces ``value``, else None."""
    node = value.producer() if value is not None else None
    if node is None or not is_default_domain(node) or node.op_type not in op_types:
        return None
    return node


def source(value: ir.Value | None) -> str:
    """What ``value`` is, for a reason: its producer's op type, a constant, a graph input or missing."""
    if value is None:
        return "missing"
    node = value.producer()
    if node is not None:
        return node.op_type if is_default_domain(node) else f"{node.domain}.{node.op_type}"
    return "a constant" if const(value) is not None else "a graph input"


def const(value: ir.Value | None) -> np.ndarray | None:
    """The value of a constant initializer or Constant output (never a graph input's default), else None."""
    return constant_array(value, nodes=True)


def is_scalar(value: ir.Value | None, target: float) -> bool:
    """``value`` is a one-element float constant equal to ``target`` within TOL (relative)."""
    found = scalar_of(value)
    return found is not None and abs(found - target) <= TOL * max(1.0, abs(target))


def scalar_of(value: ir.Value | None) -> float | None:
    array = const(value)
    if array is None or array.size != 1 or array.ndim > 1 or not np.issubdtype(array.dtype, np.floating):
        return None
    return float(array.reshape(()))


# Ops a constant subexpression may be made of (torch leaves Sqrt(2) and its attention scale unfolded).
_FOLDABLE = {"Sqrt", "Reciprocal", "Neg", "Cast", "Div", "Mul", "Add", "Sub", "Pow", "Shape", "Slice", "Gather"}


def folded(value: ir.Value | None, depth: int = 8) -> np.ndarray | None:
    """The value of a small constant subexpression: constants, arithmetic on them, and the Shape of a value whose
    inferred shape is static (the export's head-size scale). Computed in float64 for float inputs; else None."""
    array = const(value)
    if array is not None:
        return array.astype(np.float64) if np.issubdtype(array.dtype, np.floating) else array
    node = value.producer() if value is not None else None
    if node is None or depth == 0 or not is_default_domain(node) or node.op_type not in _FOLDABLE:
        return None
    if node.op_type == "Shape":
        dims = list(node.inputs[0].shape) if node.inputs[0].shape is not None else [None]
        if not all(isinstance(d, int) for d in dims):
            return None
        start, end = int(attr(node, "start", 0)), attr(node, "end", None)
        return np.array(dims[start:None if end is None else int(end)], np.int64)
    args = [folded(v, depth - 1) if v is not None else None for v in node.inputs]
    if any(a is None for a in args[:2 if node.op_type in ("Div", "Mul", "Add", "Sub", "Pow", "Gather") else 1]):
        return None
    try:
        return _evaluate(node, args)
    except (ValueError, IndexError, TypeError):  # shapes that do not broadcast, indices out of range: not ours
        return None


def _evaluate(node: ir.Node, args: list[np.ndarray | None]) -> np.ndarray | None:
    op, a = node.op_type, args[0]
    with np.errstate(all="ignore"):
        if op in ("Sqrt", "Reciprocal", "Neg"):
            return {"Sqrt": np.sqrt, "Reciprocal": np.reciprocal, "Neg": np.negative}[op](a.astype(np.float64))
        if op == "Cast":
            to = ir.DataType(attr(node, "to", 1))
            if to.is_floating_point():
                return a.astype(np.float64)
            # integer to integer: Paddle's exports write shape entries as Cast(int32 constant) to int64
            return a.astype(np.int64) if to.is_integer() and np.issubdtype(a.dtype, np.integer) else None
        if op in ("Div", "Mul", "Add", "Sub", "Pow"):
            b = args[1]
            return {"Div": np.divide, "Mul": np.multiply, "Add": np.add, "Sub": np.subtract,
                    "Pow": np.power}[op](a.astype(np.float64), b.astype(np.float64))
        if op == "Gather" and a.ndim == 1:
            return np.take(a, args[1].astype(np.int64))
        if op == "Slice" and a.ndim == 1 and len(args) == 3 and args[1].size == args[2].size == 1:
            return a[int(args[1].ravel()[0]):int(min(args[2].ravel()[0], a.size))]
    return None


def folded_scalar(value: ir.Value | None) -> float | None:
    """A one-element float constant subexpression's value (see :func:`folded`), else None."""
    array = folded(value)
    if array is None or array.size != 1 or not np.issubdtype(array.dtype, np.floating):
        return None
    return float(array.reshape(()))


def close(found: float | None, target: float, tol: float = TOL) -> bool:
    """``found`` equals ``target`` within ``tol`` relative to ``target`` (a polynomial's coefficient, a scale)."""
    return found is not None and abs(found - target) <= tol * abs(target)


def not_float32(value: ir.Value | None) -> str | None:
    """Why onnxruntime's CPU contrib kernels (float only) cannot take ``value``, or None."""
    dtype = value.type.dtype if value is not None and value.type is not None else None
    return None if dtype in (None, ir.DataType.FLOAT) else f"the input is {dtype.name}, the CPU kernel takes FLOAT"


def number(x: float) -> str:
    """A constant as a reason shows it: 4 significant digits, 1/6 as 0.1667."""
    return f"{x:.4g}"


def operand(value: ir.Value | None) -> str:
    """An operand for a reason: its number when it is a scalar float constant, else what it is (:func:`source`)."""
    found = scalar_of(value)
    return number(found) if found is not None else source(value)


def pairs(node: ir.Node) -> list[tuple[ir.Value, ir.Value]]:
    """Both operand orders of a commutative binary node."""
    if len(node.inputs) != 2 or node.inputs[0] is None or node.inputs[1] is None:
        return []
    a, b = node.inputs
    return [(a, b), (b, a)]


def attr_float(node: ir.Node, name: str, default: float) -> float:
    return float(attr(node, name, default))
