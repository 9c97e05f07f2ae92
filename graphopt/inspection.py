"""`graphopt inspect`: what a model holds — op histogram, parameters, MACs per layer, largest initializers."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import onnx_ir as ir

from graphopt.graphs import default_opset, is_default_domain
from graphopt.costs import LayerCost, count_params, layer_costs, stored_tensors
from graphopt.formatting import human, table


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


def describe_value(value: ir.Value) -> str:
    dtype = value.dtype.name if value.dtype is not None else "?"
    if value.shape is None:
        return f"{value.name}: {dtype}[?]"
    dims = ",".join(str(d) if isinstance(d, int) else (d.value or "?") for d in value.shape.dims)
    return f"{value.name}: {dtype}[{dims}]"


def _op_name(node: ir.Node) -> str:
    return node.op_type if is_default_domain(node) else f"{node.domain}::{node.op_type}"


def inspect_model(
    model: ir.Model, input_shapes: dict[str, tuple[int, ...]] | None = None, top: int = 10
) -> InspectReport:
    """Statistics of ``model``; it is not modified (shapes are inferred on a weight-less copy)."""
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    ops = dict(Counter(_op_name(n) for n in nodes).most_common())
    tensors = [
        (name, tuple(t.shape.numpy()), t.dtype.name, int(t.nbytes)) for name, t in stored_tensors(model)
    ]
    tensors.sort(key=lambda t: -t[3])
    layers = layer_costs(model, input_shapes)
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
    )


def _shape(shape: tuple[int, ...] | None) -> str:
    return "?" if shape is None else "[" + ",".join(map(str, shape)) + "]"


def format_inspect(report: InspectReport, max_layers: int = 50) -> str:
    """Plain-text report; the layer table shows the ``max_layers`` costliest layers (0 = all)."""
    domains = ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in sorted(report.opsets.items()))
    lines = [
        f"IR version {report.ir_version}, opsets: {domains or 'none'}",
        f"inputs:  {'; '.join(report.inputs) or '-'}",
        f"outputs: {'; '.join(report.outputs) or '-'}",
        f"nodes {report.nodes}, params {human(report.params)} ({report.params}), "
        f"MACs {human(report.macs)} ({report.macs})",
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
    if report.largest:
        rows = [[name, _shape(shape), dtype, human(nbytes, "B")] for name, shape, dtype, nbytes in report.largest]
        lines += ["", "largest tensors (initializers, Constants):", table(["name", "shape", "dtype", "size"], rows)]
    return "\n".join(lines)
