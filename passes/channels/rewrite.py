"""Per-op rewrite handlers of channel pruning: slice every coupled tensor, fix the attributes that follow.

:func:`remove_channels` applies a plan (removed units per group) to the model the groups were found in.
:func:`removals` turns it into the channels each slot and each value loses (in the ORIGINAL indexing; several
groups may meet in one slot — a Concat's consumer — so each tensor is sliced once with the union). Constants
reached through Unsqueeze/Constant chains are folded into a new initializer; the chain is dropped when nothing
else uses it. With calibration means, each consumer's bias takes the removed channels' mean contribution.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import numpy as np
import onnx_ir as ir

from graphopt.errors import GraphoptError
from graphopt.graphs import attr, default_opset
from graphopt.linear import as_linear
from graphopt.passes.channels import targets
from graphopt.passes.channels.types import Group, Slot, const_array, label
from graphopt.weights import set_initializer, write_input


def expand(removed: np.ndarray, block: int) -> np.ndarray:
    """Channel indices -> entry indices when every channel is ``block`` consecutive entries."""
    removed = np.asarray(removed, dtype=np.int64)
    return (removed[:, None] * block + np.arange(block)[None, :]).reshape(-1)


def slice_grouped(array: np.ndarray, slot: Slot, removed: np.ndarray) -> np.ndarray:
    """Input-channel axis of a grouped Conv weight [Cout, Cin/g, ...]: group k's rows lose group k's removed
    input channels (each group its own columns; the analysis makes the counts equal)."""
    g, per = slot.groups, slot.channels // slot.groups
    if array.shape[slot.axis] != per or array.shape[0] % g:
        raise GraphoptError(f"{label(slot.node)!r}: weight {array.shape} does not match {slot.channels} input "
                            f"channels in {g} groups")
    rows = array.shape[0] // g
    parts, counts = [], set()
    for k in range(g):
        mine = removed[(removed >= k * per) & (removed < (k + 1) * per)] - k * per
        counts.add(len(mine))
        parts.append(np.delete(array[k * rows:(k + 1) * rows], mine, axis=slot.axis))
    if len(counts) != 1:
        raise GraphoptError(f"{label(slot.node)!r}: unequal channel removal across its {g} groups")
    return np.concatenate(parts, axis=0)


def slice_array(array: np.ndarray, slot: Slot, removed: np.ndarray) -> np.ndarray:
    if slot.groups > 1:
        return slice_grouped(array, slot, removed)
    size = array.shape[slot.axis]
    if size == 1 and slot.channels * slot.block != 1:
        return array  # broadcast along the channel axis
    if size != slot.channels * slot.block:
        raise GraphoptError(f"{label(slot.node)!r} input {slot.index}: axis {slot.axis} has {size} entries, the "
                            f"analysis expected {slot.channels}x{slot.block}")
    keep = np.setdiff1d(np.arange(size), expand(removed, slot.block))
    return np.take(array, keep, axis=slot.axis)


def _write_input(node: ir.Node, index: int, array: np.ndarray) -> ir.Value:
    """Give the node's input ``index`` new contents (a private copy, marks kept, when it is shared)."""
    return write_input(node, index, array, "pruned")


def apply_slots(slot_removed: dict[Slot, np.ndarray], mark: Callable[[ir.Node], object]) -> list[ir.Value]:
    """Slice every slot's constant; returns the values that were replaced (for cleanup)."""
    by_input: dict[tuple[ir.Node, int], list[Slot]] = defaultdict(list)
    for slot, removed in slot_removed.items():
        if len(removed):
            by_input[(slot.node, slot.index)].append(slot)
    dropped = []
    for (node, index), slots in by_input.items():
        value = node.inputs[index]
        array = const_array(value)
        if array is None:
            raise GraphoptError(f"{label(node)!r} input {index} is no longer a constant")
        for slot in sorted(slots, key=lambda s: -s.axis % max(array.ndim, 1)):
            array = slice_array(array, slot, slot_removed[slot])
        new = _write_input(node, index, np.ascontiguousarray(array))
        if new is not value:
            dropped.append(value)
        mark(node)
    return dropped


