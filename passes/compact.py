"""compact: exact size trims of what a file holds beside its computation.

Once weights are a few kilobytes (codebook indices, int4), the rest of the file shows after lzma: exporters'
long value, initializer and node names (``/features/features.3/conv1/Conv_output_0``), intermediate shapes
(value_info), doc strings and per-node notes (graphopt's provenance marks, exporters' stack traces). Measured on
the digits pick of `graphopt auto` (lzma bytes of 15,664): names 564, provenance 60, the model's own doc string
and metadata 128.

Names are replaced by short ones, unique over the whole model; the main graph's inputs and outputs keep theirs
(they are the model's interface). onnx_ir links values by object, so If/Loop bodies that read an outer value
follow its new name. Optional outputs a node leaves out (empty names) stay out. Model-local functions are left
as they are. Weight storage is untouched: compressed forms and their marks (sparse storage) survive as they are.
"""

from __future__ import annotations

import dataclasses
import itertools
import uuid
from typing import Iterator

import onnx_ir as ir

from graphopt.graphs import all_graphs
from graphopt.modelio import WRITTEN_SHAPES
from graphopt.options import BaseOptions, option
from graphopt.passbase import GraphoptPass, GraphoptResult

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def short_names(taken: frozenset[str]) -> Iterator[str]:
    """a, b, …, z, ba, … (a leading letter: readable, never a number), skipping ``taken``."""
    for length in itertools.count(1):
        for first in ALPHABET[:26]:
            for rest in itertools.product(ALPHABET, repeat=length - 1):
                name = first + "".join(rest)
                if name not in taken:
                    yield name


class Compact(GraphoptPass):
    """Short internal names; no intermediate shapes, doc strings or node notes. Outputs are bit-identical."""

    name = "compact"
    summary = "exact size trims: short internal names, no intermediate shapes, doc strings or node notes"
    exact = True
    size_objective = True  # without declared shapes onnxruntime may fuse differently; the pass aims at size

    @dataclasses.dataclass(frozen=True)
    class Options(BaseOptions):
        names: bool = option(True, "short names for internal values, initializers and nodes (the main graph's "
                                   "inputs and outputs keep theirs)")
        shapes: bool = option(True, "drop the intermediate shapes (value_info) the file declares")
        notes: bool = option(True, "drop doc strings of nodes, graphs and values, and node metadata_props "
                                   "(provenance marks, exporters' stack traces)")
        model_notes: bool = option(False, "also drop the model's own doc string and metadata_props (its "
                                          "documentation, for example how inputs are normalized)")

    def call(self, model: ir.Model) -> GraphoptResult:
        opts = self.options
        graphs = all_graphs(model)
        rows: list[dict] = []
        if opts.names:
            rows += _rename(model, graphs)
        if opts.shapes:
            rows += _drop_shapes(model, graphs)
        if opts.notes:
            rows += _drop_notes(graphs)
        if opts.model_notes and (model.doc_string or model.metadata_props):
            rows.append({"what": "model doc string and metadata_props", "count": len(model.metadata_props)
                         + bool(model.doc_string)})
            model.doc_string = None
            model.metadata_props.clear()
        return self.result(model, rows)


def _values(graphs: list[ir.Graph]) -> list[ir.Value]:
    """Every value the graphs define, once, in file order (inputs, initializers, node outputs)."""
    seen: dict[int, ir.Value] = {}
    for graph in graphs:
        defined = [*graph.inputs, *graph.initializers.values(), *(v for node in graph for v in node.outputs)]
        for value in defined:
            seen.setdefault(id(value), value)
    return list(seen.values())


def _rename(model: ir.Model, graphs: list[ir.Graph]) -> list[dict]:
    interface = {id(v) for v in [*model.graph.inputs, *model.graph.outputs]}
    kept = frozenset(v.name for v in [*model.graph.inputs, *model.graph.outputs] if v.name)
    # optional outputs left out have no name: naming one would ask the node for it
    values = [v for v in _values(graphs) if v.name and id(v) not in interface]
    fresh = short_names(kept)
    new = {id(v): next(fresh) for v in values}
    changed = [v for v in values if v.name != new[id(v)]]
    old_to_new = {v.name: new[id(v)] for v in changed}
    # through unique temporaries: an initializer may not take a name another one still holds
    tag = uuid.uuid4().hex
    for i, value in enumerate(changed):
        value.name = f"{tag}{i}"
    for value in changed:
        value.name = new[id(value)]
    written = model.graph.meta.get(WRITTEN_SHAPES)
    if written is not None:  # the declared shapes follow their values
        model.graph.meta[WRITTEN_SHAPES] = frozenset(old_to_new.get(name, name) for name in written)
    nodes = [node for graph in graphs for node in graph]
    node_names = short_names(frozenset())
    renamed_nodes = 0
    for node in nodes:
        name = next(node_names)
        if node.name != name:
            node.name = name
            renamed_nodes += 1
    rows = []
    if changed:
        rows.append({"what": "value and initializer names", "count": len(changed)})
    if renamed_nodes:
        rows.append({"what": "node names", "count": renamed_nodes})
    return rows


def _drop_shapes(model: ir.Model, graphs: list[ir.Graph]) -> list[dict]:
    """Declared intermediate shapes are written only for the names in WRITTEN_SHAPES (modelio): none from now
    on. The values keep their shapes in memory for the passes after this one."""
    written = model.graph.meta.get(WRITTEN_SHAPES)
    if written is None:  # a model built in memory: every shape it holds would have been written
        count = sum(1 for g in graphs for node in g for v in node.outputs
                    if (v.type is not None or v.shape is not None) and not v.is_graph_output())
    else:
        count = len({v.name for v in _values(graphs) if v.name} & written)
    model.graph.meta[WRITTEN_SHAPES] = frozenset()
    return [{"what": "intermediate shapes (value_info)", "count": count}] if count else []


def _drop_notes(graphs: list[ir.Graph]) -> list[dict]:
    count = 0
    for graph in graphs:
        if graph.doc_string:
            graph.doc_string = None
            count += 1
        for node in graph:
            count += bool(node.doc_string) + len(node.metadata_props)
            node.doc_string = None
            node.metadata_props.clear()
        for value in _values([graph]):
            if value.doc_string:
                value.doc_string = None
                count += 1
    return [{"what": "doc strings and node metadata_props", "count": count}] if count else []
