"""Weight access shared by all passes: constant weights, compressed forms, new initializers, subgraphs.

Compressed weight forms are sacred (DESIGN.md): a weight stored as Gather(codebook, Cast(indices)), as
int8/int4 behind DequantizeLinear, or marked for sparse storage is not a plain float initializer, and
passes that rewrite float weights skip it and say so.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import onnx_ir as ir

from graphopt.modelio import SPARSE, STORAGE_KEY

# Ops whose output is a weight kept in a compressed form; folding them would undo the compression.
ENCODING_OPS = frozenset({"DequantizeLinear", "Gather", "Cast", "DynamicQuantizeLinear"})


def attr(node: ir.Node, name: str, default):
    """The value of a node attribute, or ``default`` when it is absent."""
    found = node.attributes.get(name)
    return default if found is None else found.value


def all_graphs(model: ir.Model) -> list[ir.Graph]:
    """The main graph and every subgraph (If/Loop/Scan bodies), outermost first."""
    return [model.graph, *model.graph.subgraphs()]


def all_nodes(model: ir.Model) -> Iterator[ir.Node]:
    for graph in all_graphs(model):
        yield from list(graph)


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of an initializer (in any enclosing graph) or None if it is not a plain constant."""
    if value is None or value.const_value is None or not value.is_initializer():
        return None
    return value.const_value.numpy()


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
    """The node's input ``index`` if it is an initializer used by this node only (safe to rewrite)."""
    if index >= len(node.inputs):
        return None
    value = node.inputs[index]
    if value is None or not value.is_initializer() or value.const_value is None:
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