def _int64_input(node: ir.Node, index: int, values: list[int], hint: str) -> None:
    array = np.asarray(values, dtype=np.int64)
    if index < len(node.inputs) and node.inputs[index] is not None:
        _write_input(node, index, array)
        return
    graph = node.graph
    assert isinstance(graph, ir.Graph)
    value = set_initializer(graph, hint, array)
    if len(node.inputs) <= index:
        node.resize_inputs(index + 1)
    node.replace_input_with(index, value)


def apply_fixups(fixups: dict[ir.Node, dict], value_removed: dict[ir.Value, np.ndarray], opset: int,
                 mark: Callable[[ir.Node], object]) -> None:
    """Attributes and shape inputs that follow the channel counts: depthwise group, Split sizes, Reshape
    (flatten, channel shuffle, attention heads), MultiHeadAttention's num_heads."""
    for node, fix in fixups.items():
        removed = value_removed.get(fix["value"])
        if removed is None or not len(removed):
            continue
        kind = fix["kind"]
        if kind == "depthwise":
            group = int(node.attributes["group"].value)
            node.attributes["group"] = ir.AttrInt64("group", group - len(removed))
        elif kind == "split":
            sizes, start, new = fix["sizes"], 0, []
            for size in sizes:
                new.append(size - int(np.count_nonzero((removed >= start) & (removed < start + size))))
                start += size
            if opset >= 13:
                node.attributes.pop("num_outputs", None)
                _int64_input(node, 1, new, f"{label(node)}_split")
            else:
                node.attributes["split"] = ir.AttrInt64s("split", new)
        elif kind == "shuffle":
            _fix_shuffle(node, fix, removed, mark)
        elif kind == "slice":
            lo, hi, i = fix["lo"], fix["hi"], fix["index"]
            for index, bound in ((1, lo), (2, hi)):
                array = np.array(const_array(node.inputs[index])).reshape(-1)
                array[i] = bound - int(np.count_nonzero(removed < bound))
                _write_input(node, index, array)
        elif kind == "target":  # attention heads: the head count or the width in a Reshape target
            if len(removed) % int(fix["unit"]):
                raise GraphoptError(f"Reshape {label(node)!r}: {len(removed)} channels are not whole heads of "
                                    f"{fix['unit']}")
            lost = len(removed) // int(fix["unit"])
            targets.write(node, [(entry, entry.value - lost) for entry in fix["edits"]])
            for value in fix["between"]:
                value.shape = None  # a folded transpose's inner values: inference redoes them
        elif kind == "heads":  # com.microsoft MultiHeadAttention: num_heads follows the removed heads
            if len(removed) % int(fix["unit"]):
                raise GraphoptError(f"{label(node)!r}: {len(removed)} channels are not whole heads of {fix['unit']}")
            heads = int(node.attributes["num_heads"].value) - len(removed) // int(fix["unit"])
            node.attributes["num_heads"] = ir.AttrInt64("num_heads", heads)
        elif kind == "reshape":
            shape = np.asarray(fix["shape"], dtype=np.int64).copy()
            if shape[1] > 0:
                shape[1] -= len(removed) * int(fix["unit"])
            _int64_input(node, 1, list(shape), f"{label(node)}_shape")
        mark(node)


def _fix_shuffle(first: ir.Node, fix: dict, removed: np.ndarray, mark: Callable[[ir.Node], object]) -> None:
    """Channel shuffle: [N, a, b, *S] loses whole columns (b shrinks), the flat [N, C, *S] loses them all."""
    a = int(fix["a"])
    if len(removed) % a:
        raise GraphoptError(f"channel shuffle at {label(first)!r}: {len(removed)} channels is not whole columns of {a}")
    shape = np.asarray(fix["first_shape"], dtype=np.int64).copy()
    shape[2] -= len(removed) // a
    _int64_input(first, 1, list(shape), f"{label(first)}_shape")
    last = fix["last"]
    shape = np.asarray(fix["last_shape"], dtype=np.int64).copy()
    if shape[1] > 0:
        shape[1] -= len(removed)
    _int64_input(last, 1, list(shape), f"{label(last)}_shape")
    for value in fix["between"]:
        value.shape = None  # inference redoes it
    mark(last)


def forget_shapes(value_removed: dict[ir.Value, np.ndarray]) -> None:
    """Values that lost channels drop their stale shape annotation (inference and onnxruntime redo it)."""
    for value, removed in value_removed.items():
        if len(removed) and not value.is_graph_input() and not value.is_graph_output():
            value.shape = None


