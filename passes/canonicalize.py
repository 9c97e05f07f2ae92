"""canonicalize: one shape for every exported model, so later passes need not care who exported it.

Constant-node weights become initializers (main graph and If/Loop bodies), old default-domain opsets are
upgraded with onnx's version converter, initializers listed as graph inputs are unlisted, every node gets a
unique name, and shapes are inferred. Custom domains (com.microsoft …) are left alone.

Also home of two helpers for tools that only take a ModelProto (version converter, onnxsim):
:func:`serialize_loaded` and :func:`adopt`, which moves a converted model back into the caller's
``ir.Model`` object while keeping the original tensor objects (their metadata marks and lazy storage).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Iterator

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass, ShapeInferencePass

from graphopt import modelio
from graphopt.errors import GraphoptError
from graphopt.options import BaseOptions, option
from graphopt.passbase import GraphoptPass, GraphoptResult
from graphopt.weights import all_graphs, all_nodes

DEFAULT_DOMAINS = ("", "ai.onnx")
_MAX_OPSET = onnx.defs.onnx_opset_version()


def default_opset(model: ir.Model) -> int | None:
    for domain in DEFAULT_DOMAINS:
        if domain in model.opset_imports:
            return model.opset_imports[domain]
    return None


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
    if target > _MAX_OPSET:
        raise GraphoptError(f"opset {target} is newer than this onnx supports (up to {_MAX_OPSET})")
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


def name_nodes(model: ir.Model) -> tuple[int, int]:
    """Give unnamed nodes a name and rename duplicates, unique over the whole model; (named, renamed)."""
    nodes = list(all_nodes(model))
    taken = collections.Counter(n.name for n in nodes if n.name)
    seen: set[str] = set()
    counters: collections.Counter[str] = collections.Counter()
    named = renamed = 0
    for node in nodes:
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = node.name or node.op_type
        while True:
            counters[base] += 1
            candidate = f"{base}_{counters[base]}"
            if candidate not in taken and candidate not in seen:
                break
        if node.name:
            renamed += 1
        else:
            named += 1
        node.name = candidate
        seen.add(candidate)
    return named, renamed


def lift_constants(model: ir.Model) -> int:
    """Tensor-valued Constant nodes (any graph) → initializers of the graph they are in; returns the count."""
    for node in all_nodes(model):
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS and node.outputs[0].name is None:
            node.outputs[0].name = f"{node.name}_output"  # the lifted initializer needs a name
    before = sum(1 for n in all_nodes(model) if n.op_type == "Constant")
    LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0)(model)
    return before - sum(1 for n in all_nodes(model) if n.op_type == "Constant")


def unlist_initializer_inputs(model: ir.Model) -> int:
    """Drop main-graph inputs that are initializers (subgraph inputs are positional: left alone)."""
    graph = model.graph
    keep = [v for v in graph.inputs if not (v.name in graph.initializers and graph.initializers[v.name] is v)]
    removed = len(graph.inputs) - len(keep)
    if removed:
        graph.inputs.clear()
        graph.inputs.extend(keep)
        model.ir_version = max(model.ir_version, 4)  # IR >= 4 allows initializers that are not inputs
    return removed


class _Failures(logging.Handler):
    """Collects the warning ShapeInferencePass logs when onnx's inference fails (it never raises)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        err = record.exc_info[1] if record.exc_info else None
        self.messages.append(" ".join(str(err or record.getMessage()).split())[:300])


def infer_shapes(model: ir.Model) -> str | None:
    """Strict shape inference, else partial; returns a note when strict inference failed."""
    logger = logging.getLogger("onnx_ir.passes.common.shape_inference")
    catcher = _Failures()
    saved = logger.level, logger.propagate
    logger.addHandler(catcher)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    try:
        ShapeInferencePass(strict_mode=True)(model)
        if not catcher.messages:
            return None
        first = catcher.messages[0]
        catcher.messages.clear()
        ShapeInferencePass(strict_mode=False)(model)
        partial = "partial shapes kept" if not catcher.messages else "model left without inferred shapes"
        return f"shape inference failed ({partial}): {first}"
    finally:
        logger.removeHandler(catcher)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


class Canonicalize(GraphoptPass):
    """Constant weights → initializers, opset upgrade, initializers unlisted from inputs, names, shapes."""

    name = "canonicalize"
    summary = "normalize an exported model: Constant weights to initializers, opset >= 13, node names, shapes"
    exact = True

    @dataclasses.dataclass(frozen=True)
    class Options(BaseOptions):
        opset: int = option(13, "upgrade default-domain opsets below this (never downgrades)", low=7, high=_MAX_OPSET)
        infer_shapes: bool = option(True, "run onnx shape inference at the end (failures are only noted)")

    def call(self, model: ir.Model) -> GraphoptResult:
        rows: list[dict] = []
        notes: list[str] = []
        modelio.record_written_shapes(model)  # before inferring any: an in-memory model was not loaded by us
        converted = ensure_opset(model, self.options.opset)
        if converted is not None:
            rows.append({"change": "opset", "from": converted[0], "to": converted[1]})
        # Naming before lifting: lifted initializers of unnamed Constant outputs are named after the node.
        named, renamed = name_nodes(model)
        lifted = lift_constants(model)
        if lifted:
            rows.append({"change": "constants_lifted", "count": lifted})
        unlisted = unlist_initializer_inputs(model)
        if unlisted:
            rows.append({"change": "inputs_unlisted", "count": unlisted})
        if named or renamed:
            rows.append({"change": "nodes_named", "count": named, "duplicates_renamed": renamed})
        if self.options.infer_shapes:
            note = infer_shapes(model)
            if note:
                notes.append(note)
        return self.result(model, rows, notes)
