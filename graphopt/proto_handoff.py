"""The hand-off to tools that take only a ModelProto (onnx's version converter, onnxsim) and back.

:func:`serialize_loaded` gives such a tool the model with every tensor in memory; :func:`adopt` moves its
result back into the caller's ``ir.Model`` object, keeping the original tensor objects (their metadata marks
and lazy storage) and node provenance. :func:`ensure_opset` upgrades the default-domain opset this way.
"""

from __future__ import annotations

from typing import Iterator

import onnx
import onnx_ir as ir

from graphopt import modelio
from graphopt.errors import GraphoptError
from graphopt.graphs import default_opset
from graphopt.graphs import all_graphs, all_nodes

MAX_OPSET = onnx.defs.onnx_opset_version()


def serialize_loaded(model: ir.Model) -> onnx.ModelProto:
    """A ModelProto with every tensor in memory (external data read), for protobuf-only tools."""
    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    for graph in all_graphs(model):
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                swapped.append((value, tensor))
                value.const_value = ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=tensor.name)
    try:
        return modelio.drop_inferred_shapes(ir.serde.serialize_model(model), model)
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


def _initializers(model: ir.Model) -> Iterator[ir.Value]:
    for graph in all_graphs(model):
        yield from graph.initializers.values()


def adopt(model: ir.Model, proto: onnx.ModelProto, held: dict[str, ir.TensorProtocol] | None = None,
          listed: set[str] | None = None) -> None:
    """Replace ``model``'s graph by the one in ``proto``, in place (in-place passes keep the object).

    Protobuf tools drop tensor and node metadata_props, so tensors whose name, dtype, shape and bytes are
    unchanged get their original tensor object back (sparse marks, external storage), and nodes whose
    name and op_type are unchanged get their metadata_props back (provenance). Model metadata stays.
    ``held``: initializers that went to the tool as main-graph inputs; they become initializers again
    (and leave the inputs unless their name is in ``listed``).
    """
    new = ir.serde.deserialize_model(proto)
    for value in list(new.graph.inputs):
        if held and value.name in held:
            if value.name not in (listed or set()):
                new.graph.inputs.remove(value)
            value.const_value = held[value.name]
            new.graph.register_initializer(value)
    old_tensors = {v.name: v.const_value for v in _initializers(model) if v.const_value is not None}
    for value in _initializers(new):
        old = old_tensors.get(value.name)
        tensor = value.const_value
        if (old is not None and tensor is not None and old is not tensor and old.dtype == tensor.dtype
                and old.shape == tensor.shape and old.tobytes() == tensor.tobytes()):
            value.const_value = old  # onnxsim may reuse a name for new contents: compare bytes
    old_props = {(n.name, n.op_type): dict(n.metadata_props) for n in all_nodes(model) if n.name and n.metadata_props}
    for node in all_nodes(new):
        props = old_props.get((node.name, node.op_type))
        if props:
            node.metadata_props.update(props)
    new.graph.meta.update(model.graph.meta)  # which shapes the source declared, its size on disk …
    model.graph = new.graph
    model.ir_version = max(model.ir_version, new.ir_version)
    model.functions.clear()
    model.functions.update(new.functions)


# Main-graph initializers above this size go to the version converter as typed inputs, not data:
# adapters never read big weights, and the proto stays far below protobuf's 2 GB.
_HOLD_BYTES = 1 << 20


def _convert_proto(model: ir.Model) -> tuple[onnx.ModelProto, dict[str, ir.TensorProtocol]]:
    """The model as a proto with big main-graph initializers held back as inputs; returns them by name."""
    graph = model.graph
    held: dict[str, ir.TensorProtocol] = {}
    held_values: list[ir.Value] = []
    listed = set(graph.inputs)
    added: list[ir.Value] = []
    for value in list(graph.initializers.values()):
        tensor = value.const_value
        if tensor is None or tensor.nbytes <= _HOLD_BYTES or value.name is None:
            continue
        held[value.name] = tensor
        held_values.append(value)
        value.shape, value.dtype = value.shape or tensor.shape, value.dtype or tensor.dtype
        graph.initializers.pop(value.name)
        value.const_value = None
        if value not in listed:
            graph.inputs.append(value)
            added.append(value)
    try:
        return serialize_loaded(model), held
    finally:
        for value in added:
            graph.inputs.remove(value)
        for value in held_values:
            value.const_value = held[value.name]
            graph.register_initializer(value)


def ensure_opset(model: ir.Model, target: int) -> tuple[int, int] | None:
    """Upgrade the default-domain opset to ``target`` (never down); returns (from, to) when converted.

    Other passes call this too when they need a newer opset (UINT4 needs 21).
    """
    current = default_opset(model)
    if current is None or current >= target:
        return None
    if target > MAX_OPSET:
        raise GraphoptError(f"opset {target} is newer than this onnx supports (up to {MAX_OPSET})")
    listed = {v.name for v in model.graph.inputs}
    proto, held = _convert_proto(model)
    if proto.ir_version < 4:
        # IR < 4: the converter expects every initializer to be a graph input.
        names = {i.name for i in proto.graph.input}
        for tensor in proto.graph.initializer:
            if tensor.name not in names:
                proto.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    try:
        converted = onnx.version_converter.convert_version(proto, target)
    except Exception as err:  # noqa: BLE001 - the converter raises several C++ error types
        message = " ".join(str(err).split())
        raise GraphoptError(f"could not upgrade the model from opset {current} to opset {target}: {message}") from None
    adopt(model, converted, held, listed)
    min_ir = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", target)])
    model.ir_version = max(model.ir_version, min_ir)
    return current, target
