"""Matcher for a spelled-out LayerNorm: (x - mean) / Sqrt(mean((x - mean)²) + eps) [* gamma] [+ beta].

The anchor is the Div of (x - mean) by a Sqrt of an Add: past it, every failing check is a near-miss with its
reason (axes not the trailing ones, a variance that is not of x - mean, gamma/beta of another shape).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.passes.fuse.match import (
    Match, Miss, const, fail, is_scalar, near, nearest, operand, pairs, producer, scalar_of, source,
)


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


def _affine_tail(node: ir.Node) -> tuple[ir.Node, list[ir.Node], ir.Value | None, ir.Value | None] | Miss:
    """From the root down to the normalizing Div: (the Div, the [Mul gamma] [Add beta] nodes, gamma, beta)."""
    beta = gamma = None
    tail: list[ir.Node] = []
    current = node
    if current.op_type == "Add":
        for y, b in pairs(current):
            if const(b) is not None and producer(y, "Mul", "Div") is not None:
                beta, tail, current = b, [current], producer(y, "Mul", "Div")
                break
        else:
            return fail("Add is not norm + beta")
    if current.op_type == "Mul":
        for y, g in pairs(current):
            if const(g) is not None and producer(y, "Div") is not None:
                gamma, tail, current = g, [current, *tail], producer(y, "Div")
                break
        else:
            return fail("Mul is not norm * gamma")
    if current.op_type != "Div":
        return fail(f"{current.op_type} is no LayerNorm root")
    return current, tail, gamma, beta


def _variance_miss(sq: ir.Node | None, centred: ir.Value) -> str | None:
    """Why ``sq`` is not (x - mean)², or None when it is."""
    if sq is None or sq.inputs[0] is not centred:
        return "the variance is not the mean of (x - mean)²"
    if sq.op_type == "Pow" and not is_scalar(sq.inputs[1], 2.0):
        return f"Pow exponent is {operand(sq.inputs[1])}, not 2"
    if sq.op_type == "Mul" and sq.inputs[1] is not centred:
        return "the variance is not the mean of (x - mean)·(x - mean)"
    return None


def _axes_miss(red1: ir.Node, red2: ir.Node, x: ir.Value) -> tuple[int, None] | tuple[None, str]:
    """(LayerNormalization axis, None) when both ReduceMeans keep dims over the same trailing axes, else
    (None, why not)."""
    axes1, axes2 = _reduce_axes(red1), _reduce_axes(red2)
    if axes1 is None or axes2 is None:
        return None, "ReduceMean axes not constant, or keepdims=0"
    if axes1 != axes2:
        return None, "the two ReduceMeans have different axes"
    rank = x.shape.rank() if x.shape is not None else None
    axis = _norm_axes(axes1, rank)
    if axis is None:
        shown = "unknown rank" if rank is None else f"rank {rank}"
        return None, f"ReduceMean axes {axes1} are not the trailing axes ({shown})"
    return axis, None


def match_layernorm(node: ir.Node) -> Match | Miss:
    """(x - mean) / Sqrt(mean((x - mean)^2) + eps) [* gamma] [+ beta] → LayerNormalization."""
    if node.op_type not in ("Add", "Mul", "Div"):
        return fail(f"{node.op_type} is no LayerNorm root")
    found = _affine_tail(node)
    if isinstance(found, Miss):
        return found
    current, tail, gamma, beta = found
    sub, sqrt = producer(current.inputs[0], "Sub"), producer(current.inputs[1], "Sqrt")
    add_eps = producer(sqrt.inputs[0], "Add") if sqrt is not None else None
    if sub is None or add_eps is None:
        return fail("Div is not (x - mean) / Sqrt(var + eps)")
    x, mean1 = sub.inputs
    red1 = producer(mean1, "ReduceMean")
    if red1 is None or red1.inputs[0] is not x:
        return near(f"x - {source(mean1)}, not x - ReduceMean(x)", current)
    misses: list[Miss] = []
    for v, e in pairs(add_eps):
        eps = scalar_of(e)
        red2 = producer(v, "ReduceMean")
        if eps is None or red2 is None:
            misses.append(near("Sqrt of something else than ReduceMean(…) + eps", current))
            continue
        sq = producer(red2.inputs[0], "Pow", "Mul")
        why = _variance_miss(sq, sub.outputs[0])
        axis, axes_why = _axes_miss(red1, red2, x) if why is None else (None, why)
        if axis is None:
            misses.append(near(axes_why, current))
            continue
        match = Match("layernorm", [red1, sub, sq, red2, add_eps, sqrt, current, *tail], "LayerNormalization",
                      [x, gamma, beta], {"axis": axis, "epsilon": eps}, anchor=current)
        params_why = _layernorm_params(match, x, axis)
        return match if params_why is None else near(params_why, current)
    return nearest(misses, "no ReduceMean(…) + eps under the Sqrt")


def _layernorm_params(match: Match, x: ir.Value, axis: int) -> str | None:
    """gamma/beta must broadcast onto the normalized shape only; they are materialized at that shape.

    None when they do (``match.new_constants`` then holds what to materialize), else why not."""
    if x.shape is None or x.shape.rank() is None:
        return "the input's rank is unknown"
    dims = list(x.shape)[axis:]
    if not all(isinstance(d, int) for d in dims):
        return "the normalized dims are not static"
    for slot, hint in ((1, "ln_scale"), (2, "ln_bias")):
        array = const(match.inputs[slot])
        if array is None:
            continue
        shape = list(array.shape)
        while len(shape) > len(dims) and shape[0] == 1:
            shape.pop(0)
        if array.ndim > x.shape.rank() or (array.size != 1 and shape != dims):
            return f"{'gamma' if slot == 1 else 'beta'} of shape {list(array.shape)} is not the normalized shape {dims}"
        if list(array.shape) != dims:
            match.new_constants.append((slot, hint, np.broadcast_to(array.reshape(shape), dims).copy()))
    if match.inputs[1] is None:
        dtype = x.type.dtype.numpy() if x.type is not None else np.float32
        match.new_constants.append((1, "ln_scale", np.ones(dims, dtype=dtype)))
    return None
