"""Where bias correction edits a QDQ model: the quantized weight ops whose output mean can be corrected
(:func:`find_sites`), the float tensor each one is compared with (:func:`float_reference`), and the bias edit
itself (:func:`apply_shift`), with the undo it returns.

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

from graphopt import capture, saturation
from graphopt.graphs import default_opset, is_default_domain
from graphopt.passes.quantize.intweights import BLOCK_ELEMENTS, quantize_bias, unmap
from graphopt.weights import constant_array, constant_tensor, replace_initializer, set_initializer

CORRECTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclasses.dataclass
class Site:
    """One quantized weight op whose output mean can be corrected."""

    node: ir.Node
    output: str  # the op's output value name (pre-activation)
    axis: int  # the output's channel axis (-1: last, for MatMul)
    channels: int
    ref: str = ""  # the float model's value it is compared with (see float_reference)


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


# --- the float tensor a site is compared with ---------------------------------------------------------------


def _mismatch(node: ir.Node, tw: np.ndarray, tb: np.ndarray | None) -> str | None:
    """Why float weight ``tw`` / bias ``tb`` are not the ones this quantized layer was made from (None: they are)."""
    w_dq = _dq_input(node.inputs[1])
    q, sw = constant_array(w_dq.inputs[0]), _scalar_or_vector(w_dq.inputs[1])
    if q is None or sw is None:
        return None
    if tw.shape != q.shape:
        return f"float weight shape {tw.shape} != int8 weight shape {q.shape}"
    if _weights_off(node, tw, q, sw, w_dq.attributes.get_int("axis", 1)):
        return "float weight of the same-named output is not this layer's weight (a fused Mul/Div?)"
    if node.op_type == "MatMul" or tb is None:
        return None
    b, step = _bias_now(node)
    if b is not None and (b.shape != tb.shape or float(np.abs(b - tb).max(initial=0.0)) > max(
            0.51 * step, 1e-5 * (1.0 + float(np.abs(tb).max(initial=0.0))))):
        return "float bias of the same-named output is not this layer's bias (a fused Add/Sub?)"
    return None


def _weights_off(node: ir.Node, tw: np.ndarray, q: np.ndarray, sw: np.ndarray, axis: int) -> bool:
    """Whether some float weight lies more than half a step from its int8 weight (pair-safe cuts aside), in float64
    over blocks of axis 0: an even number of indices each, so every kernel pair stays whole (axis 0 is the output
    channel, or K of a [K, N] weight), and the temporaries stay small for big weights."""
    shape = [1] * q.ndim
    if sw.size > 1:
        shape[axis] = -1
    steps = np.broadcast_to(sw.astype(np.float64).reshape(shape), q.shape)
    limit = 0.51 * float(sw.max()) + 1e-12
    order = saturation.kernel_order(node, q.shape)
    block = max(2, BLOCK_ELEMENTS // max(1, q[:1].size) // 2 * 2)
    for start in range(0, q.shape[0], block):
        part = slice(start, start + block)
        tw_part, q_part, step = np.asarray(tw[part], np.float64), q[part], steps[part]
        off = np.abs(tw_part - q_part.astype(np.float64) * step) > limit
        if off.any():  # pair-safe weights: a clamped pair lies further from the float weights, by design
            off &= ~_pair_clamped(order, q_part, tw_part / step)
        if off.any():
            return True
    return False


def _pair_clamped(order: saturation.KernelOrder | None, q: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Per weight: True where int8 ``q`` is the pair-safe cut of the float weight ``steps`` (in quantization steps)
    — its kernel pair (:func:`graphopt.saturation.clamp_pairs`) has the same-sign magnitude sum of exactly
    PAIR_LIMIT, and the weight keeps its float sign with a magnitude cut, not raised, from round(|steps|)."""
    if order is None or q.ndim < 2:
        return np.zeros(q.shape, bool)
    qr = order.rows(q.astype(np.int32))
    fr = order.rows(np.asarray(steps, np.float64))
    pairs = qr.reshape(qr.shape[0], -1, 2)
    full = (saturation.pair_magnitudes(qr) == saturation.PAIR_LIMIT) & (pairs[..., 0] * pairs[..., 1] > 0)
    cut = (np.sign(qr) == np.sign(fr)) & (np.abs(qr) <= np.abs(fr) + 0.51)
    mask = np.repeat(full, 2, axis=1) & cut
    return order.unrows(mask, q.shape).astype(bool)


