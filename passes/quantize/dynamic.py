"""Dynamic int8 emission: int8 weights, activations quantized at run time (no calibration of activations needed).

Emitted patterns (what onnxruntime 1.32 fuses on the CPU):
- MatMul(x, W[K, N]) and Gemm(x, W, b) (transA=0, alpha=beta=1): DynamicQuantizeLinear(x) →
  MatMulInteger(xq, Wq int8, x_zp, 0) → Cast(float) → Mul(x_scale · w_scale) [→ Add b]
  onnxruntime fuses it into DynamicQuantizeMatMul (uint8 activations × int8 weights, per-column weight scales);
- LSTM → com.microsoft DynamicQuantizeLSTM (int8 W/R transposed to [dirs, in, 4h], one scale per direction).
The ``quantize_dynamic`` pass (:class:`.passes.QuantizeDynamic`) places them as the static pass does: candidates are
timed against float on this machine (:mod:`.placement`) and only those measured faster are rewritten
(``target=latency``); the whole model is then timed against float and backed off until it is not slower.
Calibration data is used for that timing and for the accuracy budget only; without it (or with ``target=size``)
every candidate is quantized.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import onnx_ir as ir

from graphopt.graphs import attr as _attr, default_opset, is_default_domain
from graphopt.passes.quantize.intweights import quantize_tensor, quantize_weight
from graphopt.saturation import KernelOrder
from graphopt.weights import constant_array, constant_tensor, set_initializer

MS_DOMAIN = "com.microsoft"
Mark = Callable[[ir.Node], ir.Node]


def dynamic_reason(node: ir.Node) -> str | None:
    """Why ``node`` cannot be quantized dynamically (None: it can)."""
    op = node.op_type
    if not is_default_domain(node):
        return "not a standard op"
    if op not in ("MatMul", "Gemm", "LSTM"):
        return f"op {op} has no dynamic int8 form"
    if not node.inputs or node.inputs[0] is None or node.inputs[0].dtype not in (ir.DataType.FLOAT, None):
        return "input is not float32"
    if op == "LSTM":
        w, r = (constant_array(node.inputs[i]) if len(node.inputs) > i and node.inputs[i] is not None else None
                for i in (1, 2))
        if w is None or r is None or w.dtype != np.float32 or r.dtype != np.float32:
            return "LSTM weights are not float32 initializers"
        if _attr(node, "layout", 0) != 0 or _attr(node, "input_forget", 0):
            return "LSTM layout=1/input_forget: no DynamicQuantizeLSTM form"
        return None
    w = constant_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if w is None or w.dtype != np.float32 or w.ndim != 2:
        return "weight is not a 2-D float32 initializer"
    if op == "Gemm":
        if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
            return "Gemm with transA/alpha/beta"
        if len(node.inputs) > 2 and node.inputs[2] is not None and constant_array(node.inputs[2]) is None:
            return "Gemm bias is not an initializer"
    return None


def candidates(model: ir.Model, exclude_nodes: Iterable[str] = (), exclude_ops: Iterable[str] = ()) -> list[ir.Node]:
    skip_n, skip_o = set(exclude_nodes), set(exclude_ops)
    return [n for n in model.graph if n.name not in skip_n and n.op_type not in skip_o and dynamic_reason(n) is None]


def _new(graph: ir.Graph, before: ir.Node, op: str, inputs: list, name: str, n_out: int = 1,
         attrs: dict | None = None, domain: str = "", mark: Mark | None = None) -> ir.Node:
    node = ir.node(op, inputs, attrs, domain=domain, name=name, num_outputs=n_out)
    for i, out in enumerate(node.outputs):
        out.name = f"{name}_out{i}"
    if mark:
        mark(node)
    graph.insert_before(before, node)
    return node


def _emit_matmul(node: ir.Node, per_channel: bool, mark: Mark | None, safe_pairs: bool) -> dict:
    graph, x, out = node.graph, node.inputs[0], node.outputs[0]
    # B [K, N] per column, from the stored weight: a Gemm's transB=1 weight [N, K] per row is the same rows (and
    # the same quantization the static form asks for, so within intweights.reusing it is computed once).
    trans = node.op_type == "Gemm" and bool(_attr(node, "transB", 0))
    order = KernelOrder("Gemm", trans_b=True) if trans and safe_pairs else _order(safe_pairs)
    q, scale, _ = quantize_tensor(constant_tensor(node.inputs[1], nodes=False),
                                  (0 if trans else 1) if per_channel else None, order)
    q = np.ascontiguousarray(q.T) if trans else q
    base = node.name or out.name
    wq = set_initializer(graph, f"{node.inputs[1].name}_dyn_quantized", q)
    wz = set_initializer(graph, f"{node.inputs[1].name}_dyn_zero_point", np.zeros(scale.shape, np.int8))
    ws = set_initializer(graph, f"{node.inputs[1].name}_dyn_scale", scale)
    dql = _new(graph, node, "DynamicQuantizeLinear", [x], f"{base}_DynamicQuantizeLinear", 3, mark=mark)
    xq, xs, xz = dql.outputs
    mmi = _new(graph, node, "MatMulInteger", [xq, wq, xz, wz], f"{base}_MatMulInteger", mark=mark)
    cast = _new(graph, node, "Cast", [mmi.outputs[0]], f"{base}_Cast", attrs={"to": ir.DataType.FLOAT}, mark=mark)
    sc = _new(graph, node, "Mul", [xs, ws], f"{base}_scale_Mul", mark=mark)
    mul = _new(graph, node, "Mul", [cast.outputs[0], sc.outputs[0]], f"{base}_Mul", mark=mark)
    result = mul.outputs[0]
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        add = _new(graph, node, "Add", [result, node.inputs[2]], f"{base}_bias_Add", mark=mark)
        result = add.outputs[0]
    result.type, result.shape = out.type, out.shape
    _replace_output(graph, node, out, result)
    return {"node": node.name, "op": node.op_type, "action": "int8 dynamic",
            "weight_scale": [float(np.min(scale)), float(np.max(scale))]}


def _order(safe_pairs: bool) -> KernelOrder | None:
    """Weights are B [K, N] of a u8×s8 GEMM (MatMulInteger, DynamicQuantizeLSTM): pairs run along K."""
    return KernelOrder("MatMul") if safe_pairs else None


def _emit_lstm(node: ir.Node, mark: Mark | None, safe_pairs: bool) -> dict:
    graph = node.graph
    tensors = []
    for i in (1, 2):  # W [dirs, 4h, in] and R [dirs, 4h, h] → int8 [dirs, in|h, 4h], one scale per direction
        arr = np.ascontiguousarray(constant_array(node.inputs[i]).astype(np.float32).transpose(0, 2, 1))
        q, scale = quantize_weight(arr, 0, _order(safe_pairs))
        name = node.inputs[i].name
        tensors.append((set_initializer(graph, f"{name}_dyn_quantized", q),
                        set_initializer(graph, f"{name}_dyn_scale", scale),
                        set_initializer(graph, f"{name}_dyn_zero_point", np.zeros(scale.shape, np.int8))))
    rest = list(node.inputs[3:8]) + [None] * (8 - len(node.inputs))
    inputs = [node.inputs[0], tensors[0][0], tensors[1][0], *rest[:5],
              tensors[0][1], tensors[0][2], tensors[1][1], tensors[1][2]]
    attrs = {k: a.value for k, a in node.attributes.items()}
    new = ir.node("DynamicQuantizeLSTM", inputs, attrs, domain=MS_DOMAIN, name=f"{node.name}_dyn",
                  num_outputs=len(node.outputs))
    if mark:
        mark(new)
    graph.insert_before(node, new)
    for old, fresh in zip(node.outputs, new.outputs):
        fresh.type, fresh.shape, fresh.name = old.type, old.shape, f"{old.name}_dyn"
        if old.name:
            _replace_output(graph, None, old, fresh)
    graph.remove(node, safe=True)
    graph.opset_imports.setdefault(MS_DOMAIN, 1)
    return {"node": node.name, "op": "LSTM", "action": "int8 dynamic (DynamicQuantizeLSTM)",
            "weight_scale": [float(np.min(tensors[0][1].const_value.numpy())),
                             float(np.max(tensors[0][1].const_value.numpy()))]}


def _replace_output(graph: ir.Graph, node: ir.Node | None, old: ir.Value, new: ir.Value) -> None:
    """``new`` takes over ``old``'s uses, graph-output slot and name; ``node`` (if given) is removed."""
    if old.is_graph_output():
        name = old.name
        graph.outputs[:] = [new if v is old else v for v in graph.outputs]
        old.name = f"{name}_float_replaced"
        new.name = name
    old.replace_all_uses_with(new)
    if node is not None:
        graph.remove(node, safe=True)


