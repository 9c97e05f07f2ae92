"""Reshape targets that follow a pruning: where each entry of a Reshape's shape input comes from, and the
rewrite of the entries that change.

Exports write a Reshape target as a constant ([0, 0, 12, 64]) or as a Concat of 1-D pieces, each a constant
or dimensions read from a tensor's shape (torch's ``x.size()[:-1] + (H, d)``: Shape → Gather/Slice →
Unsqueeze → Concat). :func:`entries` describes each entry: a constant (and the tensor holding it, to rewrite
it) or a shape read (the tensor and axis read, so the analysis can check that axis keeps its size). An entry
computed any other way (arithmetic on dimensions) is None: it cannot be rewritten safely. :func:`write` gives
a Reshape new values at some entries without touching a target another node shares.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphopt.graphs import attr as _attr, is_default_domain
from graphopt.passes.channels.types import const_array, label
from graphopt.weights import write_input

MAX_DEPTH = 8  # shape arithmetic chains followed back from a target entry


@dataclass(frozen=True)
class Entry:
    """One entry of a Reshape target: a constant ``value`` held at ``index`` of ``holder`` (the target itself
    when ``piece`` is None, else input ``piece`` of the target's Concat), or a ``read`` of (tensor, axis)."""

    value: int | None = None
    holder: ir.Value | None = None
    index: int = 0
    piece: int | None = None
    read: tuple[ir.Value, int] | None = None


def _length(value: ir.Value, dims_of) -> int | None:
    """Entries of a 1-D shape piece (constant, inferred, or an Unsqueeze'd scalar)."""
    const = const_array(value)
    if const is not None:
        return int(const.size)
    dims = dims_of(value)
    if dims is not None and len(dims) == 1 and dims[0] is not None:
        return int(dims[0])
    node = value.producer()
    if node is not None and node.op_type == "Unsqueeze":
        inner = dims_of(node.inputs[0])
        return 1 if inner == () else None
    return None


def read(value: ir.Value, i: int, dims_of, depth: int = 0) -> tuple[ir.Value, int] | None:
    """(tensor, axis) whose size entry ``i`` of the shape vector ``value`` is, else None."""
    node = value.producer()
    if node is None or depth > MAX_DEPTH or not is_default_domain(node):
        return None
    op = node.op_type
    if op in ("Cast", "Identity", "Squeeze", "Unsqueeze"):
        return read(node.inputs[0], i, dims_of, depth + 1)
    if op == "Concat":
        start = 0
        for piece in node.inputs:
            n = _length(piece, dims_of)
            if n is None:
                return None
            if start <= i < start + n:
                return read(piece, i - start, dims_of, depth + 1)
            start += n
        return None
    if op == "Shape":
        rank = len(dims_of(node.inputs[0]) or ())
        if not rank:
            return None
        first = int(_attr(node, "start", 0))
        return node.inputs[0], (first + rank if first < 0 else first) + i
    if op in ("Gather", "Slice"):
        index = _picked(node, i, dims_of)
        if index is None:
            return None
        return read(node.inputs[0], index, dims_of, depth + 1)
    return None


def _picked(node: ir.Node, i: int, dims_of) -> int | None:
    """Which entry of its input vector a Gather (axis 0) or Slice (axis 0, constant bounds, step 1) puts at
    position ``i`` (a negative index counts from the vector's inferred length)."""
    def given(k: int) -> tuple[bool, np.ndarray | None]:
        value = node.inputs[k] if len(node.inputs) > k else None
        return value is not None, const_array(value) if value is not None else None

    if node.op_type == "Gather":
        _, idx = given(1)
        if idx is None or int(_attr(node, "axis", 0)) != 0:
            return None
        flat = idx.reshape(-1)
        pick = int(flat[min(i, flat.size - 1)])
    else:
        (_, starts), (has_axes, axes), (has_steps, steps) = given(1), given(3), given(4)
        if starts is None or (has_axes and (axes is None or int(axes.reshape(-1)[0]) != 0)) or (
                has_steps and (steps is None or int(steps.reshape(-1)[0]) != 1)):
            return None
        first = int(starts.reshape(-1)[0])
        if first >= 0:
            return first + i
        length = dims_of(node.inputs[0])
        if not length or length[0] is None:
            return None
        return max(first + length[0], 0) + i  # a start before the first entry is clamped to it
    if pick >= 0:
        return pick
    length = dims_of(node.inputs[0])
    return pick + length[0] if length and length[0] is not None else None


def entries(node: ir.Node, dims_of) -> list[Entry | None] | None:
    """One :class:`Entry` per output dimension of Reshape ``node`` (None where it is computed), or None when
    the target is neither a constant nor a Concat of readable pieces. ``dims_of``: value -> inferred dims."""
    target = node.inputs[1]
    const = const_array(target)
    if const is not None:
        return [Entry(int(v), target, i) for i, v in enumerate(const.reshape(-1).tolist())]
    concat = target.producer()
    if concat is None or concat.op_type != "Concat" or not is_default_domain(concat):
        return None
    out: list[Entry | None] = []
    for k, piece in enumerate(concat.inputs):
        n = _length(piece, dims_of)
        if n is None:
            return None
        values = const_array(piece)
        for i in range(n):
            if values is not None:
                out.append(Entry(int(values.reshape(-1)[i]), piece, i, k))
            else:
                source = read(piece, i, dims_of)
                out.append(Entry(read=source) if source is not None else None)
    return out


def write(node: ir.Node, changes: list[tuple[Entry, int]]) -> None:
    """Give Reshape ``node`` the new values at the changed entries (constants only); a target or Concat shared
    with other nodes gets a private copy first, so no other Reshape changes with it."""
    if not changes:
        return
    if changes[0][0].piece is None:
        array = np.array(const_array(node.inputs[1]), dtype=np.int64).reshape(-1)
        for entry, new in changes:
            array[entry.index] = new
        write_input(node, 1, array, "pruned")
        return
    concat = node.inputs[1].producer()
    assert concat is not None
    if any(use.node is not node for use in node.inputs[1].uses()) or node.inputs[1].is_graph_output():
        copy = ir.Node("", "Concat", list(concat.inputs), attributes=[ir.AttrInt64("axis", 0)],
                       name=f"{label(concat)}_{label(node)}")
        graph = node.graph
        assert isinstance(graph, ir.Graph)
        graph.insert_before(node, copy)
        node.replace_input_with(1, copy.outputs[0])
        concat = copy
    for piece in sorted({entry.piece for entry, _ in changes}):
        array = np.array(const_array(concat.inputs[piece]), dtype=np.int64)
        flat = array.reshape(-1)
        for entry, new in changes:
            if entry.piece == piece:
                flat[entry.index] = new
        write_input(concat, piece, array, "pruned")
