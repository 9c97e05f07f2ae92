"""lowrank's rewrite: a layer becomes its factors, the first ones new nodes before it, the last one the node itself.

Gemm/MatMul: MatMul(x, A) then the original node with B (bias, Gemm transB/alpha/beta kept on it). Conv: each
factor a Conv; which factor carries the conv's strides/pads/dilations is the scheme's ``places`` entry.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_ir as ir

from graphopt.linear import LinearLayer
from graphopt.weights import constant_array, set_initializer

CONV_GEOMETRY = ("kernel_shape", "strides", "dilations", "pads", "auto_pad", "group")
# Which factor carries the conv geometry: full = all of it, unit = 1×1 stride 1, rows/cols = one axis only.
PLACES = {"svd": ("full", "unit"), "basis": ("full", "unit"), "spatial": ("rows", "cols"),
          "tucker": ("unit", "full", "unit")}


def conv_attrs(layer: LinearLayer, kernel: tuple[int, ...], place: str) -> list[ir.Attr]:
    """The attributes of one conv factor with ``kernel``; ``place`` says how much of the geometry it carries."""
    nsp = len(kernel)
    strides, dilations, pads, auto = list(layer.strides), list(layer.dilations), list(layer.pads), layer.auto_pad
    if place == "unit":
        strides, dilations, pads, auto = [1] * nsp, [1] * nsp, [0] * (2 * nsp), "NOTSET"
    elif place in ("rows", "cols"):
        axis = 0 if place == "rows" else 1
        strides = [s if i == axis else 1 for i, s in enumerate(strides)]
        dilations = [d if i == axis else 1 for i, d in enumerate(dilations)]
        pads = [p if i % nsp == axis else 0 for i, p in enumerate(pads)]
    attrs = [ir.AttrInt64s("kernel_shape", list(kernel)), ir.AttrInt64s("strides", strides),
             ir.AttrInt64s("dilations", dilations), ir.AttrInt64("group", 1)]
    attrs.append(ir.AttrInt64s("pads", pads) if auto == "NOTSET" else ir.AttrString("auto_pad", auto))
    return attrs


def fresh_name(names: set[str], hint: str) -> str:
    """``hint``, or ``hint_1``, ``hint_2``… the first not in ``names`` (which then holds it)."""
    name, i = hint, 0
    while name in names:
        i += 1
        name = f"{hint}_{i}"
    names.add(name)
    return name


def rewrite(layer: LinearLayer, scheme: str, weights: list[np.ndarray], bias: np.ndarray | None,
            names: set[str], mark: Callable[[ir.Node], ir.Node]) -> None:
    """Insert the first factors before the layer's node and make the node the last factor.

    ``bias``: the re-fitted bias (data-aware), else None (kept as it is); ``mark`` stamps each node changed."""
    node, graph = layer.node, layer.node.graph
    dtype = constant_array(layer.weight).dtype
    base = node.name or node.outputs[0].name or node.op_type
    x, new_nodes = node.inputs[0], []
    places = PLACES[scheme]
    for i, w in enumerate(weights[:-1]):
        w_value = set_initializer(graph, f"{layer.weight.name}_lowrank{i}", w.astype(dtype))
        if layer.kind == "conv":
            factor = ir.Node("", "Conv", [x, w_value], conv_attrs(layer, w.shape[2:], places[i]),
                             name=f"{base}_lowrank{i}")
        else:
            factor = ir.Node("", "MatMul", [x, w_value], name=f"{base}_lowrank{i}")
        x = factor.outputs[0]
        x.name = fresh_name(names, f"{base}_lowrank{i}_out")
        x.type = ir.TensorType(ir.DataType.from_numpy(dtype))
        new_nodes.append(mark(factor))
    graph.insert_before(node, new_nodes)
    node.replace_input_with(0, x)
    mark(node)
    if layer.kind != "conv":  # the original Gemm/MatMul becomes the second factor (bias, alpha/beta folded)
        layer.set_matrix(weights[-1], bias)
        return
    _last_conv_factor(layer, weights[-1].astype(dtype), len(weights) - 1, places[-1], bias)


def _last_conv_factor(layer: LinearLayer, weight: np.ndarray, index: int, place: str,
                      bias: np.ndarray | None) -> None:
    """The conv node itself becomes the last factor: new weight, its geometry, the re-fitted bias if any."""
    node, graph = layer.node, layer.node.graph
    old = [v for v in node.inputs[1:]]
    node.replace_input_with(1, set_initializer(graph, f"{layer.weight.name}_lowrank{index}", weight))
    for key in CONV_GEOMETRY:
        node.attributes.pop(key, None)
    for attr in conv_attrs(layer, weight.shape[2:], place):
        node.attributes[attr.name] = attr
    if bias is not None:
        b_dtype = constant_array(layer.bias).dtype if layer.bias is not None else weight.dtype
        if len(node.inputs) < 3:
            node.resize_inputs(3)
        node.replace_input_with(2, set_initializer(graph, f"{layer.weight.name}_lowrank_bias", bias.astype(b_dtype)))
    for value in old:  # drop replaced initializers nothing else uses
        if (value is not None and not value.uses() and not value.is_graph_output() and value.graph is not None
                and value.graph.initializers.get(value.name) is value):
            value.graph.initializers.pop(value.name)
