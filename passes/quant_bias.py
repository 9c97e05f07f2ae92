"""Where bias correction edits a QDQ model: the quantized weight ops whose output mean can be corrected
(:func:`find_sites`) and the bias edit itself (:func:`apply_shift`), with the undo it returns.

- an int32 bias behind a DequantizeLinear is re-quantized with the same scale (so onnxruntime still fuses the
  node into QLinearConv/QGemm), a float bias is edited as is;
- a node without a bias gets one: int32 with scale = input scale × weight scale when both are DQ'd per tensor /
  per channel, else float;
- MatMul has no bias input: its correction goes into a following Add with a float constant; without one it
  is left alone (a new Add would break the integer kernel fusion).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import onnx_ir as ir

from graphopt.graphs import default_opset, is_default_domain
from graphopt.passes.qdq import quantize_bias
from graphopt.weights import constant_array, replace_initializer, set_initializer

CORRECTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclasses.dataclass
class Site:
    """One quantized weight op whose output mean can be corrected."""

    node: ir.Node
    output: str  # the op's output value name (pre-activation)
    axis: int  # the output's channel axis (-1: last, for MatMul)
    channels: int
    ref: str = ""  # the float model's value it is compared with (see _reference)


def _dq_input(value: ir.Value | None) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == "DequantizeLinear" else None


def _channels(node: ir.Node) -> int | None:
    """Output channels, from the weight DQ's int8 initializer."""
    dq = _dq_input(node.inputs[1] if len(node.inputs) > 1 else None)
    w = constant_array(dq.inputs[0]) if dq is not None else None
    if w is None:
        return None
    op = node.op_type
    if op == "Conv":
        return int(w.shape[0])
    if op == "ConvTranspose":
        return int(w.shape[1]) * int(node.attributes.get_int("group", 1))
    if op == "Gemm":
        return int(w.shape[0] if node.attributes.get_int("transB", 0) else w.shape[1])
    return int(w.shape[-1])  # MatMul


def find_sites(model: ir.Model) -> tuple[list[Site], dict[str, str]]:
    """Quantized weight ops of the main graph in graph order, and why other weight ops are left alone."""
    sites: list[Site] = []
    skipped: dict[str, str] = {}
    for node in model.graph:
        if node.op_type not in CORRECTED_OPS or not is_default_domain(node):
            continue
        if len(node.inputs) < 2 or _dq_input(node.inputs[1]) is None or _dq_input(node.inputs[0]) is None:
            continue  # float op (not quantized, or weight-only): nothing to correct
        channels = _channels(node)
        if channels is None:
            skipped[node.name] = "weight is not an int8 initializer behind DequantizeLinear"
            continue
        if node.op_type == "MatMul" and _matmul_bias(node) is None:
            skipped[node.name] = "MatMul without a following Add by a float constant: no bias to correct"
            continue
        if node.op_type == "Gemm" and (node.attributes.get_float("alpha", 1.0) != 1.0
                                       or node.attributes.get_float("beta", 1.0) != 1.0):
            skipped[node.name] = "Gemm with alpha/beta != 1"
            continue
        sites.append(Site(node, node.outputs[0].name, -1 if node.op_type == "MatMul" else 1, channels))
    return sites, skipped


def _matmul_bias(node: ir.Node) -> tuple[ir.Node, int] | None:
    """(Add, index of its float constant) when the MatMul's only consumer adds a per-channel float constant."""
    uses = list(node.outputs[0].uses())
    if len(uses) != 1 or uses[0].node.op_type != "Add" or node.outputs[0].is_graph_output():
        return None
    add = uses[0].node
    other = 1 - uses[0].idx
    array = constant_array(add.inputs[other])
    if array is None or array.dtype != np.float32 or len(list(add.inputs[other].uses())) != 1:
        return None
    return (add, other) if array.ndim <= 1 else None



def _bias_now(node: ir.Node) -> tuple[np.ndarray | None, float]:
    """The layer's bias as float64 (zeros without one) and its quantization step (0 for a float bias)."""
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    dq = _dq_input(bias)
    if dq is not None:
        q, scale, zp = _int_bias(dq)
        if q is None or scale is None:
            return None, 0.0
        return (q.astype(np.float64) - zp) * scale.astype(np.float64), float(scale.max())
    if bias is None:
        return np.zeros(_channels(node) or 0), 0.0
    b = constant_array(bias)
    return (None if b is None else b.astype(np.float64).reshape(-1)), 0.0



