"""The saturation check for any int8 model: which layers can overflow an AVX2-class u8×s8 kernel, and what that
does to the outputs, emulated on any CPU.

:func:`find_layers` reads a QDQ model (graphopt's or onnxruntime's quantizer's): each default-domain
Conv/MatMul/Gemm whose input is a DequantizeLinear of 8-bit activations and whose weight is a DequantizeLinear of
int8 constants, with the weight pairs (:class:`graphopt.saturation.KernelOrder`) that can leave int16 for some
activation bytes — a bound from the weights alone.

:func:`emulate` writes a copy of the model whose float graph computes what the saturating kernel computes: for
every pair that can overflow, a side branch recomputes the pair sum from the activation bytes (the
QuantizeLinear output, padded with the zero point as the kernel pads), clips it to int16 and adds the clipped
difference, scaled, to the layer's output. Run with onnxruntime's graph optimizations off (every QDQ pair then
runs as float), the copy gives an AVX2 machine's outputs on any machine, and its ``saturated::<layer>`` outputs
count the pair sums that clipped.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from graphopt import saturation as sat
from graphopt.formatting import table
from graphopt.metrics import Comparison, compare
from graphopt.runtime import make_session
from graphopt.graphs import attr, is_default_domain
from graphopt.weights import constant_array, set_initializer

COUNT_PREFIX = "saturated::"


@dataclasses.dataclass
class Layer:
    """One int8 layer read by a pairing kernel, and its pairs that can overflow."""

    node: ir.Node
    order: sat.KernelOrder
    x_q: ir.Value  # the activation bytes
    x_scale: float
    x_zero_point: int
    x_shift: int  # 128 for int8 activations: onnxruntime feeds x + 128 to the uint8 kernel
    w_q: np.ndarray  # int8, as stored
    w_scale: np.ndarray  # one per output channel (or a scalar)
    risky: list[tuple[int, int]]  # (kernel row, pair index) whose same-sign |q0| + |q1| > 128
    channels: int  # kernel rows

    @property
    def worst_pair(self) -> int:
        return sat.worst_pair(self.order.rows(self.w_q))

    def row(self) -> dict:
        rows = {r for r, _ in self.risky}
        return {"node": self.node.name, "op": self.node.op_type, "channels": self.channels,
                "channels_at_risk": len(rows), "pairs_at_risk": len(self.risky),
                "worst_pair_sum": self.worst_pair, "int16_limit": sat.INT16_MAX}


def _dq_const(value: ir.Value | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int | None] | None:
    """(q, scale, zero point, axis) of a DequantizeLinear of constants, else None. A weight quantized at run
    time (QuantizeLinear of a constant, as onnxruntime's quantizer writes weights held in Constant nodes) counts
    as its constant-folded bytes: onnxruntime folds it before the kernel sees it."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "DequantizeLinear" or not is_default_domain(node):
        return None
    arrays = [constant_array(v, nodes=True) if v is not None else None for v in node.inputs]
    if arrays[0] is None and arrays[1] is not None:
        arrays[0] = _quantized_const(node.inputs[0])
    if arrays[0] is None or arrays[1] is None:
        return None
    zp = arrays[2] if len(arrays) > 2 and arrays[2] is not None else np.zeros((), arrays[0].dtype)
    return arrays[0], arrays[1], zp, attr(node, "axis", 1)


def _quantized_const(value: ir.Value) -> np.ndarray | None:
    """QuantizeLinear(constant, scale, zero point) evaluated (round half to even, saturate), else None."""
    node = value.producer()
    if node is None or node.op_type != "QuantizeLinear" or not is_default_domain(node):
        return None
    arrays = [constant_array(v, nodes=True) if v is not None else None for v in node.inputs]
    if len(arrays) < 3 or any(a is None for a in arrays[:3]) or arrays[2].dtype not in (np.int8, np.uint8):
        return None
    x, scale, zp = arrays[0].astype(np.float32), arrays[1].astype(np.float32), arrays[2]
    if scale.size > 1:  # per channel along ``axis``
        shape = [1] * x.ndim
        shape[attr(node, "axis", 1) % x.ndim] = scale.size
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    info = np.iinfo(zp.dtype)
    return np.clip(np.rint(x / scale) + zp.astype(np.int32), info.min, info.max).astype(zp.dtype)


def _activation(value: ir.Value) -> tuple[ir.Value, float, int, int] | None:
    """(bytes, scale, zero point, shift) when ``value`` is DequantizeLinear(8-bit bytes, scalar scale, zero
    point). onnxruntime runs int8 QDQ activations as uint8 (x + 128, shift 128) through the same kernel."""
    node = value.producer()
    if node is None or node.op_type != "DequantizeLinear" or not is_default_domain(node):
        return None
    x_q = node.inputs[0]
    scale = constant_array(node.inputs[1], nodes=True)
    zp = constant_array(node.inputs[2], nodes=True) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    dtype = zp.dtype if zp is not None else (x_q.dtype.numpy() if x_q.dtype is not None else None)
    if dtype not in (np.uint8, np.int8) or scale is None or scale.size != 1 or zp.size != 1:
        return None
    return x_q, float(scale.reshape(())), int(zp.reshape(())), 128 if dtype == np.int8 else 0


def find_layers(model: ir.Model) -> list[Layer]:
    """Every main-graph int8 Conv/MatMul/Gemm read by a pairing u8×s8 kernel, with its pairs at risk."""
    return [c for c in map(_classify, model.graph) if isinstance(c, Layer)]


def skipped_layers(model: ir.Model) -> dict[str, int]:
    """The other QDQ Conv/MatMul/Gemm layers, counted by why the check leaves them out."""
    reasons = [c for c in map(_classify, model.graph) if isinstance(c, str)]
    return {r: reasons.count(r) for r in dict.fromkeys(reasons)}


def _classify(node: ir.Node) -> Layer | str | None:
    """A Layer when a pairing kernel reads ``node``, the reason it is exact when it is another QDQ
    Conv/MatMul/Gemm, None when it is not one."""
    if node.op_type not in ("Conv", "MatMul", "Gemm") or not is_default_domain(node):
        return None
    act = _activation(node.inputs[0])
    weight = _dq_const(node.inputs[1]) if len(node.inputs) > 1 else None
    if act is None or weight is None:
        return None
    if weight[0].dtype != np.int8:
        return "uint8 weights (u8×u8 kernels widen to 16 bits)"
    if np.any(weight[2] != 0):
        return "int8 weights with a zero point (not a symmetric u8×s8 kernel)"
    if node.op_type == "Gemm" and attr(node, "transA", 0):
        return "Gemm with transA (not checked)"
    order = sat.kernel_order(node, weight[0].shape)
    if order is None:
        return "depthwise or transposed convolution (exact kernels)"
    if order.op == "MatMul" and weight[0].ndim != 2:
        return "batched MatMul weights (not checked)"
    rows = order.rows(weight[0]).astype(np.int32)
    risky = [(int(r), int(j)) for r, j in zip(*np.nonzero(sat.pair_magnitudes(rows) > sat.PAIR_LIMIT))]
    return Layer(node, order, *act, weight[0], np.asarray(weight[1], np.float32), risky, rows.shape[0])


class _Builder:
    def __init__(self, graph: ir.Graph, anchor: ir.Node) -> None:
        self.graph, self.anchor, self.nodes = graph, anchor, []

    def op(self, op: str, inputs: list, **attrs) -> ir.Value:
        node = ir.node(op, inputs, attrs or None, name=f"{self.anchor.name}_sat_{len(self.nodes)}")
        node.outputs[0].name = node.name
        self.nodes.append(node)
        return node.outputs[0]

    def const(self, hint: str, array: np.ndarray) -> ir.Value:
        return set_initializer(self.graph, f"{self.anchor.name}_sat_{hint}", array)


def _pair_elements(layer: Layer) -> np.ndarray:
    """For each risky pair, the flat weight index of both members (-1: K padding), shape [R, 2]."""
    index = layer.order.rows(np.arange(1, layer.w_q.size + 1).reshape(layer.w_q.shape))  # 0 marks padding
    return np.array([[index[r, 2 * j] - 1, index[r, 2 * j + 1] - 1] for r, j in layer.risky], np.int64)


def _matmul_pair_sums(b: _Builder, layer: Layer, raw: ir.Value, members: np.ndarray) -> tuple[ir.Value, np.ndarray]:
    """Pair sums [..., R] of a MatMul/Gemm and the output column of each pair."""
    w = layer.w_q
    k_idx, col = np.unravel_index(np.maximum(members, 0), w.shape)  # MatMul [K, N]
    if layer.order.op == "Gemm" and layer.order.trans_b:  # [N, K]
        col, k_idx = k_idx, col
    wvals = np.where(members >= 0, w.reshape(-1)[np.maximum(members, 0)], 0).astype(np.float32)
    picked = b.op("Gather", [raw, b.const("index", k_idx.reshape(-1).astype(np.int64))], axis=-1)
    shape = b.op("Concat", [b.op("Slice", [b.op("Shape", [raw]), b.const("s0", np.array([0], np.int64)),
                                          b.const("s1", np.array([-1], np.int64))]),
                            b.const("tail", np.array([len(members), 2], np.int64))], axis=0)
    pairs = b.op("Reshape", [picked, shape])
    sums = b.op("ReduceSum", [b.op("Mul", [pairs, b.const("w", wvals)]), b.const("axes", np.array([-1], np.int64))],
                keepdims=0)
    return sums, col[:, 0]


def _conv_pair_sums(b: _Builder, layer: Layer, raw: ir.Value, members: np.ndarray) -> tuple[ir.Value, np.ndarray]:
    """Pair sums [N, R, *out] of a Conv (each pair a 2-channel group of a grouped Conv) and their channels."""
    node, w = layer.node, layer.w_q
    cout, cin_g, kernel = w.shape[0], w.shape[1], w.shape[2:]
    group = layer.order.group
    idx = np.unravel_index(np.maximum(members, 0), w.shape)
    co, c = idx[0], idx[1]
    channel = co // (cout // group) * cin_g + c  # absolute input channel
    wk = np.zeros((len(members), 2, *kernel), np.float32)
    for r in range(len(members)):
        for e in range(2):
            if members[r, e] >= 0:
                wk[(r, e, *[i[r, e] for i in idx[2:]])] = w.reshape(-1)[members[r, e]]
    nd = len(kernel)
    pads = list(attr(node, "pads", [0] * (2 * nd)))
    padded = b.op("Pad", [raw, b.const("pads", np.array([0, 0, *pads[:nd], 0, 0, *pads[nd:]], np.int64)),
                          b.const("pad_value", np.array(layer.x_zero_point + layer.x_shift, np.float32))])
    picked = b.op("Gather", [padded, b.const("index", channel.reshape(-1).astype(np.int64))], axis=1)
    sums = b.op("Conv", [picked, b.const("w", wk)], group=len(members),
                strides=list(attr(node, "strides", [1] * nd)), dilations=list(attr(node, "dilations", [1] * nd)))
    return sums, co[:, 0]


def emulate(model: ir.Model, counts: bool = True) -> ir.Model:
    """A copy of ``model`` computing a saturating kernel's outputs (see the module doc); ``counts`` adds one
    ``saturated::<layer>`` output per layer at risk: how many pair sums clipped in the run."""
    out = model.clone()
    for layer in find_layers(out):
        node = layer.node
        if not layer.risky or (layer.order.op == "Conv" and attr(node, "auto_pad", "NOTSET") not in
                                ("NOTSET", "VALID")):
            continue
        b = _Builder(out.graph, node)
        x_q = node.inputs[0].producer().inputs[0]
        raw = b.op("Cast", [x_q], to=ir.DataType.FLOAT)
        if layer.x_shift:
            raw = b.op("Add", [raw, b.const("shift", np.array(layer.x_shift, np.float32))])
        members = _pair_elements(layer)
        build = _conv_pair_sums if layer.order.op == "Conv" else _matmul_pair_sums
        sums, channel = build(b, layer, raw, members)
        over = b.op("Relu", [b.op("Sub", [sums, b.const("hi", np.array(sat.INT16_MAX, np.float32))])])
        under = b.op("Relu", [b.op("Sub", [b.const("lo", np.array(sat.INT16_MIN, np.float32)), sums])])
        lost = b.op("Sub", [under, over])  # clipped minus exact, per pair
        w_scale = np.broadcast_to(layer.w_scale.reshape(-1), (layer.channels,)) if layer.w_scale.size > 1 \
            else np.full(layer.channels, float(layer.w_scale.reshape(())), np.float32)
        spread = np.zeros((len(members), layer.channels), np.float32)
        spread[np.arange(len(members)), channel] = layer.x_scale * w_scale[channel]
        if layer.order.op == "Conv":
            nd = layer.w_q.ndim - 2
            fix = b.op("Conv", [lost, b.const("spread", spread.T.reshape(*spread.T.shape, *[1] * nd).copy())])
        else:
            fix = b.op("MatMul", [lost, b.const("spread", spread)])
        y = node.outputs[0]
        fixed = b.op("Add", [y, fix])
        if counts:
            clipped = b.op("ReduceSum", [b.op("Sign", [b.op("Add", [over, under])])], keepdims=0)
            clipped.name = f"{COUNT_PREFIX}{node.name}"
            clipped.type, clipped.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape([])
        uses = [u for u in y.uses() if u.node is not fixed.producer()]
        out.graph.insert_after(node, b.nodes)
        for use in uses:
            use.node.replace_input_with(use.idx, fixed)
        if y.is_graph_output():
            out.graph.outputs[:] = [fixed if v is y else v for v in out.graph.outputs]
            fixed.name, y.name = y.name, f"{y.name}_unsaturated"
        fixed.type, fixed.shape = y.type, y.shape
        if counts:
            out.graph.outputs.append(clipped)
    return out


@dataclasses.dataclass
class SaturationReport:
    """:func:`check`'s answer: the layers, and with data what clipping does (emulated AVX2 vs exact int32)."""

    layers: list[dict]
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # why -> how many QDQ layers
    samples: int = 0
    clipped_per_sample: dict[str, float] = dataclasses.field(default_factory=dict)
    emulated: Comparison | None = None  # the emulated AVX2 outputs against the exact (int32) ones

    @property
    def at_risk(self) -> list[dict]:
        return [r for r in self.layers if r["pairs_at_risk"]]


def check(model: ir.Model, dataset=None, threads: int = 1) -> SaturationReport:
    """Which int8 layers can saturate an AVX2-class u8×s8 kernel (a bound from the weights), and with a
    Dataset how many pair sums clip per sample and what that does to the outputs (both models run with graph
    optimizations off, so the exact one is int32-exact on any CPU)."""
    layers = find_layers(model)
    report = SaturationReport([layer.row() for layer in layers], skipped_layers(model))
    if dataset is None or not report.at_risk:
        return report
    emulated = emulate(model)
    exact_s = make_session(model, threads, optimize=False)
    emu_s = make_session(emulated, threads, optimize=False)
    names = [o.name for o in exact_s.get_outputs()]
    emu_names = [o.name for o in emu_s.get_outputs()]
    refs, cands, counts = [], [], np.zeros(len(emu_names) - len(names))
    for feed in dataset.feeds:
        refs.append(exact_s.run(None, dict(feed)))
        got = emu_s.run(None, dict(feed))
        cands.append(got[:len(names)])
        counts += [float(v) for v in got[len(names):]]
    report.samples = dataset.num_samples
    report.clipped_per_sample = {n.removeprefix(COUNT_PREFIX): c / max(report.samples, 1)
                                 for n, c in zip(emu_names[len(names):], counts)}
    report.emulated = compare(names, refs, cands, dataset.labels)
    return report


def format_report(report: SaturationReport) -> str:
    """Plain text for `graphopt inspect`."""
    skipped = "; ".join(f"{n} with {why}" for why, n in report.skipped.items())
    if not report.layers:
        return ("int8 saturation: no int8 Conv/MatMul/Gemm read by a u8×s8 kernel (nothing an AVX2 kernel can "
                "clip)" + (f"; QDQ layers: {skipped}" if skipped else ""))
    lines = [f"int8 saturation on AVX2-class u8×s8 kernels (no VNNI): {len(report.at_risk)} of "
             f"{len(report.layers)} int8 layers can overflow an int16 pair sum (limit {sat.INT16_MAX})"]
    if skipped:
        lines.append(f"left out: {skipped}")
    if not report.at_risk:
        lines[0] += ": none, safe on any CPU"
        return "\n".join(lines)
    head = ["layer", "op", "channels at risk", "pairs at risk", "worst pair sum"]
    if report.samples:
        head.append("clipped per sample")
    rows = []
    for r in report.at_risk:
        row = [r["node"], r["op"], f"{r['channels_at_risk']}/{r['channels']}", str(r["pairs_at_risk"]),
               f"{r['worst_pair_sum']} (x{r['worst_pair_sum'] / sat.INT16_MAX:.2f})"]
        if report.samples:
            row.append(f"{report.clipped_per_sample.get(r['node'], 0.0):.1f}")
        rows.append(row)
    lines.append(table(head, rows))
    cmp = report.emulated
    if cmp is not None:
        parts = [f"worst-channel SNR {cmp.worst_snr_db:.1f} dB"]
        if cmp.agreement is not None:
            parts.insert(0, f"top-1 agreement {cmp.agreement:.4f}")
        if cmp.accuracy is not None:
            parts.insert(0, f"accuracy {cmp.accuracy:.4f} (exact int32: {cmp.reference_accuracy:.4f})")
        lines.append(f"emulated on AVX2 over {report.samples} samples, against exact int32: " + ", ".join(parts))
    else:
        lines.append("give --data to count the clipped sums and emulate the outputs on AVX2")
    return "\n".join(lines)
