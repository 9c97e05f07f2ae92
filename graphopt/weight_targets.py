"""Which weights a weight-rewriting pass may touch: constant float weights of linear nodes and embedding tables,
owned by one node.

``find_targets`` walks every graph (subgraphs too) and returns a :class:`Target` per Conv/ConvTranspose/Gemm/
MatMul weight and per embedding table that the options allow; each weight it passes over for a reason the user
should hear (already compressed, not float, shared with another node, too small) is said in ``notes``. prune and
kmeans use it.

An embedding table is input 0 of a default-domain Gather: a constant float initializer of rank >= 2 whose rows are
picked by indices computed at run time (token ids, positions). It is a MatMul weight met by a one-hot input:
``in_axis`` is the gathered axis (a row per token), ``out_axis`` the hidden axis (the last other axis). A Gather
whose indices are constants only is a weight slice (cleanup folds it), not a table.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import onnx_ir as ir

from graphopt.errors import GraphoptError
from graphopt.graphs import all_nodes, attr, is_default_domain
from graphopt.weights import (
    constant_array,
    constant_tensor,
    encoding_of,
    owned_initializer,
    replace_initializer,
    weight_layout,
)

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

    @property
    def table(self) -> bool:
        """An embedding table (Gather data): its rows are read, never multiplied."""
        return self.node.op_type == "Gather"


def table_layout(node: ir.Node, runtime: dict[int, bool]) -> tuple[int, int, int] | None:
    """(index 0, out_axis, in_axis) when ``node`` is a Gather of a rank >= 2 constant (or compressed) table by
    indices computed at run time, else None. ``runtime`` memoizes :func:`_computed_at_run_time`."""
    if node.op_type != "Gather" or not is_default_domain(node) or len(node.inputs) != 2:
        return None
    data, indices = node.inputs
    if data is None or indices is None:
        return None
    shape = data.shape
    tensor = constant_tensor(data, nodes=False)
    if tensor is not None:
        if not tensor.dtype.is_floating_point():  # integer lookups (shape arithmetic) are no embeddings
            return None
        shape = tensor.shape
    elif encoding_of(data) is None or _computed_at_run_time(data, runtime):
        return None  # not a table, or one that is already a compressed form (reported by find_targets)
    if shape is None or len(shape) < 2 or not _computed_at_run_time(indices, runtime):
        return None
    rank = len(shape)
    gathered = int(attr(node, "axis", 0)) % rank
    return 0, max(a for a in range(rank) if a != gathered), gathered


def _computed_at_run_time(value: ir.Value, memo: dict[int, bool]) -> bool:
    """Whether ``value`` depends on a graph input (or an outer value that is not a constant): iterative walk up
    the producers, memoized by value id."""
    stack = [value]
    while stack:
        v = stack[-1]
        if id(v) in memo:
            stack.pop()
            continue
        producer = v.producer()
        if producer is None:
            memo[id(v)] = constant_tensor(v, nodes=False) is None
            stack.pop()
            continue
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in producer.attributes.values()):
            memo[id(v)] = True  # If/Loop/Scan outputs: what the body computes is not walked
            stack.pop()
            continue
        pending = [i for i in producer.inputs if i is not None and id(i) not in memo]
        if pending:
            stack.extend(pending)
            continue
        memo[id(v)] = any(memo[id(i)] for i in producer.inputs if i is not None)
        stack.pop()
    return memo[id(value)]


def find_targets(model: ir.Model, skip_nodes: list[str], skip_ops: list[str], min_size: int,
                 notes: list[str], what: str) -> list[Target]:
    """Constant float weights of linear nodes and embedding tables that the options allow; reasons for the others
    go to ``notes``."""
    targets = []
    skipped_small = 0
    runtime: dict[int, bool] = {}
    for node in all_nodes(model):
        layout = weight_layout(node, constant_a=True)  # MatMul: either side, a rank >= 2 constant
        if layout is not None and layout.out_axis is not None and layout.in_axis is not None:
            index, out_axis, in_axis = layout.index, layout.out_axis, layout.in_axis
        else:
            table = table_layout(node, runtime)
            if table is None:
                continue
            index, out_axis, in_axis = table
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
