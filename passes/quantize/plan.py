"""What quantize may quantize: the plan (which nodes go int8 and why the others stay float).

:func:`plan` decides from the graph alone (op coverage, exclusions, weights that are not plain initializers, ops
with no int8 neighbour) and, once ranges are known, from them (a Concat joining very different ranges stays
float). Nodes inside If/Loop bodies get weight-only int8 (their activations cannot be captured as graph outputs,
so they cannot be calibrated). The pass plans, calibrates what the plan needs, has :mod:`.select` narrow the plan
(re-planning with more exclusions as it measures), and emits exactly what is left.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from graphopt.graphs import all_graphs, is_default_domain
from graphopt.passes.quantize import qdq
from graphopt.passes.quantize.calibrate import Range
from graphopt.passes.quantize.options import QuantizeOptions
from graphopt.weights import constant_array, encoding_of

QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
                           "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat", "QGemm",
                           "QLinearAdd", "QLinearMul", "QLinearConcat", "DynamicQuantizeMatMul",
                           "DynamicQuantizeLSTM", "MatMulNBits", "GatherBlockQuantized"})


@dataclasses.dataclass
class Plan:
    """Nodes to quantize (main graph, graph order), weight-only nodes (subgraphs), and why others stay float."""

    nodes: list[ir.Node] = dataclasses.field(default_factory=list)
    weight_only: list[ir.Node] = dataclasses.field(default_factory=list)
    dynamic: list[ir.Node] = dataclasses.field(default_factory=list)  # MatMul/Gemm/LSTM in dynamic int8
    skipped: dict[ir.Node, str] = dataclasses.field(default_factory=dict)

    def tensors(self, quantize_outputs: bool = False) -> list[str]:
        """Names of the main-graph activations whose ranges emission needs."""
        names: dict[str, None] = {}
        for node in self.nodes:
            for i in qdq.activation_inputs(node):
                value = node.inputs[i]
                if not value.is_initializer():
                    names[value.name] = None
            if node.op_type not in qdq.SHARED_SCALE_OPS:
                names.update((v.name, None) for v in qdq.output_targets(node, quantize_outputs))
        return list(names)


def already_quantized(model: ir.Model) -> str | None:
    """A note when the model already holds quantization ops (quantizing twice would stack errors)."""
    for graph in all_graphs(model):
        for node in graph:
            if node.op_type in QUANTIZED_OPS:
                return f"model is already quantized ({node.op_type} node {node.name!r}); nothing done"
    return None


def _is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == ir.DataType.FLOAT


def _weight_reason(node: ir.Node) -> str | None:
    """Why a Conv/ConvTranspose/Gemm/MatMul weight cannot be quantized (None: it can)."""
    op = node.op_type
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return "no weight input"
    w = node.inputs[1]
    if encoding_of(w) is not None:
        return f"weight is already in a compressed form ({encoding_of(w)})"
    array = constant_array(w)
    if array is None:
        return None if op == "MatMul" else "weight is not a constant initializer"
    if array.dtype.kind != "f" or array.dtype.itemsize != 4:
        return f"weight is {array.dtype}, not float32"
    if op == "MatMul" and array.ndim < 2:
        return "MatMul with a 1-D constant"
    if op == "Gemm" and array.ndim != 2:
        return "Gemm weight is not 2-D"
    return None


def _unranged(node: ir.Node, acts: list[ir.Value], quantize_outputs: bool, ranges: dict[str, Range]) -> str | None:
    """The first activation the node's Q/DQ would need a range for that calibration could not give one."""
    needed = [v for v in acts if not v.is_initializer()]
    if node.op_type not in qdq.SHARED_SCALE_OPS:
        needed += qdq.output_targets(node, quantize_outputs)
    return next((v.name for v in needed if v.name not in ranges), None)


