"""fold_batchnorm: Conv / ConvTranspose / Gemm followed by BatchNormalization → one layer (exact).

Inference BN is y = s·x + t per channel, s = γ/√(var+ε), t = β − mean·s. Scaling the layer's weight along its
output-channel axis by s and setting bias' = bias·s + t gives the same output. Folding happens only when the
rewrite cannot be seen elsewhere: the BN is the layer output's only consumer, the weight and bias are plain
initializers (copied when shared), and the weight is not in a compressed form.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from graphopt.options import BaseOptions
from graphopt.passbase import GraphoptPass, GraphoptResult
from graphopt.graphs import all_graphs, attr as _attr, is_default_domain
from graphopt.weights import constant_array, encoding_of, owned_initializer, replace_initializer, set_initializer

LAYERS = frozenset({"Conv", "ConvTranspose", "Gemm"})
_FLOATS = (np.float16, np.float32, np.float64)


def _bn_affine(bn: ir.Node) -> tuple[np.ndarray, np.ndarray] | str:
    """(s, t) in float64, or the reason the BN cannot be folded."""
    if _attr(bn, "training_mode", 0):
        return "BN in training mode"
    if not _attr(bn, "spatial", 1):
        return "BN with spatial=0"
    if any(out is not None and out.uses() for out in bn.outputs[1:]):
        return "BN running-statistics outputs are used"
    params = [constant_array(v) if v is not None else None for v in bn.inputs[1:5]]
    if len(params) < 4 or any(p is None for p in params):
        return "BN parameters are not constant initializers"
    gamma, beta, mean, var = (np.asarray(p, np.float64).reshape(-1) for p in params)
    scale = gamma / np.sqrt(var + float(_attr(bn, "epsilon", 1e-5)))
    return scale, beta - mean * scale


def _scale_weight(layer: ir.Node, weight: np.ndarray, scale: np.ndarray) -> np.ndarray | str:
    """The weight scaled along its output-channel axis (float64), or why it cannot be."""
    w = weight.astype(np.float64)
    op = layer.op_type
    if op == "Conv":
        if w.shape[0] != scale.size:
            return "channel count mismatch"
        return w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    if op == "ConvTranspose":
        # W is [Cin, Cout/group, k...]; input-channel block g feeds output channels g*Cout/g … (g+1)*Cout/g−1.
        group = int(_attr(layer, "group", 1))
        cin, cout_g = w.shape[0], w.shape[1]
        if cin % group or cout_g * group != scale.size:
            return "channel count mismatch"
        per_group = scale.reshape(group, 1, cout_g, *(1,) * (w.ndim - 2))
        return (w.reshape(group, cin // group, *w.shape[1:]) * per_group).reshape(w.shape)
    # Gemm: Y = alpha·A'·B' + beta·C; output features are rows of B when transB=1, columns when 0.
    if w.ndim != 2:
        return "Gemm weight is not 2-D"
    trans_b = int(_attr(layer, "transB", 0))
    if w.shape[0 if trans_b else 1] != scale.size:
        return "feature count mismatch"
    return w * (scale[:, None] if trans_b else scale[None, :])


def _writable(layer: ir.Node, index: int) -> ir.Value | None:
    """The layer's initializer input, copied into a private one when other nodes share it."""
    owned = owned_initializer(layer, index)
    if owned is not None:
        return owned
    value = layer.inputs[index]
    array = constant_array(value)
    if array is None or layer.graph is None:
        return None
    copy = set_initializer(layer.graph, f"{value.name}_{layer.name or layer.op_type}", array)
    layer.replace_input_with(index, copy)
    return copy


