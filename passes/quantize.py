"""quantize: static int8 post-training quantization in QDQ form (onnxruntime's integer kernels).

The pass runs in four separable steps, so placement and accuracy budgets can replace one of them:

1. :func:`plan` decides which nodes may be quantized and why the others stay float (op coverage, exclusions,
   weights that are not plain initializers, ops with no int8 neighbour, a Concat joining very different ranges
   once ranges are known). Nodes inside If/Loop bodies get weight-only int8 (their activations cannot be
   captured as graph outputs, so they cannot be calibrated).
2. :meth:`Quantize.calibrate` measures the ranges of the tensors the plan needs (:mod:`.calibrate`).
3. :func:`.quant_select.select` narrows the plan: MatMul/Gemm/LSTM that run faster in dynamic int8 go to
   :mod:`.quant_dynamic` (``dynamic``), ops whose int8 kernel or int8 region is measured slower than float stay
   float (``target=latency``, :mod:`.quant_placement`), the most sensitive ops stay float until ``max_drop``
   holds on calibration data, and whole models decide (:mod:`.quant_select`): the placement or every planned op,
   uint8 or int8 activations (``activation_type=auto``), whichever measures fastest inside the budget.
4. :func:`.qdq.emit` writes exactly the chosen nodes with the given ranges.
5. ``bias_correction``: :func:`.quant_correct.correct_biases` subtracts each int8 layer's mean output shift
   (against the model before quantize) from its bias, and marks the model so ``bias_correct`` leaves it alone.
   The accuracy budget's whole-selection checks correct their candidates the same way (on fewer samples), so
   the budget judges the model that is emitted; the per-op sensitivity screen stays uncorrected.
"""

from __future__ import annotations

import collections
import dataclasses

import onnx_ir as ir

from graphopt.graphs import default_opset, infer_shapes, is_default_domain
from graphopt.options import BaseOptions, option
from graphopt.passbase import GraphoptPass, GraphoptResult
from graphopt.passes import calibrate as calib
from graphopt.passes import qdq
from graphopt.passes import quant_dynamic as qd
from graphopt.passes import quant_select
from graphopt.passes.quant_correct import correct_biases, mark_corrected
from graphopt.graphs import all_graphs
from graphopt.weights import constant_array, encoding_of

QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
                           "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat", "QGemm",
                           "QLinearAdd", "QLinearMul", "QLinearConcat", "DynamicQuantizeMatMul",
                           "DynamicQuantizeLSTM", "MatMulNBits"})


@dataclasses.dataclass(frozen=True)
class QuantizeOptions(BaseOptions):
    calibration: str = option("minmax", "how activation ranges are chosen",
                              choices=("minmax", "percentile", "entropy", "mse"))
    percentile: float = option(99.999, "percentile kept by calibration=percentile", low=50.0, high=100.0)
    activation_type: str = option("auto", "activation integer type; auto: uint8, and with target=latency int8 "
                                  "too where the whole model measures faster", choices=("auto", "uint8", "int8"))
    per_channel: bool = option(True, "one weight scale per output channel (false: per tensor)")
    target: str = option("latency", "latency: int8 only where measured faster than float on this machine, never "
                         "a slower model; size: every op that can be int8", choices=("latency", "size"))
    dynamic: str = option("auto", "MatMul/Gemm/LSTM in dynamic int8: auto (where measured fastest; LSTM always), "
                          "on (every MatMul/Gemm/LSTM), off (static QDQ only)", choices=("auto", "on", "off"))
    latency_budget_s: float = option(90.0, "seconds spent timing ops and the whole model (target=latency)", low=0.0)
    sensitivity_budget_s: float = option(120.0, "seconds spent measuring each op's accuracy effect", low=0.0)
    sensitivity_samples: int = option(16, "calibration samples per single-op sensitivity measurement", low=1)
    budget_samples: int = option(16, "calibration samples for each check of a whole selection against max_drop",
                                 low=1)
    bias_correction: bool = option(True, "correct each int8 layer's per-channel output mean shift (vs float) in "
                                   "its bias; the accuracy budget's checks see the corrected model")
    correction_samples: int = option(32, "calibration samples bias correction measures on (the budget's checks: "
                                     "a quarter of them, at least 4)", low=1)
    min_snr_db: float = option(30.0, "the accuracy budget when the gate metric is snr (no score output)")
    exclude_nodes: list[str] = option([], "node names kept float")
    exclude_ops: list[str] = option([], "op types kept float")
    quantize_outputs: bool = option(False, "also put Q/DQ on the model's outputs")
    concat_ratio: float = option(16.0, "a Concat whose input ranges differ more than this factor stays float",
                                 low=1.0)
    calib_samples: int = option(512, "calibration samples used at most", low=1)


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


def _range_ratio(ranges: dict[str, calib.Range], values: list[ir.Value]) -> float:
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


def plan(model: ir.Model, options: QuantizeOptions, ranges: dict[str, calib.Range] | None = None) -> Plan:
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
                 options: QuantizeOptions, ranges: dict[str, calib.Range] | None) -> str | None:
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


