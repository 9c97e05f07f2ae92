"""QDQ emission on onnx_ir: the exact patterns onnxruntime fuses into integer kernels.

Given an explicit set of nodes and calibrated ranges, :func:`emit` writes
- DequantizeLinear on weights: int8 symmetric initializers, per output channel (Conv axis 0, ConvTranspose
  axis 1, Gemm transB=1 axis 0 / transB=0 axis 1, MatMul [K, N] axis 1: weights.weight_layout) or per tensor;
- int32 bias behind DequantizeLinear with scale = input scale × weight scale, zero point 0;
- QuantizeLinear → DequantizeLinear on every activation input and on each node's output — after a following
  Relu/Clip when that is the output's only consumer (onnxruntime removes the Relu/Clip into the Q's range);
- the same scale on the input and output of shape-only ops (MaxPool, Reshape, …), so onnxruntime drops their
  Q/DQ and runs them on int8 data.
Measured with onnxruntime 1.32 (optimized_model_filepath): DQ→Conv→Relu→Q becomes QLinearConv, MatMul
QLinearMatMul (or MatMulIntegerToFloat with a float output), Gemm QGemm, Add/Mul/Concat/AveragePool/
GlobalAveragePool their QLinear* forms; MaxPool/Flatten/Transpose run on uint8. A Conv whose output is not
quantized stays a float Conv. :func:`emit_weights_only` quantizes weights alone (float activations), for If/Loop
bodies whose activations cannot be calibrated. No DQ is left feeding a float data-movement op whose output reaches an
If/Loop/Scan body (onnxruntime 1.32 aborts the process propagating it there: ``PROPAGATING_OPS``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping

import numpy as np
import onnx_ir as ir

from graphopt import saturation
from graphopt.errors import GraphoptError
from graphopt.graphs import attr as _attr, is_default_domain
from graphopt.passes.quantize.calibrate import Range
from graphopt.passes.quantize.intweights import quantize_bias, quantize_tensor
from graphopt.weights import LINEAR_OPS, constant_array, constant_tensor, set_initializer, weight_layout

WEIGHT_OPS = frozenset(LINEAR_OPS)
OWN_SCALE_OPS = frozenset({"Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool"})
SHARED_SCALE_OPS = frozenset({"MaxPool", "Resize", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze",
                              "Slice", "Split"})
FOLD_OPS = frozenset({"Relu", "Clip"})
COVERED_OPS = WEIGHT_OPS | OWN_SCALE_OPS | SHARED_SCALE_OPS
# onnxruntime 1.32's QDQPropagationTransformer moves each DequantizeLinear forward through these (Identity is removed
# before it runs) until an edge group holds a QuantizeLinear. Where it meets a value read inside an If/Loop/Scan
# body it indexes the node's explicit inputs with the implicit input's slot: a C++ assertion aborts the process.
PROPAGATING_OPS = frozenset({"MaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Identity"})

_ACT = {"uint8": (np.uint8, 0, 255), "int8": (np.int8, -128, 127)}


@dataclasses.dataclass(frozen=True)
class QdqConfig:
    activation_type: str = "uint8"
    per_channel: bool = True
    quantize_outputs: bool = False
    safe_pairs: bool = True  # int8 weights cannot overflow a saturating u8×s8 kernel (graphopt.cpu targets)


def weight_index(node: ir.Node) -> int | None:
    """Input index of the constant weight, if the op takes one (MatMul: B when it is a constant initializer)."""
    layout = weight_layout(node)
    return None if layout is None else layout.index


def activation_inputs(node: ir.Node) -> list[int]:
    """Inputs quantized as activations (Q→DQ, or DQ alone for a float constant of Add/Mul/Concat)."""
    op = node.op_type
    if op in ("Conv", "ConvTranspose", "Gemm"):
        return [0]
    if op == "MatMul":
        return [0] if weight_index(node) is not None else [0, 1]
    if op in ("Add", "Mul", "Concat"):
        return [i for i, v in enumerate(node.inputs) if v is not None]
    return [0]  # pools and shape ops: the data input


def fold_target(node: ir.Node, quantize_outputs: bool = False) -> ir.Value:
    """Where the output's Q goes: after a Relu/Clip that is its only consumer (onnxruntime fuses it), unless
    that Relu/Clip gives a float model output (then the Q sits before it, so the node itself still fuses)."""
    out = node.outputs[0]
    if node.op_type in SHARED_SCALE_OPS or out.is_graph_output():
        return out
    uses = out.uses()
    if len(uses) != 1 or uses[0].idx != 0:
        return out
    user = uses[0].node
    if user.op_type not in FOLD_OPS or not is_default_domain(user) or user.graph is not node.graph:
        return out
    if user.outputs[0].is_graph_output() and not quantize_outputs:
        return out
    if user.op_type == "Clip" and any(v is not None and constant_array(v) is None for v in user.inputs[1:]):
        return out
    return user.outputs[0]


def output_targets(node: ir.Node, quantize_outputs: bool = False) -> list[ir.Value]:
    outs = [fold_target(node, quantize_outputs)] if node.op_type != "Split" else list(node.outputs)
    return [v for v in outs if v is not None and (quantize_outputs or not v.is_graph_output())]


def activation_qparams(lo: float, hi: float, activation_type: str = "uint8") -> tuple[np.float32, int]:
    """Asymmetric (scale, zero point) for a range widened to contain 0 (so 0 and Relu are exact)."""
    _, qmin, qmax = _ACT[activation_type]
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = np.float32((hi - lo) / (qmax - qmin))
    if not np.isfinite(scale) or scale <= 0:
        return np.float32(1.0), qmin if activation_type == "uint8" else 0
    zp = int(np.clip(np.round(qmin - lo / float(scale)), qmin, qmax))
    return scale, zp


class _Emitter:
    """Writes Q/DQ nodes and quantized initializers into one model; remembers shared scales and DQs."""

    def __init__(self, cfg: QdqConfig, mark: Callable[[ir.Node], ir.Node] | None, activations: bool = True) -> None:
        self.cfg = cfg
        self.activations = activations  # False: float activations, so no integer kernel reads the weights
        self.limited: dict[ir.Node, int] = {}  # channels requantized so no int16 pair sum overflows
        self.mark = mark or (lambda n: n)
        self.params: dict[ir.Value, tuple[np.float32, int]] = {}
        self.consts: dict[ir.Value, ir.Value] = {}  # (graph-owned) scale/zp initializers per quantized tensor
        self.weight_dq: dict[tuple, tuple[ir.Value, np.ndarray]] = {}
        self.replaced: list[ir.Value] = []
        self.pairs: list[tuple[ir.Node, ir.Node]] = []  # activation (Q, DQ) nodes, as inserted

    def _node(self, op: str, inputs: list, name: str, dtype: ir.DataType, shape, axis: int | None = None) -> ir.Node:
        attrs = {"axis": axis} if axis is not None else None
        node = self.mark(ir.node(op, inputs, attrs, name=name))
        out = node.outputs[0]
        out.name, out.type, out.shape = f"{name}_out", ir.TensorType(dtype), shape
        return node

    def _scale_zp(self, graph: ir.Graph, value: ir.Value) -> tuple[ir.Value, ir.Value]:
        scale, zp = self.params[value]
        dtype = _ACT[self.cfg.activation_type][0]
        s = set_initializer(graph, f"{value.name}_scale", np.asarray(scale, np.float32))
        z = set_initializer(graph, f"{value.name}_zero_point", np.asarray(zp, dtype))
        return s, z

    def insert_qdq(self, graph: ir.Graph, value: ir.Value) -> None:
        uses = list(value.uses())
        s, z = self._scale_zp(graph, value)
        qtype = ir.DataType.from_numpy(np.dtype(_ACT[self.cfg.activation_type][0]))
        q = self._node("QuantizeLinear", [value, s, z], f"{value.name}_QuantizeLinear", qtype, value.shape)
        dq = self._node("DequantizeLinear", [q.outputs[0], s, z], f"{value.name}_DequantizeLinear",
                        ir.DataType.FLOAT, value.shape)
        producer = value.producer()
        if producer is not None:
            graph.insert_after(producer, [q, dq])
        else:
            graph.insert_before(next(iter(graph)), [q, dq])
        for use in uses:
            use.node.replace_input_with(use.idx, dq.outputs[0])
        self.pairs.append((q, dq))
        if value.is_graph_output():  # only with quantize_outputs: the DQ output takes the name and the slot
            name, out = value.name, dq.outputs[0]
            value.name, out.name = f"{name}_float", name
            graph.outputs[:] = [out if v is value else v for v in graph.outputs]

    def const_dq(self, graph: ir.Graph, node: ir.Node, index: int, lo_hi: Range) -> None:
        """A float constant operand of Add/Mul/Concat stored in the activation type behind a DQ."""
        value = node.inputs[index]
        scale, zp = activation_qparams(*lo_hi, self.cfg.activation_type)
        dtype, qmin, qmax = _ACT[self.cfg.activation_type]
        q = np.clip(np.round(constant_array(value) / scale) + zp, qmin, qmax).astype(dtype)
        qv = set_initializer(graph, f"{value.name}_quantized", q)
        s = set_initializer(graph, f"{value.name}_scale", np.asarray(scale, np.float32))
        z = set_initializer(graph, f"{value.name}_zero_point", np.asarray(zp, dtype))
        dq = self._node("DequantizeLinear", [qv, s, z], f"{value.name}_DequantizeLinear_{node.name}",
                        ir.DataType.FLOAT, value.shape)
        graph.insert_before(node, dq)
        node.replace_input_with(index, dq.outputs[0])
        self.replaced.append(value)

    def weight(self, node: ir.Node) -> np.ndarray | None:
        """Replace the node's weight by int8 + DQ; returns the weight scales (None: nothing done)."""
        layout = weight_layout(node)
        tensor = None if layout is None else constant_tensor(node.inputs[layout.index], nodes=False)
        if tensor is None:
            return None  # no weight, or a computed / overridable one: it stays float
        index, value, graph = layout.index, node.inputs[layout.index], node.graph
        axis = layout.channel_axis if self.cfg.per_channel else None  # batched MatMul B: per tensor
        shape = tuple(tensor.shape.numpy())
        order = saturation.kernel_order(node, shape) if self.cfg.safe_pairs and self.activations else None
        key = (id(value), id(graph), axis, order)
        if key not in self.weight_dq:
            q, scale, self.limited[node] = quantize_tensor(tensor, axis, order)
            qv = set_initializer(graph, f"{value.name}_quantized", q)
            s = set_initializer(graph, f"{value.name}_scale", scale)
            z = set_initializer(graph, f"{value.name}_zero_point", np.zeros(scale.shape, np.int8))
            dq = self._node("DequantizeLinear", [qv, s, z], f"{value.name}_DequantizeLinear", ir.DataType.FLOAT,
                            value.shape, axis=axis if scale.ndim else None)
            graph.insert_before(node, dq)
            self.weight_dq[key] = (dq.outputs[0], scale)
            self.replaced.append(value)
        out, scale = self.weight_dq[key]
        node.replace_input_with(index, out)
        return scale

    def bias(self, node: ir.Node, w_scale: np.ndarray) -> bool:
        """int32 bias with scale sx·sw behind a DQ; False when the bias stays float."""
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.inputs) < 3:
            return False
        value, x = node.inputs[2], node.inputs[0]
        b = constant_array(value)
        if b is None or b.ndim != 1 or x not in self.params:
            return False
        if node.op_type == "Gemm" and (_attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0):
            return False
        sw = np.asarray(w_scale, np.float32).reshape(-1)
        if sw.size > 1 and sw.size != b.size:  # ConvTranspose with groups: axis 1 holds C_out / group
            if b.size % sw.size:
                return False
            sw = np.tile(sw, b.size // sw.size)
        scale = (np.float32(self.params[x][0]) * sw).astype(np.float32)
        if np.any(scale <= 0):
            return False
        if scale.size == 1:
            scale = scale.reshape(())
        graph = node.graph
        qv = set_initializer(graph, f"{value.name}_quantized", quantize_bias(b, scale))
        s = set_initializer(graph, f"{value.name}_scale", scale)
        z = set_initializer(graph, f"{value.name}_zero_point", np.zeros(scale.shape, np.int32))
        dq = self._node("DequantizeLinear", [qv, s, z], f"{value.name}_DequantizeLinear_{node.name}",
                        ir.DataType.FLOAT, value.shape, axis=0 if scale.ndim else None)
        graph.insert_before(node, dq)
        node.replace_input_with(2, dq.outputs[0])
        self.replaced.append(value)
        return True

    def keep_out_of_subgraphs(self, graph: ir.Graph) -> set[str]:
        """A float data-movement op (PROPAGATING_OPS) on a path into an If/Loop/Scan body reads the float value, not
        its DQ; a Q/DQ left unread goes, which can expose the path before it (so: until nothing changes). Returns the
        names of the rewired nodes."""
        rewired: set[str] = set()
        changed = any(True for _ in graph.subgraphs())
        while changed:
            changed = False
            for q, dq in list(self.pairs):
                for use in list(dq.outputs[0].uses()):
                    node = use.node
                    if node.graph is graph and _moves_data(node) and _reaches_subgraph(node.outputs[0]):
                        node.replace_input_with(use.idx, q.inputs[0])
                        rewired.add(node.name)
                        changed = True
                if not dq.outputs[0].uses() and not dq.outputs[0].is_graph_output():
                    self.replaced += [v for v in q.inputs[1:] if v is not None]  # its scale and zero point
                    graph.remove([q, dq], safe=True)
                    self.pairs.remove((q, dq))
                    changed = True
        return rewired

    def drop_unused(self) -> None:
        """Float initializers no longer read by anyone go, so the file really shrinks."""
        for value in dict.fromkeys(self.replaced):
            graph = value.graph
            if value.uses() or value.is_graph_input() or value.is_graph_output() or graph is None:
                continue
            if graph.initializers.get(value.name) is value:
                graph.initializers.pop(value.name)


def _moves_data(node: ir.Node) -> bool:
    return node.op_type in PROPAGATING_OPS and is_default_domain(node)


def _reaches_subgraph(value: ir.Value) -> bool:
    """Whether onnxruntime's DQ propagation, arriving at ``value`` (in the main graph), would cross into a subgraph:
    it stops where a QuantizeLinear reads the value, else goes on through every reader that moves data."""
    graph = value.producer().graph
    uses = list(value.uses())
    if any(u.node.op_type == "QuantizeLinear" and u.node.graph is graph for u in uses):
        return False
    return any(u.node.graph is not graph or (_moves_data(u.node) and _reaches_subgraph(u.node.outputs[0]))
               for u in uses)


def _range_of(scale: np.float32, zp: int, activation_type: str) -> list[float]:
    _, qmin, qmax = _ACT[activation_type]
    return [float(scale) * (qmin - zp), float(scale) * (qmax - zp)]


def emit(model: ir.Model, nodes: Iterable[ir.Node], ranges: Mapping[str, Range], cfg: QdqConfig = QdqConfig(),
         mark: Callable[[ir.Node], ir.Node] | None = None) -> list[dict]:
    """Quantize exactly ``nodes`` (main graph) with the calibrated ``ranges`` (by value name); one row per node.

    Every activation a node reads or writes (after Relu/Clip folding) needs a range, except outputs of
    shared-scale ops, which take their input's scale."""
    graph = model.graph
    chosen = set(nodes)
    order = [n for n in graph if n in chosen]
    if len(order) != len(chosen):
        raise GraphoptError("qdq.emit: every node to quantize must be in the main graph")
    em = _Emitter(cfg, mark)
    targets: list[ir.Value] = []
    const_inputs: list[tuple[ir.Node, int, Range]] = []

    def need(value: ir.Value) -> Range:
        if value.name not in ranges:
            raise GraphoptError(f"qdq.emit: no calibrated range for {value.name!r}")
        return ranges[value.name]

    def assign(value: ir.Value, params: tuple[np.float32, int]) -> None:
        if value not in em.params:
            em.params[value] = params
            targets.append(value)

    for node in order:
        for i in activation_inputs(node):
            value = node.inputs[i]
            arr = constant_array(value)
            if arr is not None:
                const_inputs.append((node, i, (float(arr.min(initial=0.0)), float(arr.max(initial=0.0)))))
                continue
            if value not in em.params:
                assign(value, activation_qparams(*need(value), cfg.activation_type))
        for out in output_targets(node, cfg.quantize_outputs):
            if node.op_type in SHARED_SCALE_OPS:
                assign(out, em.params[node.inputs[0]])
            else:
                assign(out, activation_qparams(*need(out), cfg.activation_type))
    rows = []
    for node in order:
        w_scale = em.weight(node)
        has_bias = em.bias(node, w_scale) if w_scale is not None else False
        acts = {v.name: _range_of(*em.params[v], cfg.activation_type)
                for v in [node.inputs[i] for i in activation_inputs(node)] + output_targets(node, cfg.quantize_outputs)
                if v in em.params}
        row = {"node": node.name, "op": node.op_type, "action": "int8", "activations": acts}
        if w_scale is not None:
            row["weight_scale"] = [float(np.min(w_scale)), float(np.max(w_scale))]
            row["bias"] = "int32" if has_bias else ("float" if len(node.inputs) > 2 and node.inputs[2] else "none")
            if em.limited.get(node):
                row["pair_safe_channels"] = em.limited[node]  # requantized: no int16 pair overflow on AVX2
        rows.append(row)
    for node, i, lo_hi in const_inputs:
        em.const_dq(graph, node, i, lo_hi)
    for value in targets:
        em.insert_qdq(graph, value)
    for name in em.keep_out_of_subgraphs(graph):
        for row in rows:
            if row["node"] == name:
                row.update(action="float", reason="its output reaches an If/Loop/Scan body: it reads float data "
                                                  "(onnxruntime aborts propagating a DQ into a subgraph)")
    em.drop_unused()
    return rows


def emit_weights_only(nodes: Iterable[ir.Node], cfg: QdqConfig = QdqConfig(),
                      mark: Callable[[ir.Node], ir.Node] | None = None) -> list[dict]:
    """int8 weights behind DequantizeLinear, float activations (If/Loop bodies); one row per node."""
    em = _Emitter(cfg, mark, activations=False)
    rows = []
    for node in nodes:
        scale = em.weight(node)
        if scale is not None:
            rows.append({"node": node.name, "op": node.op_type, "action": "int8 weights only (subgraph)",
                         "weight_scale": [float(np.min(scale)), float(np.max(scale))]})
    em.drop_unused()
    return rows
