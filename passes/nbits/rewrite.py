"""Which layers can become MatMulNBits, and the rewrite itself.

A site is a default-domain MatMul whose B is a constant float32 2-D initializer and whose A is a float32
activation of rank >= 2 (or unknown rank), or a Gemm with transA=0, alpha=beta=1 (its C becomes an Add after the
MatMulNBits). The weight must be owned by that node: a weight read by several nodes (tied weights) stays as it is,
and so does one marked for sparse storage (a compressed form already, ARCHITECTURE.md rule 2). Each passed-over
weight is said in the notes.

The rewrite puts com.microsoft.MatMulNBits(A, B, scales[, zero_points]) in the node's place (K, N, bits,
block_size, accuracy_level attributes); its output takes over the old output's uses, name and graph-output slot,
and the float weight goes when nothing else reads it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from graphopt.graphs import all_nodes, attr, is_default_domain
from graphopt.passes.nbits.blocks import BlockQuant
from graphopt.weights import constant_array, is_sparse_marked, owned_initializer, set_initializer

MS_DOMAIN = "com.microsoft"


@dataclasses.dataclass
class Site:
    """One rewritable layer: y = A · W (+ C), W [K, N] as MatMulNBits reads it (a Gemm's transB undone)."""

    node: ir.Node
    weight: ir.Value
    array: np.ndarray
    bias: ir.Value | None = None  # a Gemm's C

    @property
    def layer(self) -> str:
        return self.node.name

    @property
    def k(self) -> int:
        return self.array.shape[0]

    @property
    def n(self) -> int:
        return self.array.shape[1]


def _reason(node: ir.Node) -> str | None:
    """Why a MatMul/Gemm with a constant B cannot be a site (None: it can, as far as its attributes go)."""
    a = node.inputs[0]
    if a is None or a.dtype not in (ir.DataType.FLOAT, None):
        return "A is not float32"
    if a.shape is not None and len(a.shape) < 2:
        return "A has rank < 2"
    if node.op_type == "Gemm":
        if attr(node, "transA", 0) or float(attr(node, "alpha", 1.0)) != 1.0 or float(attr(node, "beta", 1.0)) != 1.0:
            return "Gemm with transA, alpha or beta"
        if len(node.inputs) > 2 and node.inputs[2] is not None and constant_array(node.inputs[2]) is None:
            return "Gemm C is not a constant"
    return None


def find_sites(model: ir.Model, exclude: set[str], min_size: int, notes: list[str]) -> list[Site]:
    """Every rewritable MatMul/Gemm of the model (subgraphs too) the options allow; the others said in notes."""
    sites, small = [], 0
    for node in all_nodes(model):
        if node.op_type not in ("MatMul", "Gemm") or not is_default_domain(node) or len(node.inputs) < 2:
            continue
        w = constant_array(node.inputs[1])
        if w is None or w.ndim != 2 or node.name in exclude or node.inputs[1].name in exclude:
            continue
        if w.dtype != np.float32:
            notes.append(f"{node.name}: weight is {w.dtype}, not float32; stays as it is")
            continue
        reason = _reason(node)
        if reason is None and owned_initializer(node, 1) is None:
            reason = f"weight {node.inputs[1].name!r} is shared with other nodes"
        if reason is None and is_sparse_marked(node.inputs[1]):
            reason = "weight is marked for sparse storage (a compressed form)"
        if reason is not None:
            notes.append(f"{node.name}: {reason}; stays as it is")
            continue
        if w.size < min_size:
            small += 1
            continue
        transposed = node.op_type == "Gemm" and attr(node, "transB", 0)
        bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
        sites.append(Site(node, node.inputs[1], w.T if transposed else w, bias))
    if small:
        notes.append(f"{small} layer(s) below min_size weights stay float")
    return sites


def emit(site: Site, quant: BlockQuant, accuracy_level: int, mark) -> ir.Node:
    """Replace ``site``'s node by MatMulNBits (+ Add of a Gemm's C); returns the new MatMulNBits node."""
    node, graph = site.node, site.node.graph
    base = site.weight.name or node.name
    b, scales, zp = quant.packed()
    inputs = [node.inputs[0], set_initializer(graph, f"{base}_q{quant.bits}", b),
              set_initializer(graph, f"{base}_scales", scales)]
    if zp is not None:
        inputs.append(set_initializer(graph, f"{base}_zero_points", zp))
    attrs = {"K": site.k, "N": site.n, "bits": quant.bits, "block_size": quant.block_size,
             "accuracy_level": accuracy_level}
    new = mark(ir.node("MatMulNBits", inputs, attrs, domain=MS_DOMAIN, name=f"{node.name}_nbits"))
    added = [new]
    if site.bias is not None:
        add = mark(ir.node("Add", [new.outputs[0], site.bias], name=f"{node.name}_bias"))
        added.append(add)
    old_out, out = node.outputs[0], added[-1].outputs[0]
    if len(added) == 2:
        inner = new.outputs[0]
        inner.name, inner.type, inner.shape = f"{old_out.name}_nobias", old_out.type, old_out.shape
    ir.convenience.replace_nodes_and_values(graph, node, [node], added, [old_out], [out])
    weight_graph = site.weight.graph
    if weight_graph is not None and not site.weight.uses() and not site.weight.is_graph_output() and \
            weight_graph.initializers.get(site.weight.name) is site.weight:
        weight_graph.initializers.pop(site.weight.name)
    return new
