"""`graphopt inspect`: what a model holds — op histogram, parameters, MACs per layer and per block, largest
initializers.

MACs are counted at concrete input shapes: those given, else batch 1 with the other dynamic dims from the data's
first feed, else costs.DEFAULT_DIM; the report says which. A block is the compute between two layer
normalizations (a transformer's attention or FFN half); node names serve only to label blocks.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import onnx_ir as ir

from graphopt.graphs import default_opset, is_default_domain
from graphopt.costs import DEFAULT_DIM, LayerCost, count_params, layer_costs, resolve_input_shapes, stored_tensors
from graphopt.formatting import human, table

# Layer normalizations, fused or not, that bound a block; a spelled-out one is found by its x - ReduceMean(x).
_NORMS = {"LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
          "SkipSimplifiedLayerNormalization", "RMSNormalization"}


@dataclass
class BlockCost:
    after: str  # the normalization the block starts after ("inputs" for the first)
    label: str  # the common node-name prefix of its layers ("" when they share none)
    layers: int
    params: int
    macs: int


@dataclass
class InspectReport:
    ops: dict[str, int]  # "Conv" or "com.microsoft::QGemm" -> count, subgraphs included, most common first
    params: int
    macs: int
    layers: list[LayerCost]
    largest: list[tuple[str, tuple[int, ...], str, int]]  # name, shape, dtype, bytes (Constant tensors too)
    opset: int  # default-domain opset
    ir_version: int
    inputs: list[str] = field(default_factory=list)  # "name: FLOAT[1,3,224,224]"
    outputs: list[str] = field(default_factory=list)
    nodes: int = 0
    opsets: dict[str, int] = field(default_factory=dict)  # every imported domain
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # the input shapes MACs were counted at
    defaulted: dict[str, int] = field(default_factory=dict)  # symbolic dims no shape or data gave: their value
    blocks: list[BlockCost] = field(default_factory=list)  # compute between normalizations (2 or more of them)


def describe_value(value: ir.Value) -> str:
    dtype = value.dtype.name if value.dtype is not None else "?"
    if value.shape is None:
        return f"{value.name}: {dtype}[?]"
    dims = ",".join(str(d) if isinstance(d, int) else (d.value or "?") for d in value.shape.dims)
    return f"{value.name}: {dtype}[{dims}]"


def _op_name(node: ir.Node) -> str:
    return node.op_type if is_default_domain(node) else f"{node.domain}::{node.op_type}"


def _is_norm(node: ir.Node) -> bool:
    if node.op_type in _NORMS:
        return True
    if node.op_type != "ReduceMean" or not node.inputs or node.inputs[0] is None:
        return False  # spelled out: Sub(x, ReduceMean(x)) starts one
    source = node.inputs[0]
    return any(use.op_type == "Sub" and source in use.inputs for use, _ in node.outputs[0].uses())


def _common_prefix(names: list[str]) -> str:
    parts = [name.split("/") for name in names]
    common = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    prefix = "/".join(common)
    return prefix if len(common) > 1 or (common and common[0]) else ""


def block_costs(model: ir.Model, layers: list[LayerCost]) -> list[BlockCost]:
    """The layers of the main graph grouped by the normalizations between them (empty with fewer than two)."""
    by_name = {layer.node: layer for layer in layers}
    groups: list[tuple[str, list[LayerCost]]] = [("inputs", [])]
    for node in model.graph:
        if _is_norm(node):
            groups.append((node.name or node.outputs[0].name or "?", []))
        elif (node.name or (node.outputs[0].name if node.outputs else "")) in by_name:
            groups[-1][1].append(by_name[node.name or node.outputs[0].name])
    if len(groups) < 3:
        return []
    return [BlockCost(after, _common_prefix([c.node for c in members]), len(members),
                      sum(c.params for c in members), sum(c.macs for c in members))
            for after, members in groups if members]


def inspect_model(
    model: ir.Model, input_shapes: dict[str, tuple[int, ...]] | None = None, top: int = 10,
    feed: Mapping[str, np.ndarray] | None = None, default_dim: int = DEFAULT_DIM,
) -> InspectReport:
    """Statistics of ``model``; it is not modified (shapes are inferred on a weight-less copy). MACs at
    ``input_shapes``, else batch 1 with the other dynamic dims from ``feed`` (one sample of data), else
    ``default_dim``."""
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    ops = dict(Counter(_op_name(n) for n in nodes).most_common())
    tensors = [
        (name, tuple(t.shape.numpy()), t.dtype.name, int(t.nbytes)) for name, t in stored_tensors(model)
    ]
    tensors.sort(key=lambda t: -t[3])
    shapes, defaulted = resolve_input_shapes(model, input_shapes, feed, default_dim)
    layers = layer_costs(model, shapes)
    dim = default_dim
    while defaulted and any(c.note for c in layers) and dim > 8:  # a default past the model's own limits
        dim //= 2  # (a position table shorter than it): the largest power-of-two fraction that infers whole
        shorter, fewer = resolve_input_shapes(model, input_shapes, feed, dim)
        costs_there = layer_costs(model, shorter)
        if not any(c.note for c in costs_there):
            shapes, defaulted, layers = shorter, fewer, costs_there
    return InspectReport(
        ops=ops,
        params=count_params(model),
        macs=sum(layer.macs for layer in layers),
        layers=layers,
        largest=tensors[:top],
        opset=default_opset(model, 0),
        ir_version=model.ir_version,
        inputs=[describe_value(v) for v in model.graph.inputs if not v.is_initializer()],
        outputs=[describe_value(v) for v in model.graph.outputs],
        nodes=len(nodes),
        opsets=dict(model.opset_imports),
        shapes=shapes,
        defaulted=defaulted,
        blocks=block_costs(model, layers),
    )


def _shape(shape: tuple[int, ...] | None) -> str:
    return "?" if shape is None else "[" + ",".join(map(str, shape)) + "]"


def _shapes_lines(report: InspectReport) -> list[str]:
    if not report.shapes:
        return []
    at = ", ".join(f"{name} {_shape(dims)}" for name, dims in report.shapes.items())
    lines = [f"MACs per inference at {at}"]
    if report.defaulted:
        dims = ", ".join(f"{name} = {value}" for name, value in report.defaulted.items())
        lines.append(f"  {dims}: a default for a dynamic dimension (give --shape NAME=AxB or --data)")
    return lines


def format_inspect(report: InspectReport, max_layers: int = 50) -> str:
    """Plain-text report; the layer table shows the ``max_layers`` costliest layers (0 = all)."""
    domains = ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in sorted(report.opsets.items()))
    lines = [
        f"IR version {report.ir_version}, opsets: {domains or 'none'}",
        f"inputs:  {'; '.join(report.inputs) or '-'}",
        f"outputs: {'; '.join(report.outputs) or '-'}",
        f"nodes {report.nodes}, params {human(report.params)} ({report.params}), "
        f"MACs {human(report.macs)} ({report.macs})",
        *_shapes_lines(report),
        "",
        "ops:",
        table(["op", "count"], [[op, str(n)] for op, n in report.ops.items()]),
    ]
    if report.layers:
        total = report.macs or 1
        layers = sorted(report.layers, key=lambda c: -c.macs)
        shown = layers if max_layers <= 0 else layers[:max_layers]
        rows = [
            [c.node, c.op, _shape(c.output_shape), human(c.params), human(c.macs), f"{100 * c.macs / total:.1f}%", c.note]
            for c in shown
        ]
        title = "layers (by MACs):" if len(shown) == len(layers) else f"layers (top {len(shown)} of {len(layers)} by MACs):"
        lines += ["", title, table(["layer", "op", "output", "params", "MACs", "share", "note"], rows)]
        unknown = sum(1 for c in report.layers if c.note)
        if unknown:
            lines.append(
                f"{unknown} of {len(layers)} layers have unknown shapes and count 0 MACs: give the input shapes"
            )
    if report.blocks:
        total = report.macs or 1
        rows = [[str(i), b.after, b.label or "-", str(b.layers), human(b.params), human(b.macs),
                 f"{100 * b.macs / total:.1f}%"] for i, b in enumerate(report.blocks)]
        lines += ["", "blocks (the layers between two layer normalizations):",
                  table(["block", "after", "names", "layers", "params", "MACs", "share"], rows)]
    if report.largest:
        rows = [[name, _shape(shape), dtype, human(nbytes, "B")] for name, shape, dtype, nbytes in report.largest]
        lines += ["", "largest tensors (initializers, Constants):", table(["name", "shape", "dtype", "size"], rows)]
    return "\n".join(lines)
