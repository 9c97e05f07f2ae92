"""cleanup: constant folding, identities, dead nodes, topological order, then onnxsim when it helps.

Compressed weight forms are held out of folding (ARCHITECTURE.md, rule 2): a folder would turn Gather(codebook,
Cast(indices)), int8/int4 weights behind DequantizeLinear and sparse-marked initializers back into dense
float. onnxscript's folder takes a ``should_fold`` veto for that; onnxsim has none, so it runs only on
models without compressed forms, on a copy, and its result is taken only when it has fewer nodes and the
same inputs and outputs. onnxsim failing is a note, never an error.

Fewer nodes is not faster: onnxsim turns a transformer's 3-D MatMul+Add into Reshape→Gemm→Reshape, which
onnxruntime's own fusions then miss (measured 1.10x slower on a BERT-style encoder). When the run times models
(``context.latency``), folding and onnxsim are each timed against the model without them and undone when
slower beyond the noise; the row shows the timing that decided.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections import Counter

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import (
    LiftConstantsToInitializersPass,
    RemoveUnusedNodesPass,
    TopologicalSortPass,
)
from onnxscript import optimizer as onnxscript_optimizer

from graphopt.modelio import drop_inferred_shapes, tensor_bytes
from graphopt.options import BaseOptions, option
from graphopt.passbase import GraphoptPass, GraphoptResult
from graphopt.proto_handoff import adopt, serialize_loaded
from graphopt.graphs import all_graphs, all_nodes, is_default_domain
from graphopt.weights import constant_tensor, is_sparse_marked

# Storage dtypes of compressed weights: a node reading one of these constants decompresses it.
LOW_BIT = frozenset({
    ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT4, ir.DataType.UINT4,
    *(getattr(ir.DataType, n) for n in ("INT2", "UINT2", "FLOAT4E2M1", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ",
                                         "FLOAT8E5M2", "FLOAT8E5M2FNUZ") if hasattr(ir.DataType, n)),
})
FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16})
DEQUANT_OPS = frozenset({"DequantizeLinear", "DynamicQuantizeLinear"})


def _const_initializer(value: ir.Value | None) -> bool:
    """A stored constant; a graph input's default is not one (nothing folds it, the user may replace it)."""
    return constant_tensor(value, nodes=False) is not None


def held_out_reason(node: ir.Node) -> str | None:
    """Why folding ``node`` would undo a compressed weight form, or None."""
    inputs = [v for v in node.inputs if v is not None]
    if node.op_type in DEQUANT_OPS and inputs and _const_initializer(inputs[0]):
        return "quantized weight"
    if any(_const_initializer(v) and is_sparse_marked(v) for v in inputs):
        return "sparse weight"
    if any(_const_initializer(v) and v.dtype in LOW_BIT for v in inputs):
        return "low-bit weight"  # Cast(uint8 indices), int4 unpacking …
    if node.op_type == "Gather" and len(inputs) == 2 and _const_initializer(inputs[0]) and inputs[0].dtype in FLOAT_TYPES:
        indices = inputs[1]
        producer = indices.producer()
        if _const_initializer(indices) or (producer is not None and producer.op_type == "Cast"
                                            and _const_initializer(producer.inputs[0])):
            return "codebook weight"
    return None


def compressed_forms(model: ir.Model) -> Counter[str]:
    """How many nodes/initializers of each compressed form the model holds."""
    found: Counter[str] = Counter()
    for node in all_nodes(model):
        reason = held_out_reason(node)
        if reason:
            found[reason] += 1
    for graph in all_graphs(model):
        found["sparse initializer"] += sum(1 for v in graph.initializers.values() if is_sparse_marked(v))
    return +found


def _should_fold(node: ir.Node) -> bool | None:
    return False if held_out_reason(node) else None


def _drop_identity(node: ir.Node) -> bool:
    """Drop ``y = Identity(x)`` when every graph stays whole; whether it did.

    onnx_ir's IdentityEliminationPass also drops it when y is a graph output and x is not made by a node of that
    graph: an If branch or Loop body returning an outer value then has an output no node of it makes (the
    checker refuses it), or one value is the output of two graphs (onnx_ir raises). And when x is already an
    output, two outputs merge into one and the other name is lost. Here x takes y's place as an output only
    when a node of the same graph makes it and it is no output yet; otherwise the Identity stays.
    """
    if node.op_type != "Identity" or not is_default_domain(node) or len(node.inputs) != 1 or len(node.outputs) != 1:
        return False
    source, target = node.inputs[0], node.outputs[0]
    if source is None:
        return False
    if target.is_graph_output():
        producer = source.producer()
        if producer is None or producer.graph is not node.graph or source.is_graph_output():
            return False
        ir.convenience.replace_all_uses_with(target, source, replace_graph_outputs=True)
        source.name = target.name  # the output keeps its name and declared type and shape
        source.type = target.type or source.type
        source.shape = target.shape if target.shape is not None else source.shape
    else:
        ir.convenience.replace_all_uses_with(target, source)
    node.graph.remove(node, safe=True)
    return True


def drop_identities(model: ir.Model) -> int:
    """Drop every Identity :func:`_drop_identity` allows, subgraphs and functions included; how many."""
    nodes = list(all_nodes(model))
    for function in model.functions.values():
        nodes.extend(ir.traversal.RecursiveGraphIterator(function))
    return sum(_drop_identity(node) for node in nodes)


def count_nodes(model: ir.Model) -> int:
    return sum(1 for _ in all_nodes(model))