def emit_dynamic(model: ir.Model, nodes: Iterable[ir.Node], per_channel: bool = True,
                 mark: Mark | None = None, safe_pairs: bool = True) -> list[dict]:
    """Rewrite ``nodes`` (MatMul/Gemm/LSTM of the main graph, :func:`dynamic_reason` None) in place; one row each.
    ``safe_pairs``: int8 weights that cannot overflow a saturating u8×s8 kernel (:mod:`graphopt.saturation`)."""
    rows, replaced = [], []
    for node in list(nodes):
        replaced.extend(v for v in node.inputs[1:3] if v is not None and v.is_initializer())
        rows.append(_emit_lstm(node, mark, safe_pairs) if node.op_type == "LSTM"
                    else _emit_matmul(node, per_channel, mark, safe_pairs))
    if rows:
        opset = default_opset(model, 0)
        if opset and opset < 11:  # DynamicQuantizeLinear is opset 11
            model.opset_imports[""] = 11
        if any(r["op"] == "LSTM" for r in rows):
            model.opset_imports.setdefault(MS_DOMAIN, 1)
    for value in dict.fromkeys(replaced):  # float weights nobody reads any more: the file shrinks
        graph = value.graph
        if graph is not None and not value.uses() and not value.is_graph_output() and \
                graph.initializers.get(value.name) is value:
            graph.initializers.pop(value.name)
    return rows
