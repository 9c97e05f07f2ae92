"""Embedding tables as onnxruntime's com.microsoft.GatherBlockQuantized: the rows of a Gather's constant table
cut along the hidden axis into blocks, rounded to nearest (:mod:`.blocks`), kept packed in memory; the kernel
dequantizes only the rows it gathers.

A table is the constant float32 2-D ``data`` of a default-domain Gather on axis 0 (a word embedding [V, D]), owned
by that node (a table shared with an LM head stays float), not in a compressed form already (ARCHITECTURE.md rule 2),
with D a whole number of blocks. On a BERT-base encoder the word embedding is 94 MB of the 150 MB left after the
MatMuls went 4-bit, so MatMul weights alone cannot bring the session's memory far below float's.

Layout (onnxruntime 1.32's GatherBlockQuantized, uint8 data with ``bits``): codes [V, D·bits/8] packed along D, the
first in the lowest bits; scales [V, D/block_size]; zero points packed the same way per row (absent when
symmetric: the kernel's default 2^(bits-1), the convention of :mod:`.blocks`). Measured exact against
:meth:`.blocks.BlockQuant.dequantize` for bits 2/4/8, block sizes 16/32, with and without zero points.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from graphopt.graphs import all_nodes, attr, is_default_domain
from graphopt.passes.nbits.blocks import BlockQuant, pack, round_to_nearest
from graphopt.weights import constant_array, encoding_of, is_sparse_marked, owned_initializer, set_initializer

MS_DOMAIN = "com.microsoft"


@dataclasses.dataclass
class Table:
    """One embedding table: ``node`` gathers rows of ``array`` [V, D] (``weight``) by its indices."""

    node: ir.Node
    weight: ir.Value
    array: np.ndarray


def find_tables(model: ir.Model, exclude: set[str], min_size: int, block_size: int, bits: int,
                notes: list[str]) -> list[Table]:
    """Every Gather table the options allow; the passed-over ones said in notes."""
    tables = []
    for node in all_nodes(model):
        if node.op_type != "Gather" or not is_default_domain(node) or len(node.inputs) < 2:
            continue
        w = constant_array(node.inputs[0])
        if w is None or w.ndim != 2 or w.size < min_size or node.name in exclude or node.inputs[0].name in exclude:
            continue
        reason = None
        if w.dtype != np.float32:
            reason = f"table is {w.dtype}, not float32"
        elif attr(node, "axis", 0) != 0:
            reason = "Gather on axis 1 (columns, not rows)"
        elif owned_initializer(node, 0) is None:
            reason = f"table {node.inputs[0].name!r} is shared with other nodes"
        elif is_sparse_marked(node.inputs[0]) or encoding_of(node.inputs[0]) is not None:
            reason = "table is in a compressed form already"
        elif w.shape[1] % block_size or (w.shape[1] * bits) % 8:
            reason = f"row width {w.shape[1]} is not a whole number of {block_size}-wide blocks"
        if reason:
            notes.append(f"{node.name}: {reason}; stays as it is")
            continue
        tables.append(Table(node, node.inputs[0], w))
    return tables


def quantize_table(table: Table, bits: int, block_size: int, symmetric: bool, clip_search: bool) -> BlockQuant:
    """The table's rows in blocks along D: :func:`.blocks.round_to_nearest` of the transposed [D, V] weight."""
    return round_to_nearest(table.array.T.astype(np.float64), bits, block_size, symmetric, clip_search)


def emit_table(table: Table, quant: BlockQuant, mark) -> dict:
    """Replace the Gather by GatherBlockQuantized on ``quant``; returns the pass's row."""
    node, graph = table.node, table.node.graph
    v, d = table.array.shape
    base = table.weight.name or node.name
    arrays = {"q": pack(quant.codes.reshape(v, d), quant.bits), "scales": quant.scales}
    if quant.zero_points is not None:
        per = 8 // quant.bits
        padded = np.zeros((v, -(-quant.n_blocks // per) * per), np.uint8)
        padded[:, :quant.n_blocks] = quant.zero_points
        arrays["zero_points"] = pack(padded, quant.bits)
    inputs = [set_initializer(graph, f"{base}_q{quant.bits}", arrays["q"]), node.inputs[1],
              set_initializer(graph, f"{base}_scales", arrays["scales"])]
    if "zero_points" in arrays:
        inputs.append(set_initializer(graph, f"{base}_zero_points", arrays["zero_points"]))
    attrs = {"gather_axis": 0, "quantize_axis": 1, "block_size": quant.block_size, "bits": quant.bits}
    new = mark(ir.node("GatherBlockQuantized", inputs, attrs, domain=MS_DOMAIN, name=f"{node.name}_nbits"))
    ir.convenience.replace_nodes_and_values(graph, node, [node], [new], [node.outputs[0]], [new.outputs[0]])
    after = sum(a.nbytes for a in arrays.values())
    weight_graph = table.weight.graph
    if weight_graph is not None and not table.weight.uses() and not table.weight.is_graph_output() and \
            weight_graph.initializers.get(table.weight.name) is table.weight:
        weight_graph.initializers.pop(table.weight.name)
    error = float(np.linalg.norm(quant.dequantize().T - table.array) / max(np.linalg.norm(table.array), 1e-30))
    return {"layer": node.name, "op": "Gather", "weight": table.weight.name, "K": d, "N": v, "bits": quant.bits,
            "block_size": quant.block_size, "method": "rtn", "bytes_before": int(table.array.nbytes),
            "bytes_after": after, "rel_error": round(error, 5)}