def _int_bias(dq: ir.Node) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray]:
    """(integers, scale, zero point as float64) of a bias behind DequantizeLinear."""
    zp = _scalar_or_vector(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
    return (constant_array(dq.inputs[0]), _scalar_or_vector(dq.inputs[1]),
            np.zeros(1) if zp is None else zp.astype(np.float64))


def _scalar_or_vector(value: ir.Value | None) -> np.ndarray | None:
    array = constant_array(value)
    return None if array is None else np.asarray(array, np.float32).reshape(-1)


def _new_bias_scale(node: ir.Node, channels: int) -> np.ndarray | None:
    """input scale × weight scale (per channel) when both are DQ'd, for a new int32 bias."""
    x_dq, w_dq = _dq_input(node.inputs[0]), _dq_input(node.inputs[1])
    sx = _scalar_or_vector(x_dq.inputs[1]) if x_dq is not None and len(x_dq.inputs) > 1 else None
    sw = _scalar_or_vector(w_dq.inputs[1]) if w_dq is not None and len(w_dq.inputs) > 1 else None
    if sx is None or sw is None or sx.size != 1 or sw.size not in (1, channels) or node.op_type == "ConvTranspose":
        return None
    if node.graph is None or default_opset(node.graph, 0) < 13:
        return None  # a per-axis DequantizeLinear needs opset 13: the new bias stays float
    scale = (sx[0] * np.broadcast_to(sw, (channels,))).astype(np.float32)
    return scale if np.all(scale > 0) else None


def apply_shift(site: Site, delta: np.ndarray, mark=lambda n: n) -> tuple[dict[str, Any], Callable[[], None]]:
    """Subtract ``delta`` (per output channel) from the site's bias; returns (what was done, undo)."""
    node, graph = site.node, site.node.graph
    delta = np.asarray(delta, np.float64).reshape(-1)

    def replacing(value: ir.Value, array: np.ndarray) -> Callable[[], None]:
        old, old_shape, old_type = value.const_value, value.shape, value.type
        replace_initializer(value, array)

        def undo() -> None:
            value.const_value, value.shape, value.type = old, old_shape, old_type
        return undo

    if node.op_type == "MatMul":
        add, index = _matmul_bias(node)
        b = constant_array(add.inputs[index]).astype(np.float64)
        new = (b - delta).astype(np.float32)
        return {"bias": "float (following Add)"}, replacing(add.inputs[index], new)
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    dq = _dq_input(bias)
    if dq is not None:  # int32 behind DQ: same scale, new integers
        q, scale, zp = _int_bias(dq)
        if q is None or scale is None or q.dtype != np.int32 or len(list(dq.inputs[0].uses())) != 1:
            return {"bias": "skipped: int32 bias not an owned initializer"}, lambda: None
        real = (q.astype(np.float64) - zp) * scale.astype(np.float64)
        new = (quantize_bias(real - delta, scale) + zp.astype(np.int64)).astype(np.int32)
        return {"bias": "int32"}, replacing(dq.inputs[0], new)
    if bias is not None:
        b = constant_array(bias)
        if b is None or len(list(bias.uses())) != 1:
            return {"bias": "skipped: float bias not an owned initializer"}, lambda: None
        return {"bias": "float"}, replacing(bias, (b.astype(np.float64) - delta).astype(np.float32))
    scale = _new_bias_scale(node, site.channels)
    name = f"{node.name or site.output}_bias_correction"
    added: list[ir.Value] = []
    new_node = None
    if scale is not None:
        qv = set_initializer(graph, f"{name}_quantized", quantize_bias(-delta, scale))
        s = set_initializer(graph, f"{name}_scale", scale)
        z = set_initializer(graph, f"{name}_zero_point", np.zeros(scale.shape, np.int32))
        new_node = mark(ir.node("DequantizeLinear", [qv, s, z], {"axis": 0}, name=f"{name}_DequantizeLinear"))
        new_node.outputs[0].name, new_node.outputs[0].type = f"{name}_dq", ir.TensorType(ir.DataType.FLOAT)
        new_node.outputs[0].shape = ir.Shape([site.channels])
        graph.insert_before(node, new_node)
        value, kind, added = new_node.outputs[0], "int32 (new)", [qv, s, z]
    else:
        value = set_initializer(graph, name, (-delta).astype(np.float32))
        kind, added = "float (new)", [value]
    node.resize_inputs(3)
    node.replace_input_with(2, value)
    mark(node)

    def undo_new() -> None:
        node.replace_input_with(2, None)
        node.resize_inputs(2)
        if new_node is not None:
            graph.remove(new_node, safe=True)
        for v in added:
            graph.initializers.pop(v.name, None)
    return {"bias": kind}, undo_new
