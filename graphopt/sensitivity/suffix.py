"""Evaluate an edited clone by running only the part the edit changed (for :mod:`graphopt.sensitivity`).

A sensitivity candidate edits a few nodes of a clone. Every node upstream of the edit computes what the
unedited model computes, so only the "dirty" nodes (new or rewired nodes, and everything downstream of them)
need to run per candidate. :func:`prepare` snapshots the clone before ``apply``, finds the dirty nodes after,
and cuts the clone down to them: the values they read from clean nodes (the frontier) become graph inputs.
:class:`FrontierCache` captures those values once per chunk of candidates on the unedited model, and
:func:`evaluate` runs the suffix on them and fills in the model outputs the edit cannot reach from the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import onnx_ir as ir

from graphopt import capture, metrics
from graphopt.runtime import make_session


@dataclass
class Suffix:
    model: ir.Model  # the cut clone: dirty nodes only; frontier values and used graph inputs as inputs
    frontier: list[str]  # values captured on the unedited model and fed to the suffix
    feeds: list[str]  # original graph inputs the suffix reads from the feed
    outputs: list[str]  # evaluator outputs the suffix computes
    clean_outputs: list[str]  # evaluator outputs the edit cannot reach (taken from the unedited model)
    seconds: float = 0.0  # time spent preparing it


def _snapshot(node: ir.Node) -> tuple:
    ins = tuple((id(v), id(v.const_value) if v is not None else 0) for v in node.inputs)
    attrs = tuple((k, id(a), id(a.value)) for k, a in node.attributes.items())
    return ins, attrs, node.op_type, node.domain


def prepare(model: ir.Model, apply: Callable[[ir.Model], None], output_names: Sequence[str]) -> Suffix | None:
    """Clone ``model``, apply the edit, and cut the clone to its edited suffix (None: run the whole clone).

    Raises whatever ``apply`` raises (the caller turns it into an error row)."""
    clone = model.clone()
    graph = clone.graph
    before = {n: _snapshot(n) for n in graph}  # keyed by the node itself: ids of removed nodes can be reused
    outputs_before = [id(v) for v in graph.outputs]
    apply(clone)
    if [id(v) for v in graph.outputs] != outputs_before or any(True for _ in graph.subgraphs()):
        return None
    dirty: set[ir.Node] = set()
    for node in graph:  # graph order is topological: a consumer comes after its producers
        if before.get(node) != _snapshot(node) or any(
                v is not None and v.producer() in dirty for v in node.inputs):
            dirty.add(node)
    if not dirty:
        return None
    frontier: dict[str, ir.Value] = {}
    feeds: list[str] = []
    for node in graph:
        if node not in dirty:
            continue
        for v in node.inputs:
            if v is None or v.is_initializer():
                continue
            if v.is_graph_input():
                if v.name not in feeds:
                    feeds.append(v.name)
            elif v.producer() not in dirty:
                if not v.name:
                    return None
                frontier[v.name] = v
    by_name = {v.name: v for v in graph.outputs}
    outputs = [n for n in output_names if n in by_name and by_name[n].producer() in dirty]
    clean = [n for n in output_names if n not in outputs]
    if any(n not in by_name for n in output_names):
        return None
    # Cut: frontier values become fresh graph inputs, clean nodes and unused initializers go.
    new_inputs = [v for v in graph.inputs if v.name in feeds]
    for name, v in frontier.items():
        fresh = ir.Value(name=name, type=v.type, shape=None)
        v.name = f"{name}__clean"
        for use in list(v.uses()):
            if use.node in dirty:
                use.node.replace_input_with(use.idx, fresh)
        new_inputs.append(fresh)
    graph.outputs[:] = [by_name[n] for n in outputs]
    graph.remove([n for n in graph if n not in dirty], safe=False)
    graph.inputs[:] = new_inputs
    for name in [k for k, v in graph.initializers.items() if not v.uses() and not v.is_graph_output()]:
        graph.initializers.pop(name)
    return Suffix(clone, list(frontier), feeds, outputs, clean)


class FrontierCache:
    """Per-feed values of the unedited model, captured once for a chunk of candidates."""

    def __init__(self, model: ir.Model, feeds: list[dict[str, np.ndarray]], threads: int) -> None:
        self.model, self.feeds, self.threads = model, feeds, threads
        self.values: list[dict[str, np.ndarray]] = [{} for _ in feeds]
        self.nbytes = 0

    def fill(self, names: Sequence[str]) -> None:
        missing = [n for n in dict.fromkeys(names) if n not in self.values[0]]
        if not missing:
            return
        runner = capture.Runner(self.model, missing, self.threads)
        for store, feed in zip(self.values, self.feeds):
            got = runner(feed)
            for n in missing:
                store[n] = got[n]
                self.nbytes += got[n].nbytes

    def clear(self) -> None:
        self.values = [{} for _ in self.feeds]
        self.nbytes = 0


def evaluate(suffix: Suffix, cache: FrontierCache, evaluator: metrics.Evaluator) -> metrics.Comparison:
    """The candidate's comparison with the reference, as ``evaluator.evaluate(whole clone)`` would give it."""
    first = cache.values[0] if cache.values else {}
    for value in suffix.model.graph.inputs:  # untyped frontier values: the captured arrays say what they are
        if value.type is None and value.name in first:
            value.type = ir.TensorType(ir.DataType.from_numpy(first[value.name].dtype))
    session = make_session(suffix.model, threads=evaluator.threads)
    acc = metrics.Accumulator(evaluator.output_names, evaluator.score_output, evaluator.map_threshold)
    for i, feed in enumerate(evaluator.feeds):
        store = cache.values[i]
        inputs = {n: store[n] for n in suffix.frontier}
        inputs.update({n: feed[n] for n in suffix.feeds})
        got = dict(zip(suffix.outputs, session.run(suffix.outputs, inputs))) if suffix.outputs else {}
        outs = [got[n] if n in got else store[n] for n in evaluator.output_names]
        acc.add(evaluator.reference_outputs[i], outs, evaluator.labels[i])
    return acc.result()
