"""Attention operands picked from one packed projection, and the older-opset Softmax spelling.

ViT-style exports (PP-OCR's SVTR neck, timm) project Q, K and V with one MatMul and pick them apart:

    X  = Transpose(Reshape(qkv [b, s, P·heads·d] → [b, s, P, heads, d]), perm)    (the Transpose optional)
    Q  = Squeeze(Slice(X, k, k + 1, axis a), a), Gather(X, k, axis a) or Squeeze(Split(X, axis a)[k], a)
                                                                                  (a: X's parts axis)

:func:`pick` reads one such operand back to the Reshape; the attention matcher checks the sizes (the Reshape's
target through :class:`~graphopt.passes.fuse.heads.Layout`) and gives MultiHeadAttention the part's columns of
the projection as a Slice of the last axis — exact: the same numbers in the same order.

onnx's version converter writes a Softmax of opset < 13 over the last axis of a 4-D tensor as
Reshape(Softmax(Flatten(x, axis=3), axis=-1), Shape(x)); :func:`flat_softmax` reads that back.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from graphopt.graphs import attr
from graphopt.passes.fuse.match import folded, producer
from graphopt.weights import set_initializer

PACKED_LABELS = "bspnd"  # the packed split's axes: batch, sequence, part, head, head size


@dataclasses.dataclass
class Pick:
    """One operand picked from a packed projection: ``part`` of the parts axis, the operand's axis order in
    the letters of ``bsnd``, the head split (a Reshape to rank 5), the nodes from the pick up to the split."""

    part: int
    labels: str
    split: ir.Node
    nodes: list[ir.Node]
    pieces: int | None = None  # a Split without sizes: its output count, which must be the part count


def _int(value: ir.Value | None) -> int | None:
    array = folded(value) if value is not None else None
    if array is None or array.size != 1 or not np.issubdtype(array.dtype, np.integer):
        return None
    return int(array.ravel()[0])


def _squeezed_axis(node: ir.Node) -> int | None:
    axes = folded(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else attr(node, "axes", None)
    axes = np.asarray(axes).ravel() if axes is not None else None
    return int(axes[0]) if axes is not None and axes.size == 1 else None


def _sliced_part(node: ir.Node) -> tuple[int, int] | None:
    """(axis, k) when Slice ``node`` keeps the one index k of one axis (constant bounds, step 1)."""
    given = [node.inputs[i] if len(node.inputs) > i else None for i in range(1, 5)]
    start, end = _int(given[0]), _int(given[1])
    axis = _int(given[2]) if given[2] is not None else 0
    step = _int(given[3]) if given[3] is not None else 1
    if start is None or end is None or axis is None or step != 1 or start < 0 or end != start + 1:
        return None
    return axis, start


def _split_part(node: ir.Node | None, out: ir.Value) -> tuple[int, int] | None:
    """(axis, k) when ``out`` is output k of Split ``node`` into single indices (sizes all 1, or none given: the
    matcher then checks the output count is the part count)."""
    if node is None:
        return None
    given = len(node.inputs) > 1 and node.inputs[1] is not None
    sizes = folded(node.inputs[1]) if given else attr(node, "split", None)
    if (given and sizes is None) or (sizes is not None and any(int(v) != 1 for v in np.ravel(sizes))):
        return None
    return int(attr(node, "axis", 0)), list(node.outputs).index(out)


def pick(node: ir.Node) -> Pick | str:
    """The packed pick whose last node is ``node`` (a Squeeze or Gather), or why it is not one."""
    if node.op_type == "Gather":
        axis, part, taken, nodes = int(attr(node, "axis", 0)), _int(node.inputs[1]), node.inputs[0], [node]
        index = folded(node.inputs[1])
        if part is None or index is None or index.ndim != 0:
            return "a Gather that does not pick one constant index"
    else:
        cut = producer(node.inputs[0], "Slice", "Split")
        found = _sliced_part(cut) if cut is not None and cut.op_type == "Slice" else _split_part(cut, node.inputs[0])
        if found is None or _squeezed_axis(node) is None:
            return "a Squeeze that does not drop one Slice'd or Split index"
        axis, part = found
        if _squeezed_axis(node) % 5 != axis % 5:
            return "a Squeeze of another axis than its Slice's or Split's"
        taken, nodes = cut.inputs[0], [node, cut]
    order = list(range(5))
    trans = producer(taken, "Transpose")
    if trans is not None:
        order = [int(p) for p in attr(trans, "perm", range(4, -1, -1))]
        nodes.append(trans)
        taken = trans.inputs[0]
    split = producer(taken, "Reshape")
    if split is None or len(order) != 5:
        return "a pick that does not come from a Reshape to rank 5"
    labels = [PACKED_LABELS[p] for p in order]
    if part < 0 or labels[axis % 5] != "p":
        return "a pick on another axis than the parts of the packed Q/K/V"
    del labels[axis % 5]
    cut = nodes[1] if len(nodes) > 1 and nodes[1].op_type == "Split" else None
    sized = cut is not None and (len(cut.inputs) > 1 and cut.inputs[1] is not None or attr(cut, "split", None))
    return Pick(part, "".join(labels), split, [*nodes, split], len(cut.outputs) if cut and not sized else None)


def flat_softmax(probs: ir.Value) -> tuple[ir.Node, list[ir.Node], ir.Value] | None:
    """(the Softmax, the Flatten/Shape/Reshape around it, its 4-D input) when ``probs`` is
    Reshape(Softmax(Flatten(x, axis=rank-1), axis=-1), Shape(x)), else None."""
    back = producer(probs, "Reshape")
    soft = producer(back.inputs[0], "Softmax") if back is not None else None
    flat = producer(soft.inputs[0], "Flatten") if soft is not None else None
    shape = producer(back.inputs[1], "Shape") if flat is not None else None
    if shape is None or shape.inputs[0] is not flat.inputs[0] or shape.attributes:
        return None
    x = flat.inputs[0]
    rank = x.shape.rank() if x.shape is not None else None
    axis = int(attr(flat, "axis", 1))
    # Shape inference often loses the rank after an export's computed Reshapes: axis 3 is then taken as the
    # last, which the matcher proves (the scores of its 4-D Q and Kᵀ, a mask of rank <= 4, are 4-D).
    last = axis % rank == rank - 1 if rank is not None else axis in (-1, 3)
    if not last or int(attr(soft, "axis", -1)) not in (-1, 1):
        return None
    return soft, [flat, shape, back], x


def columns(graph: ir.Graph, name: str, packed: ir.Value, part: int, width: int) -> tuple[ir.Node, ir.Value]:
    """Slice of the last axis: columns part·width + [0, width) of the packed projection (one side's input)."""
    bounds = [set_initializer(graph, f"{name}_{what}", np.array([v], np.int64))
              for what, v in (("start", part * width), ("end", (part + 1) * width), ("axis", -1))]
    node = ir.node("Slice", [packed, *bounds])
    out = node.outputs[0]
    out.type = packed.type
    if packed.shape is not None and packed.type is not None:  # a shape without a type is not serialized
        out.shape = ir.Shape([*list(packed.shape)[:-1], width])
    return node, out
