"""Which weights a weight-rewriting pass may touch: constant float weights of linear nodes, owned by one node.

``find_targets`` walks every graph (subgraphs too) and returns a :class:`Target` per Conv/ConvTranspose/Gemm/
MatMul weight that the options allow; each weight it passes over for a reason the user should hear (already
compressed, not float, shared with another node, too small) is said in ``notes``. prune and kmeans use it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from graphopt.graphs import all_nodes
from graphopt.weights import constant_array, encoding_of, owned_initializer, weight_layout

FLOATS = (np.float16, np.float32, np.float64)


@dataclasses.dataclass
class Target:
    """One prunable/shareable weight: the node, its weight value and array, and the channel axes."""

    node: ir.Node
    index: int
    value: ir.Value
    array: np.ndarray
    out_axis: int
    in_axis: int

    @property
    def layer(self) -> str:
        return self.node.name or self.value.name or ""


def find_targets(model: ir.Model, skip_nodes: list[str], skip_ops: list[str], min_size: int,
                 notes: list[str], what: str) -> list[Target]:
    """Constant float weights of linear nodes that the options allow; reasons for the others go to ``notes``."""
    targets = []
    skipped_small = 0
    for node in all_nodes(model):
        layout = weight_layout(node, constant_a=True)  # MatMul: either side, a rank >= 2 constant
        if layout is None or layout.out_axis is None or layout.in_axis is None:
            continue
        index, out_axis, in_axis = layout.index, layout.out_axis, layout.in_axis
        value = node.inputs[index]
        name = node.name or ""
        if name in skip_nodes or (value is not None and value.name in skip_nodes) or node.op_type in skip_ops:
            continue
        kind = encoding_of(value)
        if kind is not None:
            notes.append(f"{name}: weight is already in a compressed form ({kind}); not {what}")
            continue
        array = constant_array(value)
        if array is None:
            continue
        if array.dtype.type not in FLOATS:
            notes.append(f"{name}: weight dtype {array.dtype} is not float; not {what}")
            continue
        owned = owned_initializer(node, index)
        if owned is None:
            notes.append(f"{name}: weight {value.name!r} is shared with other nodes; not {what}")
            continue
        if array.size < min_size:
            skipped_small += 1
            continue
        targets.append(Target(node, index, owned, array, out_axis, in_axis))
    if skipped_small:
        notes.append(f"{skipped_small} layer(s) below min_size elements left as they are")
    return targets
