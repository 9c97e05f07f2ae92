"""Weight access shared by all passes: constant weights, compressed forms, new initializers, subgraphs.

Compressed weight forms are sacred (ARCHITECTURE.md): a weight stored as Gather(codebook, Cast(indices)), as
int8/int4 behind DequantizeLinear, or marked for sparse storage is not a plain float initializer, and
passes that rewrite float weights skip it and say so.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from graphopt.graphs import attr, is_default_domain
from graphopt.modelio import SPARSE, STORAGE_KEY

# Ops whose output is a weight kept in a compressed form; folding them would undo the compression.
ENCODING_OPS = frozenset({"DequantizeLinear", "Gather", "Cast", "DynamicQuantizeLinear"})
LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def constant_tensor(value: ir.Value | None, nodes: bool = True) -> ir.TensorProtocol | None:
    """The tensor behind ``value`` if it is a constant, else None: THE rule every pass uses.

    Constant: an initializer (of this or an enclosing graph) that is not also a graph input, or (``nodes``) the
    output of a default-domain Constant node. An initializer listed as a graph input is only a default the user
    may replace at run time, so it is never a constant."""
    if value is None or value.is_graph_input():
        return None
    if value.is_initializer():
        return value.const_value
    producer = value.producer() if nodes else None
    if producer is None or producer.op_type != "Constant" or not is_default_domain(producer):
        return None
    return ir.convenience.get_const_tensor(value)


def constant_array(value: ir.Value | None, nodes: bool = False) -> np.ndarray | None:
    """The numpy value of a constant (see :func:`constant_tensor`), else None.

    By default initializers only, the weights a pass can rewrite in place; ``nodes=True`` also reads Constant
    node outputs (shapes, axes, scalars that are only matched, never rewritten)."""
    tensor = constant_tensor(value, nodes)
    return None if tensor is None else tensor.numpy()


def is_constant(value: ir.Value | None) -> bool:
    """``value`` is a constant initializer or Constant node output (no array is materialized)."""
    return constant_tensor(value) is not None


@dataclasses.dataclass(frozen=True)
class WeightLayout:
    """Which input of a linear node is its weight and which weight axes are its channels.

    Axes are non-negative axes of the weight array; both None for a MatMul weight of rank < 2 (a vector or
    scalar: no channel axis). ``batched``: a MatMul weight of rank > 2 is a stack of matrices; ``out_axis`` is then the output
    column of every matrix of the stack, so pruning and clustering may use it, but qdq quantizes such a weight
    per tensor (its per-channel form is one scale per column of a 2-D B)."""

    index: int
    out_axis: int | None
    in_axis: int | None
    batched: bool = False

    @property
    def channel_axis(self) -> int | None:
        """The per-channel quantization axis: ``out_axis`` of an unbatched weight, else None (per tensor)."""
        return None if self.batched else self.out_axis


def weight_layout(node: ir.Node, constant_a: bool = False) -> WeightLayout | None:
    """The weight layout of a default-domain Conv/ConvTranspose/Gemm/MatMul, else None.

    Conv/ConvTranspose/Gemm: input 1, whatever it is (callers check it is a constant). MatMul: input 1 when it
    is a constant; with ``constant_a``, input 0 when it is a constant of rank >= 2 and input 1 is not a
    constant of rank >= 2 (Y = W @ X: the rows of W are the output channels)."""
    op = node.op_type
    if not is_default_domain(node) or op not in LINEAR_OPS or len(node.inputs) < 2:
        return None
    if op == "Conv":
        return WeightLayout(1, 0, 1)
    if op == "ConvTranspose":
        return WeightLayout(1, 1, 0)
    if op == "Gemm":
        return WeightLayout(1, 0, 1) if attr(node, "transB", 0) else WeightLayout(1, 1, 0)
    b, a = constant_tensor(node.inputs[1], nodes=False), None
    if b is not None and len(b.shape) >= 2:
        rank = len(b.shape)
        return WeightLayout(1, rank - 1, rank - 2, rank > 2)
    if constant_a:
        a = constant_tensor(node.inputs[0], nodes=False)
    if a is not None and len(a.shape) >= 2:
        rank = len(a.shape)
        return WeightLayout(0, rank - 2, rank - 1, rank > 2)
    return None if b is None else WeightLayout(1, None, None)


def is_sparse_marked(value: ir.Value) -> bool:
    tensor = value.const_value
    return tensor is not None and tensor.metadata_props.get(STORAGE_KEY) == SPARSE


def encoding_of(value: ir.Value | None) -> str | None:
    """'int8' / 'codebook' when the weight is produced by a compressed form, else None."""
    if value is None:
        return None
    producer = value.producer()
    if producer is None:
        return None
    if producer.op_type == "DequantizeLinear":
        return "int8"
    if producer.op_type == "Gather" and producer.inputs[0] is not None and producer.inputs[0].is_initializer():
        return "codebook"
    if producer.op_type == "Cast":
        return encoding_of(producer.inputs[0])
    return None


def set_initializer(graph: ir.Graph, name_hint: str, array: np.ndarray) -> ir.Value:
    """Add a new initializer with a name unique in the graph and return its value."""
    name, i = name_hint, 0
    taken = set(graph.initializers) | {v.name for v in graph.inputs}
    while name in taken:
        i += 1
        name = f"{name_hint}_{i}"
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def replace_initializer(value: ir.Value, array: np.ndarray, keep_marks: bool = False) -> None:
    """Give an initializer new contents (same name); its shape/type follow the array."""
    old = value.const_value
    tensor = ir.tensor(array, name=value.name)
    if keep_marks and old is not None:
        tensor.metadata_props.update(old.metadata_props)
    value.const_value = tensor
    value.shape = ir.Shape(array.shape)
    value.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))


def owned_initializer(node: ir.Node, index: int) -> ir.Value | None:
    """The node's input ``index`` if it is a constant initializer used by this node only (safe to rewrite)."""
    if index >= len(node.inputs):
        return None
    value = node.inputs[index]
    if constant_tensor(value, nodes=False) is None:
        return None
    users = {use.node for use in value.uses()}
    if users != {node} or value.is_graph_output():
        return None
    return value


def write_input(node: ir.Node, index: int, array: np.ndarray, suffix: str | None = None) -> ir.Value:
    """Give ``node``'s input ``index`` new contents: in place when it is an initializer only this node uses,
    else a private copy that keeps the original's storage marks (a sparse weight stays sparse)."""
    value = node.inputs[index]
    users = {use.node for use in value.uses()}
    if value.is_initializer() and users == {node} and not value.is_graph_output() and not value.is_graph_input():
        replace_initializer(value, array, keep_marks=True)
        return value
    graph = node.graph
    if not isinstance(graph, ir.Graph):
        raise ValueError(f"node {node.name!r} is not in a graph")
    copy = set_initializer(graph, f"{value.name}_{suffix or node.name or node.op_type}", array)
    if value.const_value is not None:
        copy.const_value.metadata_props.update(value.const_value.metadata_props)
    node.replace_input_with(index, copy)
    return copy