def drop_unused(graph: ir.Graph, values: list[ir.Value]) -> None:
    """Remove replaced constants (and the Unsqueeze/Constant chains that made them) nothing uses any more."""
    todo = list(values)
    while todo:
        value = todo.pop()
        if value.uses() or value.is_graph_output() or value.is_graph_input():
            continue
        if value.is_initializer():
            if value.name in graph.initializers and graph.initializers[value.name] is value:
                graph.initializers.pop(value.name)
            continue
        node = value.producer()
        if node is None or node.graph is not graph or any(o.uses() or o.is_graph_output() for o in node.outputs):
            continue
        inputs = [v for v in node.inputs if v is not None]
        graph.remove(node, safe=True)
        todo.extend(inputs)


# --- mean compensation: removed inputs are replaced by their calibration mean, folded into the bias ---------


def _output_axis(node: ir.Node) -> int | None:
    op = node.op_type
    if op == "Conv" and int(node.attributes["group"].value if "group" in node.attributes else 1) == 1:
        return 0
    if op == "Gemm":
        return 0 if attr(node, "transB", 0) else 1
    if op == "MatMul":
        return 1
    return None  # ConvTranspose: a constant input does not give a constant output (stride phases)


def mean_deltas(slot_removed: dict[Slot, np.ndarray], means: dict[str, np.ndarray]) -> dict[ir.Node, np.ndarray]:
    """Per consumer layer, the bias change (over its ORIGINAL outputs) that keeps the removed inputs' mean
    contribution: Σ_removed W[:, e] · mean(x_e), kernel taps summed (exact away from the padded border when
    the removed channel is constant). Removed channels are rarely zero: a bias or a learnable affine
    (x·s + b after an activation) makes them a non-zero constant, which plain slicing drops."""
    deltas: dict[ir.Node, np.ndarray] = {}
    for slot, removed in slot_removed.items():
        node = slot.node
        out_axis = _output_axis(node)
        if slot.role != "consumer" or slot.index != 1 or not len(removed) or out_axis is None:
            continue
        mean = means.get(node.inputs[0].name)
        w = const_array(node.inputs[1])
        if mean is None or w is None or mean.size != slot.channels * slot.block:
            continue
        entries = expand(removed, slot.block)
        part = np.take(w.astype(np.float64), entries, axis=slot.axis)
        shape = [1] * part.ndim
        shape[slot.axis] = len(entries)
        part = part * mean[entries].reshape(shape)
        delta = np.moveaxis(part, out_axis, 0).reshape(part.shape[out_axis], -1).sum(axis=1)
        if node.op_type == "Gemm":
            alpha, beta = (float(node.attributes[k].value) if k in node.attributes else 1.0 for k in ("alpha", "beta"))
            if beta == 0.0:
                continue
            delta *= alpha / beta
        deltas[node] = deltas[node] + delta if node in deltas else delta
    return deltas


def apply_bias_deltas(deltas: dict[ir.Node, np.ndarray], out_removed: dict[ir.Node, np.ndarray],
                      mark: Callable[[ir.Node], object]) -> int:
    """Add each delta (minus the layer's own removed outputs) to the layer's bias, creating it if needed
    (MatMul: the following bias Add, or a new Add). Returns how many layers changed."""
    changed = 0
    for node, delta in deltas.items():
        removed = out_removed.get(node)
        if removed is not None and len(removed):
            delta = np.delete(delta, removed)
        dtype = const_array(node.inputs[1]).dtype
        graph = node.graph
        assert isinstance(graph, ir.Graph)
        if node.op_type in ("Conv", "Gemm"):
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                bias = const_array(node.inputs[2])
                if bias is None:
                    continue
                _write_input(node, 2, np.ascontiguousarray((bias + delta).astype(dtype)))
            else:
                if len(node.inputs) < 3:
                    node.resize_inputs(3)
                node.replace_input_with(2, set_initializer(graph, f"{label(node)}_bias", delta.astype(dtype)))
        elif not _matmul_bias(node, delta.astype(dtype)):
            continue
        mark(node)
        changed += 1
    return changed