_AFFINE = ("Mul", "Div", "Add", "Sub")


def _affine_step(value: ir.Value, channels: int, rank: int) -> tuple[ir.Value, str, np.ndarray] | None:
    """(next value, op, per-channel constant) when ``value``'s only consumer is x·c, x/c, x+c or x−c with c
    constant per channel (axis 1): the ops fuse's conv_affine folds into a Conv."""
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    user, idx = uses[0].node, uses[0].idx
    if user.op_type not in _AFFINE or len(user.inputs) != 2 or (idx == 1 and user.op_type in ("Sub", "Div")):
        return None
    c = constant_array(user.inputs[1 - idx])
    if c is None or c.ndim > rank:
        return None
    padded = (1,) * (rank - c.ndim) + tuple(c.shape)
    if c.size != 1 and (c.size != channels or padded[1] != channels):
        return None
    vec = np.broadcast_to(np.asarray(c, np.float64).reshape(-1), (channels,))
    return user.outputs[0], user.op_type, vec


def float_reference(site: Site, float_model: ir.Model) -> tuple[str | None, str | None]:
    """(teacher value name to compare the site's output with, or None and why not).

    The same name, unless the teacher's producer is the same op with other weights: then fuse's conv_affine
    folded Mul/Add/Sub/Div by per-channel constants into this Conv but kept the Conv's output name, and the
    tensor to compare with is at the end of that chain in the teacher (found by folding it into the teacher's
    weights until they match the int8 ones)."""
    value = capture.main_values(float_model.graph).get(site.output)
    if value is None:
        return None, f"output {site.output!r} has no counterpart in the float model"
    node, producer = site.node, value.producer()
    if producer is None or producer.op_type != node.op_type:
        return site.output, None  # e.g. a BatchNormalization folded into the layer: same tensor, other producer
    tensor = constant_tensor(producer.inputs[1], nodes=False) if len(producer.inputs) > 1 else None
    if tensor is None:
        return site.output, None
    try:
        return _reference_of(site, value, tensor.numpy(), producer)
    finally:
        unmap(tensor)  # the teacher's weight, read from its file: its pages leave the resident set


def _reference_of(site: Site, value: ir.Value, tw: np.ndarray, producer: ir.Node) -> tuple[str | None, str | None]:
    """:func:`float_reference` once the teacher's producer has weight ``tw``."""
    node = site.node
    tb = constant_array(producer.inputs[2]) if len(producer.inputs) > 2 and producer.inputs[2] is not None else None
    tb = np.zeros(site.channels) if tb is None else tb.astype(np.float64).reshape(-1)
    reason = _mismatch(node, tw, tb)
    if reason is None or node.op_type != "Conv" or tb.shape != (site.channels,):
        return (site.output, None) if reason is None else (None, reason)
    shape = (-1,) + (1,) * (tw.ndim - 1)
    tw = tw.astype(np.float64)  # a Conv's weight, folded with the affine chain below
    while (step := _affine_step(value, site.channels, tw.ndim)) is not None:
        value, op, vec = step
        if op == "Mul":
            tw, tb = tw * vec.reshape(shape), tb * vec
        elif op == "Div":
            tw, tb = tw / vec.reshape(shape), tb / vec
        else:
            tb = tb + vec if op == "Add" else tb - vec
        if _mismatch(node, tw, tb) is None:
            return value.name, None
    return None, reason


# --- the edit -----------------------------------------------------------------------------------------------


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