class Quantize(GraphoptPass):
    """Static int8 QDQ: per-channel int8 weights, int32 bias, calibrated uint8/int8 activations."""

    name = "quantize"
    summary = "static int8 (QDQ): int8 per-channel weights, int32 bias, calibrated activations"
    Options = QuantizeOptions
    data_required = True
    exact = False

    def accepts_slower(self) -> bool:
        return self.options.target == "size"

    # --- hooks ------------------------------------------------------------------------------------------
    def plan(self, model: ir.Model, ranges: dict[str, calib.Range] | None = None) -> Plan:
        return plan(model, self.options, ranges)

    def calibrate(self, model: ir.Model, names: list[str]) -> dict[str, calib.Range]:
        data = self.context.require_calib(self.name)
        return calib.calibrate(model, names, data, self.options.calibration, self.options.percentile,
                               threads=self.context.threads, max_samples=self.options.calib_samples,
                               progress=self.context.progress)

    def correcting(self) -> bool:
        """Bias correction applies: asked for and calibration data at hand."""
        return self.options.bias_correction and self.context.calib is not None

    def check_correction_samples(self) -> int:
        """Samples for the corrections inside the budget's checks (cheaper than the final one)."""
        return min(self.options.correction_samples, max(4, self.options.correction_samples // 4))

    layer_timer = None  # tests inject fake timings (see quant_placement.LayerTimer / ModelTimer)
    model_timer = None

    def select(self, model: ir.Model, planned: Plan, ranges: dict[str, calib.Range]) -> quant_select.Selection:
        """Latency placement, dynamic int8, the accuracy budget and the activation type
        (:func:`.quant_select.select`)."""
        return quant_select.select(self, model, planned, ranges, plan)

    def config(self, model: ir.Model) -> qdq.QdqConfig:
        """The emission config; ``activation_type=auto`` starts from uint8 (what x86 runs fast on most nets)."""
        opset = default_opset(model, 0)
        act = "uint8" if self.options.activation_type == "auto" else self.options.activation_type
        return qdq.QdqConfig(act, self.options.per_channel and opset >= 13, self.options.quantize_outputs,
                             self.context.target.saturates)

    # --- the pass -----------------------------------------------------------------------------------------
    def call(self, model: ir.Model) -> GraphoptResult:
        note = already_quantized(model)
        if note:
            return self.result(model, [], [note], modified=False)
        notes: list[str] = []
        if any(v.dtype is None for node in model.graph for v in node.outputs):

            shape_note = infer_shapes(model)
            if shape_note:
                notes.append(shape_note)
        if any(n.op_type == "BatchNormalization" for n in model.graph):
            notes.append("BatchNormalization present: run fold_batchnorm before quantize, else Conv-BN-Relu chains "
                         "cannot fuse into integer kernels (slower than float)")
        first = self.plan(model)
        ranges: dict[str, calib.Range] = {}
        if first.nodes:
            ranges = self.calibrate(model, first.tensors(self.options.quantize_outputs))
        chosen = self.select(model, self.plan(model, ranges), ranges)
        final = chosen.plan
        notes += chosen.notes
        cfg = dataclasses.replace(self.config(model), activation_type=chosen.activation_type)
        if self.options.per_channel and not cfg.per_channel:
            notes.append("opset < 13: per-axis DequantizeLinear needs 13 (run canonicalize); weights per tensor")
        skipped_rows = [{"node": n.name, "op": n.op_type, "action": "float", "reason": r}
                        for n, r in final.skipped.items()]
        reference = model.clone() if self.correcting() and final.nodes else None  # float, for bias correction
        rows = qdq.emit(model, final.nodes, ranges, cfg, self.mark) if final.nodes else []
        rows += qdq.emit_weights_only(final.weight_only, cfg, self.mark)
        if final.dynamic:
            rows += qd.emit_dynamic(model, final.dynamic, cfg.per_channel, self.mark, cfg.safe_pairs)
        if reference is not None:
            fixed, fix_notes = correct_biases(reference, model, self.context.calib, self.context.threads,
                                              self.options.correction_samples, mark=self.mark)
            notes += fix_notes
            rows += _merge_correction(rows, fixed)
            if any(r["action"] == "bias corrected" for r in fixed):
                mark_corrected(model, self.name)
        modified = bool(rows)
        counts = collections.Counter(r["op"] for r in rows if r["action"] == "int8")
        if counts:
            ops = ", ".join(f"{op} x{n}" for op, n in counts.most_common())
            notes.append(f"int8 ({cfg.activation_type} activations, {self.options.calibration} "
                         f"calibration): {ops}")
        if final.weight_only:
            notes.append(f"{len(final.weight_only)} node(s) inside If/Loop bodies: int8 weights only (float "
                         "activations; subgraph values cannot be calibrated)")
        if skipped_rows:
            notes.append(f"{len(skipped_rows)} node(s) stay float (see rows for the reason)")
        if not modified:
            notes.append("nothing to quantize")
        return self.result(model, rows + skipped_rows + chosen.rows, notes, modified=modified)


def _merge_correction(rows: list[dict], fixed: list[dict]) -> list[dict]:
    """Bias-correction rows go into their node's int8 row (key ``bias_correction``: one row per node); the
    ones without an int8 row are returned."""
    int8 = {r["node"]: r for r in rows if r.get("action") == "int8"}
    left = []
    for r in fixed:
        target = int8.get(r.get("node"))
        if target is None:
            left.append(r)
        else:
            target["bias_correction"] = {k: v for k, v in r.items() if k not in ("node", "op")}
    return left

