"""Which weights a weight-rewriting pass may touch: constant float weights of linear nodes, owned by one node.

``find_targets`` walks every graph (subgraphs too) and returns a :class:`Target` per Conv/ConvTranspose/Gemm/
MatMul weight that the options allow; each weight it passes over for a reason the user should hear (already
compressed, not float, shared with another node, too small) is said in ``notes``. prune and kmeans use it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import onnx_ir as ir

from graphopt.errors import GraphoptError
from graphopt.graphs import all_nodes
from graphopt.weights import constant_array, encoding_of, owned_initializer, replace_initializer, weight_layout

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


def per_target(mapping: dict[str, Any], targets: list[Target], notes: list[str]) -> dict[str, Any]:
    """layer → value from a user mapping keyed by node or weight name ('*' for the rest); a name that matches no
    target is said in ``notes``."""
    unknown = set(mapping) - {"*"} - {t.layer for t in targets} - {t.value.name for t in targets}
    if unknown:
        notes.append(f"no layer of that name: {', '.join(sorted(unknown))}")
    chosen = {t.layer: mapping.get(t.layer, mapping.get(t.value.name, mapping.get("*"))) for t in targets}
    return {layer: v for layer, v in chosen.items() if v is not None}


def weight_editor(target: Target, new_weight: Callable[[np.ndarray], np.ndarray],
                  what: str) -> Callable[[ir.Model], None]:
    """An edit of a clone (for sensitivity and budget checks): the clone's copy of ``target``'s weight gets a new
    tensor ``new_weight(old array)`` (never written in place: clones share tensors with the model)."""
    layer, index = target.layer, target.index

    def apply(clone: ir.Model) -> None:
        for node in all_nodes(clone):
            value = node.inputs[index] if len(node.inputs) > index else None
            if value is not None and (node.name or value.name or "") == layer:
                replace_initializer(value, new_weight(constant_array(value)))
                return
        raise GraphoptError(f"{what}: layer {layer!r} not found in the copy")
    return apply