class FoldBatchNorm(GraphoptPass):
    """Fold inference BatchNormalization into the preceding Conv, ConvTranspose or Gemm."""

    name = "fold_batchnorm"
    summary = "fold BatchNormalization into the preceding Conv/ConvTranspose/Gemm (exact)"
    exact = True

    @dataclasses.dataclass(frozen=True)
    class Options(BaseOptions):
        pass

    def call(self, model: ir.Model) -> GraphoptResult:
        rows: list[dict] = []
        notes: list[str] = []
        for graph in all_graphs(model):
            for bn in list(graph):
                if bn.op_type != "BatchNormalization" or not is_default_domain(bn) or bn.graph is None:
                    continue
                layer = bn.inputs[0].producer() if bn.inputs[0] is not None else None
                if layer is None or layer.op_type not in LAYERS or not is_default_domain(layer):
                    continue
                reason = self._fold(layer, bn)
                if reason is None:
                    rows.append({"layer": layer.name, "bn": bn.name, "op": layer.op_type})
                else:
                    notes.append(f"kept {bn.name} after {layer.op_type} {layer.name}: {reason}")
        return self.result(model, rows, notes)

    def _fold(self, layer: ir.Node, bn: ir.Node) -> str | None:
        """Fold ``bn`` into ``layer``; returns None when done, else why it was skipped (model untouched)."""
        out = layer.outputs[0]
        if len(out.uses()) != 1 or out.is_graph_output() or layer.graph is not bn.graph:
            return "the layer output has other consumers"
        if len(layer.outputs) != 1:
            return "the layer has extra outputs"
        weight_in = layer.inputs[1] if len(layer.inputs) > 1 else None
        encoding = encoding_of(weight_in)
        if encoding is not None:
            return f"weight is in a compressed form ({encoding})"
        weight = constant_array(weight_in)
        if weight is None or weight.dtype.type not in _FLOATS:
            return "weight is not a float initializer"
        affine = _bn_affine(bn)
        if isinstance(affine, str):
            return affine
        scale, shift = affine
        new_weight = _scale_weight(layer, weight, scale)
        if isinstance(new_weight, str):
            return new_weight
        bias_in = layer.inputs[2] if len(layer.inputs) > 2 else None
        bias = np.zeros(scale.size) if bias_in is None else constant_array(bias_in)
        if bias is None or encoding_of(bias_in) is not None:
            return "bias is not a plain initializer"
        bias = bias.astype(np.float64)
        if layer.op_type == "Gemm":
            # beta·C·s + t, broadcast over [N, F]; beta is folded in, so it becomes 1.
            bias = float(_attr(layer, "beta", 1.0)) * bias
            try:
                new_bias = np.broadcast_to(bias, np.broadcast_shapes(bias.shape, (scale.size,))) * scale + shift
            except ValueError:
                return "Gemm bias does not broadcast over the features"
        else:
            if bias.shape != (scale.size,):
                return "bias shape mismatch"
            new_bias = bias * scale + shift

        # All checks passed: rewrite (copies of shared initializers are made only now).
        w_value = _writable(layer, 1)
        if w_value is None:
            return "weight is not a constant initializer"
        replace_initializer(w_value, new_weight.astype(weight.dtype), keep_marks=True)
        bias_dtype = weight.dtype
        if bias_in is None:
            b_value = set_initializer(layer.graph, f"{layer.name or layer.op_type}_bias", new_bias.astype(bias_dtype))
            if len(layer.inputs) < 3:
                layer.resize_inputs(3)
            layer.replace_input_with(2, b_value)
        else:
            b_value = _writable(layer, 2)
            if b_value is None:
                return "bias is not a constant initializer"  # unreachable: checked above
            replace_initializer(b_value, new_bias.astype(bias_dtype), keep_marks=True)
        if layer.op_type == "Gemm":
            layer.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        self._bypass(layer, bn)
        self.mark(layer)
        return None

    @staticmethod
    def _bypass(layer: ir.Node, bn: ir.Node) -> None:
        """Remove the BN; the layer output takes over its name, consumers and graph-output slots."""
        graph = bn.graph
        layer_out, bn_out = layer.outputs[0], bn.outputs[0]
        name, shape, dtype = bn_out.name, bn_out.shape, bn_out.type
        params = [v for v in bn.inputs[1:] if v is not None]
        bn_out.replace_all_uses_with(layer_out, replace_graph_outputs=True)
        graph.remove(bn, safe=True)
        bn_out.name = None
        layer_out.name = name
        if layer_out.shape is None:
            layer_out.shape = shape
        if layer_out.type is None:
            layer_out.type = dtype
        for value in params:  # drop BN parameters nothing else uses
            if (not value.uses() and not value.is_graph_output() and not value.is_graph_input()
                    and value.graph is not None and value.graph.initializers.get(value.name) is value):
                value.graph.initializers.pop(value.name)
