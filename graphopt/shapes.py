"""Value dims from ONNX shape inference on a weight-less copy of a model, and concrete input shapes to infer at.

Every initializer larger than ``INLINE_BYTES`` is written as a stub tensor (dims and dtype, data "external" in a
file that does not exist), so ONNX shape inference sees its shape without a byte of the weights being copied, at
every graph level (If/Loop bodies included, where initializers cannot become graph inputs). Small initializers
stay inline so ``data_prop`` can read Reshape/Slice constants. The model given is never modified.

Exports compute shapes at run time (torch: positions from Shape/Range, masks from Shape/Expand/Where, head
reshapes from Shape/Slice/Concat) and ONNX inference reads some of those values only from initializers (Slice,
Range). So when the inputs' shapes are concrete the shape arithmetic is evaluated here: a ``Shape`` whose input
dims are known becomes a constant, then every small node whose inputs are all constants (onnx's reference
evaluator), and inference runs again, until nothing more folds.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import onnx
import onnx.version_converter
import onnx_ir as ir
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from graphopt.errors import GraphoptError
from graphopt.graphs import default_opset
from graphopt.modelio import proto_graphs as _proto_graphs  # every GraphProto level, subgraphs included

__all__ = ["DATA_PROP_OPSET", "DEFAULT_DIM", "INLINE_BYTES", "Dims", "resolve_input_shapes", "value_dims"]

# Initializers up to this many bytes are copied into the inference proto (shape constants, scales, biases).
INLINE_BYTES = 64 * 1024
_STUB_LOCATION = "__graphopt_no_data__"
# Below this default-domain opset, shapes are also inferred on a copy converted to it (see value_dims).
DATA_PROP_OPSET = 14
# Shape arithmetic folded to constants for inference: values of at most this many elements, at most this many
# rounds of fold-then-infer (each round reaches the Shape nodes the previous one gave dims to).
_FOLD_ELEMENTS = 4096
_FOLD_ROUNDS = 16
# What a symbolic dimension other than the batch counts as when no shape or data says (a text's sequence, an
# image side): see resolve_input_shapes.
DEFAULT_DIM = 128

Dims = tuple[int | None, ...]


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
    for _ in range(_FOLD_ROUNDS):  # shape arithmetic ONNX does not propagate: folded, then inferred again
        unknown = any(shapes.get(out) is None or None in shapes[out] for n in proto.graph.node for out in n.output)
        if not unknown or not _fold_shape_arithmetic(proto, shapes, opset):
            break
        shapes = _read_shapes(_run_inference(proto))
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


def _fold_shape_arithmetic(proto: onnx.ModelProto, shapes: dict[str, Dims], opset: int) -> bool:
    """Replace, in the main graph of the weight-less copy, each node :func:`_folded` evaluates by initializers;
    True when one was."""
    graph = proto.graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer
              if t.data_location != onnx.TensorProto.EXTERNAL and math.prod(t.dims) <= _FOLD_ELEMENTS}
    outputs = {o.name for o in graph.output}
    kept, folded = [], []
    for node in graph.node:
        result = None if outputs.intersection(node.output) else _folded(node, values, shapes, opset)
        if result is None:
            kept.append(node)
            continue
        for name, array in zip(node.output, result):
            values[name] = array
            folded.append(numpy_helper.from_array(array, name))
    if folded:
        del graph.node[:]
        graph.node.extend(kept)
        graph.initializer.extend(folded)
    return bool(folded)


def _folded(node: onnx.NodeProto, values: dict, shapes: dict[str, Dims], opset: int) -> list | None:
    """The outputs of a default-domain node whose value is known: a Shape of known dims, or a node whose inputs
    are all small known constants (random ops and control flow left alone); None otherwise."""
    if node.domain not in ("", "ai.onnx") or node.op_type.startswith("Random") or any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
        return None
    if node.op_type == "Shape":
        dims = shapes.get(node.input[0])
        if dims is None or None in dims:
            return None
        attrs = {a.name: a.i for a in node.attribute}
        return [np.array(dims[attrs.get("start", 0):attrs.get("end", len(dims))], np.int64)]
    names = [name for name in node.input if name]
    if not all(name in values for name in names) or (not names and node.op_type != "Constant"):
        return None
    if any(a.type == onnx.AttributeProto.TENSOR and math.prod(a.t.dims) > _FOLD_ELEMENTS for a in node.attribute):
        return None  # a Constant node's weight: not shape arithmetic
    try:
        result = ReferenceEvaluator(node, opsets={"": opset}).run(None, {n: values[n] for n in names})
    except Exception:  # noqa: BLE001 - a node the reference evaluator cannot run stays for inference
        return None
    arrays = [np.asarray(r) for r in result]
    return arrays if all(a.size <= _FOLD_ELEMENTS and a.dtype != object for a in arrays) else None


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


def resolve_input_shapes(
    model: ir.Model, given: Mapping[str, Sequence[int]] | None = None, feed: Mapping[str, np.ndarray] | None = None,
    default: int = DEFAULT_DIM,
) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """Concrete shapes of the model's inputs to count MACs at, and the symbolic dims that took ``default``.

    A shape in ``given`` wins; else the declared static dims, batch 1 (axis 0, or a symbol found on axis 0), and the
    other dynamic dims from ``feed`` (one sample of data), from a symbol another input's given shape or feed binds
    (``sequence`` of input_ids for attention_mask), else ``default`` (named ``symbol`` or ``input[axis]``)."""
    given = {k: tuple(int(d) for d in v) for k, v in (given or {}).items()}
    feed = dict(feed or {})
    inputs = [v for v in model.graph.inputs if not v.is_initializer() and v.shape is not None]
    batch = _batch_symbols(model.graph, {})
    bound: dict[str, int] = {}
    for value in inputs:
        dims = given.get(value.name) or (np.shape(feed[value.name]) if value.name in feed else None)
        if dims is not None and len(dims) == value.shape.rank():
            for i, dim in enumerate(value.shape.dims):
                if isinstance(dim, ir.SymbolicDim) and dim.value and i > 0 and dim.value not in batch:
                    bound.setdefault(dim.value, int(dims[i]))
    shapes: dict[str, tuple[int, ...]] = {}
    defaulted: dict[str, int] = {}
    for value in inputs:
        if value.name in given:
            shapes[value.name] = given[value.name]
            continue
        sample = np.shape(feed[value.name]) if value.name in feed else None
        if sample is not None and len(sample) != value.shape.rank():
            sample = None
        dims = []
        for i, dim in enumerate(value.shape.dims):
            symbol = dim.value if isinstance(dim, ir.SymbolicDim) else None
            if isinstance(dim, int):
                dims.append(dim)
            elif i == 0 or (symbol and symbol in batch):
                dims.append(1)
            elif sample is not None:
                dims.append(int(sample[i]))
            elif symbol and symbol in bound:
                dims.append(bound[symbol])
            else:
                defaulted[symbol or f"{value.name}[{i}]"] = default
                dims.append(default)
        shapes[value.name] = tuple(dims)
    return shapes, defaulted
