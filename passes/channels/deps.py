"""Channel dependency groups for structured pruning (analysis only: nothing here edits the model).

Model (after Torch-Pruning's DepGraph, redone for ONNX graphs): every prunable layer (Conv, ConvTranspose
group=1, Gemm, MatMul with a constant weight) creates an *atom*: its output channels. A value that carries
channels has a :class:`Chan` state: a list of segments (atom, start, length) laid out along its channel axis
(Concat appends segments, Split/Slice cut them, a channel shuffle permutes them), the axis counted from the
end (broadcasting aligns from the right) and a ``block`` (Flatten of C×H×W makes every channel a block of
H·W features). Residual joins (Add/Sum/Mul/Sub/…) unite the atoms meeting there (union-find): one group
prunes the same indices. Grouped convs and shuffles add constraints (equal counts per conv group, shuffle
columns removed whole) that :mod:`units` solves into removal units of several channels. Attention heads are
such units: a Reshape [.., D] -> [.., H, d] lays a projection's channels out as heads (:mod:`heads`), ties
make each head's d channels go together, and Q, K, V meet in the score MatMuls; one projection packing Q, K
and V, reshaped to [.., 3, H, d] and picked apart, is :mod:`packed`; onnxruntime's fused MultiHeadAttention
is :mod:`fused`.

Every tensor that must shrink is a :class:`Slot` (a constant input of a node and its axis); each atom records
:class:`Link` s telling where its channels land in each slot. Anything that cannot be proven (an unknown op,
a graph output, a reshape that moves the channel axis) *blocks* the atoms it touches, with the reason.
Op-specific rules live in :mod:`ops`, the record they fill in in :mod:`state`.
"""

from __future__ import annotations

import onnx_ir as ir

from graphopt.graphs import is_default_domain
from graphopt.passes.channels import fused, heads, ops, packed
from graphopt.passes.channels.state import Analysis
from graphopt.passes.channels.types import Chan, Group, label
from graphopt.passes.channels.units import build_groups


def analyze(model: ir.Model, shapes: dict[str, tuple]) -> tuple[Analysis, list[Group]]:
    """Dependency groups of the main graph (``shapes``: inferred value dims, as graphopt.costs.value_dims);
    the Analysis also holds the nodes whose attributes follow the pruning (``fixups``)."""
    analysis = Analysis(model, shapes)
    graph = model.graph
    for node in graph:
        visit(analysis, node)
    for node in graph:
        block_captured(analysis, node)
    return analysis, build_groups(analysis.base_groups(), analysis.find, analysis.colorings, analysis.ties)


def block_captured(an: Analysis, node: ir.Node) -> None:
    """Values captured by If/Loop bodies: the body's shapes are out of reach."""
    for attr in node.attributes.values():
        if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            subs = attr.value if isinstance(attr.value, (list, tuple)) else [attr.value]
            for sub in subs:
                for inner in ir.traversal.RecursiveGraphIterator(sub):
                    for v in inner.inputs:
                        an.block(an.state.get(v), f"used inside the subgraph of {label(node)!r}")


def visit(an: Analysis, node: ir.Node) -> None:
    """Send ``node`` to its op rule; an op without one blocks the channels it reads."""
    ins: list[Chan | None] = [an.state.get(v) if v is not None else None for v in node.inputs]
    op = node.op_type
    if not is_default_domain(node):
        if node.domain == "com.microsoft" and op == "MultiHeadAttention":
            fused.multihead(an, node, ins)
            return
        if node.domain == "com.microsoft" and op in ops.CONTRIB_ELEMENTWISE and ins[0] is not None and not any(
                ins[1:]):
            ops.elementwise(an, node, ins)
            return
        for chan in ins:
            an.block(chan, f"custom op {node.domain}::{node.op_type} ({label(node)!r})")
        return
    if op == "MatMul" and (ins[1] is not None or (ins[0] is not None and ins[0].per > 1)):
        heads.batched_matmul(an, node, ins)
        return
    if op in ops.PRODUCERS:
        ops.layer(an, node, ins)
        return
    if not any(ins):
        return
    chan = next(c for c in ins if c is not None)
    if op == "Flatten" and ins[0] is not None and heads.flat_softmax(an, node, chan):
        return
    if any(c is not None and c.per > 1 for c in ins) and op not in HEAD_AWARE:
        for c in ins:
            an.block(c, f"{op} {label(node)!r} on attention heads is not supported")
        return
    if op in ops.UNARY and ins[0] is not None:
        ops.unary(an, node, chan)
    elif op in ops.BINARY or op in ("PRelu", "Where"):
        ops.elementwise(an, node, ins)
    elif op in ops.NORMALIZATIONS:
        ops.normalization(an, node, ins, chan)
    elif op == "Concat":
        ops.concat(an, node, ins)
    elif op == "Split":
        ops.split(an, node, chan)
    elif op == "Reshape" and ins[0] is not None and (heads.reshape(an, node, chan) or packed.split(an, node, chan)
                                                     or heads.keep_width(an, node, chan)):
        pass
    elif op in ("Flatten", "Reshape") and ins[0] is not None:
        ops.reshape(an, node, chan)
    elif op == "Slice" and ins[0] is not None and not any(ins[1:]):
        ops.slice_(an, node, chan)
    elif op in ("Squeeze", "Unsqueeze") and ins[0] is not None and not any(ins[1:]):
        ops.squeeze(an, node, chan)
    elif op == "Transpose":
        heads.transpose(an, node, chan)
    elif op in ("Softmax", "LogSoftmax"):
        heads.softmax(an, node, chan)
    elif op == "Shape":
        heads.shape(an, node, chan)
    else:
        for c in ins:
            an.block(c, f"{op} {label(node)!r} is not channel-preserving (or not supported)")


# Ops whose rules understand a head layout (Chan.per > 1); pools and the rest block it.
HEAD_AWARE = (ops.UNARY - ops.POOLS) | ops.BINARY | {"Where", "Reshape", "Transpose", "Softmax", "LogSoftmax",
                                                     "Shape"}