class Cleanup(GraphoptPass):
    """Fold constants (compressed forms held out), drop identities and dead nodes, sort, then onnxsim."""

    name = "cleanup"
    summary = "constant folding, dead nodes, identities, topological sort, then onnxsim (compressed forms kept)"
    exact = True

    @dataclasses.dataclass(frozen=True)
    class Options(BaseOptions):
        onnxsim: bool = option(True, "also run onnxsim (on a copy; kept only when it removes nodes)")
        onnxsim_max_mb: float = option(
            200.0, "skip onnxsim above this many MB of weights (on VGG-19, 575 MB, it took 6 s and 3 GB)", low=0.0)

    def call(self, model: ir.Model) -> GraphoptResult:
        rows: list[dict] = []
        notes: list[str] = []
        probe = self.context.latency
        unfolded = serialize_loaded(model) if probe is not None else None
        before = count_nodes(model)
        ops_before = Counter(n.op_type for n in all_nodes(model))
        try:
            onnxscript_optimizer.fold_constants(model, should_fold=_should_fold)
        except Exception as err:  # noqa: BLE001 - the folder's evaluators raise anything
            notes.append(f"constant folding stopped early: {' '.join(str(err).split())[:300]}")
        drop_identities(model)
        RemoveUnusedNodesPass()(model)
        # Folded shapes come back as Constant nodes; keep the canonical form (constants are initializers).
        LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        TopologicalSortPass()(model)
        after = count_nodes(model)
        modified = False
        if after != before:
            removed = ops_before - Counter(n.op_type for n in all_nodes(model))
            row = {"step": "fold_and_prune", "nodes_before": before, "nodes_after": after,
                   "removed": dict(sorted(removed.items()))}
            modified = self._timed(row, unfolded, serialize_loaded(model) if unfolded is not None else None, notes)
            if not modified:
                adopt(model, unfolded)
            rows.append(row)
        if self.options.onnxsim:
            row = self._onnxsim(model, notes)
            if row:
                rows.append(row)
                modified = modified or row["kept"]
        return self.result(model, rows, notes, modified=modified)

    def _timed(self, row: dict, without: onnx.ModelProto | None, candidate: onnx.ModelProto | None,
               notes: list[str]) -> bool:
        """Whether ``row``'s step is kept: not slower than the model ``without`` it (when the run times)."""
        row["kept"] = True
        if without is None or candidate is None:
            return True
        vs = self.context.latency.compare(without, candidate).vs_before
        row["latency_vs_without"], row["noise"] = round(vs.value, 4), round(vs.margin, 4)
        row["kept"] = not vs.slower
        notes.append(f"{row['step']} kept: {vs.describe()} against the model without it" if row["kept"]
                     else f"{row['step']} undone: slower than without it, {vs.describe()}")
        return row["kept"]

    def _onnxsim(self, model: ir.Model, notes: list[str]) -> dict | None:
        forms = compressed_forms(model)
        if forms:
            kinds = ", ".join(f"{n} {k}" for k, n in sorted(forms.items()))
            notes.append(f"onnxsim skipped: the model holds compressed weight forms it would fold ({kinds})")
            return None
        size_mb = tensor_bytes(model) / 1e6
        if size_mb > self.options.onnxsim_max_mb:
            notes.append(f"onnxsim skipped: {size_mb:.0f} MB of weights is above onnxsim_max_mb="
                         f"{self.options.onnxsim_max_mb:g}")
            return None
        before = count_nodes(model)
        try:
            import onnxsim

            proto = serialize_loaded(model)
            kwargs = {"check_n": 0}
            params = inspect.signature(onnxsim.simplify).parameters
            for key, value in (("certify", False), ("check_hazards", False)):
                if key in params:
                    kwargs[key] = value  # this onnxsim's optional proofs are slow and not needed here
            simplified, ok = onnxsim.simplify(proto, **kwargs)
        except Exception as err:  # noqa: BLE001 - onnxsim failing is reported, never fatal
            notes.append(f"onnxsim failed, its result not used: {' '.join(str(err).split())[:300]}")
            return None
        if not ok:
            notes.append("onnxsim could not validate its result; not used")
            return None
        same_io = ([i.name for i in simplified.graph.input] == [v.name for v in model.graph.inputs]
                   and [o.name for o in simplified.graph.output] == [v.name for v in model.graph.outputs])
        after = _proto_nodes(simplified)
        if not same_io:
            notes.append("onnxsim changed the model's inputs or outputs; its result not used")
            return None
        if after >= before:
            return None
        row = {"step": "onnxsim", "nodes_before": before, "nodes_after": after}
        if self.context.latency is not None:  # timed as it would be written: without onnxsim's inferred shapes
            simplified = drop_inferred_shapes(simplified, model)
            if not self._timed(row, serialize_loaded(model), simplified, notes):
                return row
        else:
            row["kept"] = True
            notes.append("onnxsim kept for its fewer nodes, not timed (the run does not time models)")
        metadata = dict(model.metadata_props)
        adopt(model, simplified)
        model.metadata_props.clear()
        model.metadata_props.update(metadata)  # onnxsim adds its own report keys; keep the user's only
        row["nodes_after"] = count_nodes(model)
        return row


def _proto_nodes(proto: onnx.ModelProto) -> int:
    def walk(graph: onnx.GraphProto) -> int:
        total = len(graph.node)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    total += walk(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    total += sum(walk(g) for g in attr.graphs)
        return total

    return walk(proto.graph)
