"""canonicalize: one shape for every exported model, so later passes need not care who exported it.

Constant-node weights become initializers (main graph and If/Loop bodies), old default-domain opsets are
upgraded with onnx's version converter, initializers listed as graph inputs are unlisted, every node gets a
unique name, and shapes are inferred. Custom domains (com.microsoft …) are left alone.

The opset upgrade goes through :mod:`graphopt.proto_handoff`; names and shapes through :mod:`graphopt.graphs`.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass

from graphopt import modelio
from graphopt.graphs import infer_shapes, is_default_domain, name_nodes
from graphopt.options import BaseOptions, option
from graphopt.passbase import GraphoptPass, GraphoptResult
from graphopt.proto_handoff import MAX_OPSET, ensure_opset
from graphopt.graphs import all_nodes


def lift_constants(model: ir.Model) -> int:
    """Tensor-valued Constant nodes (any graph) → initializers of the graph they are in; returns the count."""
    for node in all_nodes(model):
        if node.op_type == "Constant" and is_default_domain(node) and node.outputs[0].name is None:
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


class Canonicalize(GraphoptPass):
    """Constant weights → initializers, opset upgrade, initializers unlisted from inputs, names, shapes."""

    name = "canonicalize"
    summary = "normalize an exported model: Constant weights to initializers, opset >= 13, node names, shapes"
    exact = True

    @dataclasses.dataclass(frozen=True)
    class Options(BaseOptions):
        opset: int = option(13, "upgrade default-domain opsets below this (never downgrades)", low=7, high=MAX_OPSET)
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