def _matmul_bias(node: ir.Node, delta: np.ndarray) -> bool:
    out = node.outputs[0]
    graph = node.graph
    assert isinstance(graph, ir.Graph)
    uses = list(out.uses())
    if len(uses) == 1 and uses[0].node.op_type == "Add" and not out.is_graph_output():
        add, idx = uses[0].node, uses[0].idx
        bias = const_array(add.inputs[1 - idx])
        if bias is not None and bias.shape[-1:] in ((delta.size,), (1,)) and bias.ndim <= 1:
            _write_input(add, 1 - idx, np.ascontiguousarray((bias + delta).astype(delta.dtype)))
            return True
    if out.is_graph_output():
        return False
    bias = set_initializer(graph, f"{label(node)}_bias", delta)
    add = ir.Node("", "Add", [out, bias], name=f"{label(node)}_bias_add")
    graph.insert_after(node, add)
    for use in uses:
        use.node.replace_input_with(use.idx, add.outputs[0])
    return True


def removals(groups: list[Group], plan: dict[int, np.ndarray]
             ) -> tuple[dict[Slot, np.ndarray], dict[ir.Value, np.ndarray]]:
    """Removed indices per slot and per value, in their own (original) channel indexing."""
    slot_removed: dict[Slot, set] = defaultdict(set)
    value_removed: dict[ir.Value, set] = defaultdict(set)
    for g in groups:
        removed = plan.get(g.id)
        if removed is None or not len(removed):
            continue
        for link in g.links:
            part = removed[(removed >= link.start) & (removed < link.start + link.length)]
            slot_removed[link.slot].update((part - link.start + link.offset).tolist())
        for value, link in g.values:
            part = removed[(removed >= link.start) & (removed < link.start + link.length)]
            value_removed[value].update((part - link.start + link.offset).tolist())
    as_array = lambda s: np.array(sorted(s), dtype=np.int64)  # noqa: E731
    return ({k: as_array(v) for k, v in slot_removed.items()}, {k: as_array(v) for k, v in value_removed.items()})


def remove_channels(model: ir.Model, fixups: dict[ir.Node, dict], groups: list[Group], plan: dict[int, np.ndarray],
                    means: dict[str, np.ndarray], mark: Callable[[ir.Node], object], notes: list[str],
                    note_grouped: bool = False) -> dict[Slot, np.ndarray]:
    """Remove the planned units of ``groups`` (found in this very model; ``fixups``: its analysis's), with
    mean compensation when ``means`` are given; ``note_grouped``: note the grouped conv consumers left
    uncompensated. Returns the removed indices per slot."""
    slot_removed, value_removed = removals(groups, plan)
    deltas = mean_deltas(slot_removed, means) if means else {}
    dropped = apply_slots(slot_removed, mark)
    apply_fixups(fixups, value_removed, int(default_opset(model, 13)), mark)
    if deltas:
        _compensate(deltas, slot_removed, mark, notes)
    grouped = sorted({label(s.node) for s in slot_removed if s.groups > 1 and len(slot_removed[s])})
    if grouped and note_grouped:
        notes.append(f"mean compensation: not done for {len(grouped)} grouped conv consumer(s) (their "
                     f"removed input channels' mean is dropped): {', '.join(grouped[:6])}")
    forget_shapes(value_removed)
    drop_unused(model.graph, dropped)
    return slot_removed


def _compensate(deltas: dict[ir.Node, np.ndarray], slot_removed: dict[Slot, np.ndarray],
                mark: Callable[[ir.Node], object], notes: list[str]) -> None:
    out_removed = {s.node: r for s, r in slot_removed.items() if s.role == "producer" and s.index == 1}
    # apply_bias_deltas skips a MatMul whose output is a graph output (an Add would rename it);
    # linear.set_matrix inserts the Add and moves the output name onto it. Such a MatMul never loses
    # output channels (model outputs keep their shape), so its delta is whole.
    at_output = {n: deltas.pop(n) for n in list(deltas) if n.op_type == "MatMul"
                 and n.outputs[0].is_graph_output() and as_linear(n) is not None}
    changed = apply_bias_deltas(deltas, out_removed, mark)
    for node, delta in at_output.items():
        layer = as_linear(node)
        assert layer is not None
        layer.set_matrix(layer.matrix(), delta)
        mark(node)
        changed += 1
    where = f" ({len(at_output)} through a new Add before a graph output)" if at_output else ""
    notes.append(f"mean compensation: {changed} consumer layer(s) took the removed channels' mean "
                 f"contribution into their bias{where}")
