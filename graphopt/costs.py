"""Model statistics from shapes: parameters, MACs per layer, and shape inference on a weight-less copy.

MACs come from shapes inferred on a weight-less protobuf copy of the model: every initializer larger than
``INLINE_BYTES`` is written as a stub tensor (dims and dtype, data "external" in a file that does not exist),
so ONNX shape inference sees its shape without a byte of the weights being copied, at every graph level
(If/Loop bodies included, where initializers cannot become graph inputs). Small initializers stay inline so
``data_prop`` can read Reshape/Slice constants. The model given is never modified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import onnx
import onnx.version_converter
import onnx_ir as ir

from graphopt.errors import GraphoptError
from graphopt.modelio import proto_graphs as _proto_graphs  # every GraphProto level, subgraphs included
from graphopt.graphs import all_graphs, default_opset, is_default_domain

__all__ = [
    "DATA_PROP_OPSET",
    "INLINE_BYTES",
    "Dims",
    "LayerCost",
    "count_macs",
    "count_params",
    "value_dims",
    "layer_costs",
    "stored_tensors",
]

# Initializers up to this many bytes are copied into the inference proto (shape constants, scales, biases).
INLINE_BYTES = 64 * 1024
_STUB_LOCATION = "__graphopt_no_data__"
# Below this default-domain opset, shapes are also inferred on a copy converted to it (see value_dims).
DATA_PROP_OPSET = 14

Dims = tuple[int | None, ...]

# op_type -> (kind, index of the activation input, index of the weight input, index of the bias input)
_COMPUTE_OPS: dict[str, tuple[str, int, int, int | None]] = {
    "Conv": ("conv", 0, 1, 2),
    "FusedConv": ("conv", 0, 1, 2),
    "ConvInteger": ("conv", 0, 1, None),
    "QLinearConv": ("conv", 0, 3, 8),
    "ConvTranspose": ("convT", 0, 1, 2),
    "Gemm": ("gemm", 0, 1, 2),
    "QGemm": ("gemm", 0, 3, 6),
    "MatMul": ("matmul", 0, 1, None),
    "FusedMatMul": ("matmul", 0, 1, None),
    "MatMulInteger": ("matmul", 0, 1, None),
    "QLinearMatMul": ("matmul", 0, 3, None),
    "MatMulIntegerToFloat": ("matmul", 0, 1, 6),
    "DynamicQuantizeMatMul": ("matmul", 0, 1, 4),
    "MatMulNBits": ("nbits", 0, 1, 5),
}


@dataclass
class LayerCost:
    node: str
    op: str
    macs: int
    params: int
    output_shape: tuple[int, ...] | None
    note: str = ""  # why macs is 0 (shape unknown), empty otherwise


# ---------------------------------------------------------------- parameters


def _numel(shape: Sequence[int | None] | None) -> int | None:
    if shape is None or any(not isinstance(d, int) for d in shape):
        return None
    return math.prod(shape)


def _ir_dims(value: ir.Value) -> Dims | None:
    if value.const_value is not None:
        return tuple(value.const_value.shape.numpy())
    if value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else None for d in value.shape.dims)


def stored_tensors(model: ir.Model) -> list[tuple[str, ir.TensorProtocol]]:
    """(name, tensor) of every initializer and Constant-node ``value``, subgraphs included.

    Constant nodes count because un-canonicalized exports (Paddle, older PyTorch) keep their weights there.
    """
    found = []
    for graph in all_graphs(model):
        for value in graph.initializers.values():
            if value.const_value is not None:
                found.append((value.name, value.const_value))
        for node in graph:
            attr = node.attributes.get("value")
            if node.op_type == "Constant" and is_default_domain(node) and attr is not None:
                if attr.type == ir.AttributeType.TENSOR:
                    found.append((node.outputs[0].name or node.name or "", attr.as_tensor()))
    return found


def count_params(model: ir.Model) -> int:
    """Elements of all initializers and Constant tensors, subgraphs included (int8 counts like float)."""
    return sum(math.prod(tensor.shape.numpy()) for _, tensor in stored_tensors(model))


# ---------------------------------------------------------------- weight-less copy for shape inference


def _stub_tensor(value: ir.Value) -> onnx.TensorProto:
    tensor = onnx.TensorProto(name=value.name)
    const = value.const_value
    dims = const.shape.numpy() if const is not None else [d if isinstance(d, int) else 0 for d in value.shape or []]
    tensor.dims.extend(dims)
    dtype = const.dtype if const is not None else value.dtype
    tensor.data_type = int(dtype) if dtype is not None else onnx.TensorProto.FLOAT
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", _STUB_LOCATION
    return tensor


def _input_info(value: ir.Value, dims: Sequence[int | str | None] | None) -> onnx.ValueInfoProto:
    if value.dtype is None or not isinstance(value.type, ir.TensorType):
        return ir.serde.serialize_value(value)
    return onnx.helper.make_tensor_value_info(value.name, int(value.dtype), dims)


def _fixed_dims(
    value: ir.Value, input_shapes: dict[str, tuple[int, ...]], batch: set[str]
) -> list[int | str | None] | None:
    if value.name in input_shapes:
        given = tuple(input_shapes[value.name])
        if value.shape is not None and len(given) != value.shape.rank():
            raise GraphoptError(
                f"input shape for {value.name!r}: rank {len(given)} given, the model's input has rank "
                f"{value.shape.rank()}"
            )
        return list(given)
    if value.shape is None:
        return None
    dims: list[int | str | None] = []
    for i, dim in enumerate(value.shape.dims):
        if isinstance(dim, int):
            dims.append(dim)
        elif i == 0 or (dim.value is not None and dim.value in batch):
            dims.append(1)  # the batch dim, wherever its symbol appears
        else:
            dims.append(dim.value)
    return dims


def _node_proto(node: ir.Node) -> onnx.NodeProto:
    proto = onnx.NodeProto(op_type=node.op_type, domain=node.domain, name=node.name or "")
    if node.overload:
        proto.overload = node.overload
    proto.input.extend(v.name if v is not None else "" for v in node.inputs)
    proto.output.extend(v.name or "" for v in node.outputs)
    for attr in node.attributes.values():
        if attr.is_ref():
            ir.serde.serialize_reference_attribute_into(proto.attribute.add(), attr)
        elif attr.type == ir.AttributeType.GRAPH:
            proto.attribute.append(
                onnx.helper.make_attribute(attr.name, _weightless_graph(attr.as_graph(), None))
            )
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs = [_weightless_graph(g, None) for g in attr.as_graphs()]
            proto.attribute.append(onnx.helper.make_attribute(attr.name, graphs, attr_type=onnx.AttributeProto.GRAPHS))
        else:
            ir.serde.serialize_attribute_into(proto.attribute.add(), attr)
    return proto


def _batch_symbols(graph: ir.Graph, input_shapes: dict[str, tuple[int, ...]]) -> set[str]:
    symbols = set()
    for value in graph.inputs:
        if value.name not in input_shapes and value.shape is not None and value.shape.rank() > 0:
            first = value.shape.dims[0]
            if isinstance(first, ir.SymbolicDim) and first.value:
                symbols.add(first.value)
    return symbols


def _weightless_graph(graph: ir.Graph, input_shapes: dict[str, tuple[int, ...]] | None) -> onnx.GraphProto:
    """``input_shapes`` is None for subgraphs (their inputs keep their declared form)."""
    proto = onnx.GraphProto(name=graph.name or "graph")
    batch = _batch_symbols(graph, input_shapes) if input_shapes is not None else set()
    for value in graph.inputs:
        if input_shapes is None:
            proto.input.append(ir.serde.serialize_value(value))
        elif value.name not in graph.initializers:
            proto.input.append(_input_info(value, _fixed_dims(value, input_shapes, batch)))
    for value in graph.initializers.values():
        const = value.const_value
        if const is not None and const.nbytes <= INLINE_BYTES and not isinstance(const, ir.ExternalTensor):
            proto.initializer.append(ir.serde.serialize_tensor(const))
            proto.initializer[-1].name = value.name
        else:
            proto.initializer.append(_stub_tensor(value))
    proto.node.extend(_node_proto(node) for node in graph)
    # Names only: inference fills types and shapes; a declared symbolic shape could clash with the fixed batch.
    proto.output.extend(onnx.ValueInfoProto(name=value.name) for value in graph.outputs)
    return proto


def _weightless_model(model: ir.Model, input_shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    opsets = [onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()]
    proto = onnx.helper.make_model(_weightless_graph(model.graph, input_shapes), opset_imports=opsets)
    proto.ir_version = model.ir_version
    proto.functions.extend(ir.serde.serialize_function(f) for f in model.functions.values())
    return proto


def value_dims(model: ir.Model, input_shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, Dims]:
    """Value name -> inferred dims (None for an unknown dim), batch fixed to 1 unless given."""
    input_shapes = dict(input_shapes or {})
    known = {v.name for v in model.graph.inputs}
    for name in input_shapes:
        if name not in known:
            raise GraphoptError(f"input shape given for {name!r}, but the model has no input of that name")
    proto = _weightless_model(model, input_shapes)
    shapes = _read_shapes(_run_inference(proto))
    opset = default_opset(model, 0)
    if 0 < opset < DATA_PROP_OPSET:
        # ONNX propagates Shape->Slice->Concat->Reshape values only at newer opsets; the weight-less copy
        # converts in milliseconds, and what it learns fills the gaps (the original's answer wins ties).
        try:
            converted = onnx.version_converter.convert_version(proto, DATA_PROP_OPSET)
        except Exception:  # noqa: BLE001 - the converter lacks some adapters; keep what we have
            converted = None
        if converted is not None:
            for name, dims in _read_shapes(_run_inference(converted)).items():
                old = shapes.get(name)
                if old is None or (len(old) == len(dims) and old.count(None) > dims.count(None)):
                    shapes[name] = dims
    return shapes


def _run_inference(proto: onnx.ModelProto) -> onnx.ModelProto:
    for data_prop in (True, False):
        try:
            return onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=data_prop)
        except Exception:  # noqa: BLE001 - best effort: fewer shapes, MACs 0 where unknown
            continue
    return proto


def _read_shapes(inferred: onnx.ModelProto) -> dict[str, Dims]:
    shapes: dict[str, Dims] = {}
    for graph in _proto_graphs(inferred.graph):
        for info in [*graph.input, *graph.value_info, *graph.output]:
            tensor_type = info.type.tensor_type
            if info.type.HasField("tensor_type") and tensor_type.HasField("shape"):
                dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
                shapes.setdefault(info.name, dims)
        for init in graph.initializer:
            shapes.setdefault(init.name, tuple(init.dims))
    return shapes


# ---------------------------------------------------------------- MACs


def _is_const(value: ir.Value, memo: dict[int, bool]) -> bool:
    """True when the value depends on initializers/Constants only (a weight, perhaps dequantized or decoded)."""
    key = id(value)
    if key in memo:
        return memo[key]
    memo[key] = False  # guards against cycles in malformed graphs
    producer = value.producer()
    if value.const_value is not None or value.is_initializer():
        result = True
    elif producer is None:
        result = False
    elif producer.op_type == "Constant" and is_default_domain(producer):
        result = True
    else:
        inputs = [v for v in producer.inputs if v is not None]
        result = bool(inputs) and all(_is_const(v, memo) for v in inputs)
    memo[key] = result
    return result


def _dims(value: ir.Value | None, shapes: dict[str, Dims]) -> Dims | None:
    if value is None:
        return None
    dims = shapes.get(value.name)
    if dims is not None and all(d is not None for d in dims):
        return dims
    own = _ir_dims(value)  # the model's own annotation, e.g. for ops ONNX cannot infer
    if own is not None and all(d is not None for d in own):
        return own
    return dims


def _input(node: ir.Node, index: int | None) -> ir.Value | None:
    if index is None or index >= len(node.inputs):
        return None
    return node.inputs[index]


def _macs(kind: str, node: ir.Node, x: Dims | None, w: Dims | None, out: Dims | None) -> int | None:
    if kind == "conv":  # every output element: (C/group) * prod(kernel) MACs
        if _numel(out) is None or _numel(w) is None or len(w) < 2:
            return None
        return math.prod(out) * math.prod(w[1:])
    if kind == "convT":  # every input element scatters into (M/group) * prod(kernel) outputs
        if _numel(x) is None or _numel(w) is None or len(w) < 2:
            return None
        return math.prod(x) * math.prod(w[1:])
    if kind == "nbits":
        k = node.attributes.get("K")
        return math.prod(out) * k.as_int() if _numel(out) is not None and k is not None else None
    k_dim = _k_dim(node, x, w)
    if _numel(out) is None or k_dim is None:
        return None
    return math.prod(out) * k_dim  # every output element of a (batched) matrix product: K MACs


def _flag(node: ir.Node, name: str) -> bool:
    attr = node.attributes.get(name)
    return attr is not None and attr.as_int() == 1


def _k_dim(node: ir.Node, a: Dims | None, b: Dims | None) -> int | None:
    """The contracted dimension of A @ B (Gemm/FusedMatMul transA/transB honoured, 1-D operands too)."""
    if a:
        k = a[0] if len(a) == 1 else a[-2 if _flag(node, "transA") else -1]
        if k is not None:
            return k
    if b:
        return b[0] if len(b) == 1 else b[-1 if _flag(node, "transB") else -2]
    return None


def layer_costs(model: ir.Model, input_shapes: dict[str, tuple[int, ...]] | None = None) -> list[LayerCost]:
    """MACs and weight elements of each Conv/ConvTranspose/Gemm/MatMul-like node, If/Loop bodies included."""
    shapes = value_dims(model, input_shapes)
    memo: dict[int, bool] = {}
    costs = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        spec = _COMPUTE_OPS.get(node.op_type)
        if spec is None or not node.outputs:
            continue
        kind, xi, wi, bi = spec
        x, w, b = _input(node, xi), _input(node, wi), _input(node, bi)
        x_dims, w_dims, out_dims = _dims(x, shapes), _dims(w, shapes), _dims(node.outputs[0], shapes)
        params = 0
        for value, dims in ((x, x_dims), (w, w_dims), (b, _dims(b, shapes))):
            if value is not None and _is_const(value, memo):
                params += _numel(dims) or 0
        if kind == "nbits" and w is not None:  # packed blocks: count the logical N x K weight
            n, k = node.attributes.get("N"), node.attributes.get("K")
            if n is not None and k is not None:
                params += n.as_int() * k.as_int() - (_numel(w_dims) or 0)
        macs = _macs(kind, node, x_dims, w_dims, out_dims)
        note = "" if macs is not None else "shape unknown (symbolic dims? pass input shapes)"
        out = out_dims if _numel(out_dims) is not None else None
        name = node.name or node.outputs[0].name or ""
        costs.append(LayerCost(name, node.op_type, macs or 0, params, out, note))  # type: ignore[arg-type]
    return costs


def count_macs(model: ir.Model, input_shapes: dict[str, tuple[int, ...]] | None = None) -> int:
    return sum(cost.macs for cost in layer_costs(model, input_shapes))