def _range_ratio(ranges: dict[str, Range], values: list[ir.Value]) -> float:
    widths = []
    for v in values:
        if v.is_initializer():
            array = constant_array(v)
            lo, hi = float(array.min(initial=0.0)), float(array.max(initial=0.0))
        elif v.name in ranges:
            lo, hi = ranges[v.name]
        else:
            continue
        widths.append(max(hi, 0.0) - min(lo, 0.0))
    if len(widths) < 2 or max(widths) == 0:
        return 1.0
    return max(widths) / max(min(widths), 1e-12)


def plan(model: ir.Model, options: QuantizeOptions, ranges: dict[str, Range] | None = None) -> Plan:
    """Which nodes are quantized and why the rest stay float. With ``ranges``, Concats joining ranges more than
    ``options.concat_ratio`` apart stay float (one scale would round the small ones to zero)."""
    result = Plan()
    excluded_nodes, excluded_ops = set(options.exclude_nodes), set(options.exclude_ops)
    int8_values: set[ir.Value] = set()  # activations that will carry int8 (outputs of chosen nodes)
    for node in model.graph:
        reason = _node_reason(node, excluded_nodes, excluded_ops, int8_values, options, ranges)
        if reason is None:
            result.nodes.append(node)
            int8_values.update(qdq.output_targets(node, options.quantize_outputs))
        elif reason:  # "" = silently float (folded Relu/Clip, Constant)
            result.skipped[node] = reason
    for graph in model.graph.subgraphs():
        for node in graph:
            if node.op_type not in qdq.WEIGHT_OPS or not is_default_domain(node):
                continue
            if node.name in excluded_nodes or node.op_type in excluded_ops:
                result.skipped[node] = "excluded by option"
            elif _weight_reason(node) is None and qdq.weight_index(node) is not None:
                result.weight_only.append(node)
            else:
                result.skipped[node] = _weight_reason(node) or "weight is not a constant initializer (subgraph)"
    return result


def _node_reason(node: ir.Node, excluded_nodes: set[str], excluded_ops: set[str], int8_values: set[ir.Value],
                 options: QuantizeOptions, ranges: dict[str, Range] | None) -> str | None:
    op = node.op_type
    if op in qdq.FOLD_OPS:
        producer = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
        if producer is not None and node.outputs[0] in int8_values:
            return ""  # its range is the quantized producer's output range; onnxruntime removes it
    if op == "Constant":
        return ""
    if not is_default_domain(node) or op not in qdq.COVERED_OPS:
        return f"op {op} not covered: stays float"
    if node.name in excluded_nodes:
        return "excluded by exclude_nodes"
    if op in excluded_ops:
        return "excluded by exclude_ops"
    acts = [node.inputs[i] for i in qdq.activation_inputs(node)]
    if not all(_is_float(v) for v in acts) or not all(_is_float(v) for v in node.outputs):
        return "not float32 (or element type unknown)"
    if ranges is not None and (unranged := _unranged(node, acts, options.quantize_outputs, ranges)):
        return f"{unranged} holds Inf or NaN on the calibration data (a mask?): no range to quantize it to"
    if op in qdq.WEIGHT_OPS:
        reason = _weight_reason(node)
        if reason:
            return reason
        if qdq.weight_index(node) is not None:
            return None
    data = [v for v in acts if not v.is_initializer()]
    if not data:
        return "no activation input"
    if op in qdq.SHARED_SCALE_OPS:
        if data[0] not in int8_values:
            return "input is not int8: a shape op only extends an int8 region"
        if all(v.is_graph_output() for v in node.outputs) and not options.quantize_outputs:
            return "output is a model output: stays float"
        return None
    if not any(v in int8_values for v in data):
        return "no int8 input: it would only add Q/DQ"
    if op == "Concat" and ranges is not None:
        ratio = _range_ratio(ranges, acts)
        if ratio > options.concat_ratio:
            return (f"Concat joins ranges {ratio:.0f}x apart (> concat_ratio {options.concat_ratio:g}): "
                    "one scale would flatten the small ones")
    return None
