"""distill: closed-form, training-free teacher–student refit of chosen linear layers (ridge least squares).

The original model (the pass context's teacher) is the teacher, the current model the student. For each
chosen Gemm/MatMul/Conv (groups=1) layer of the student, X = the layer's input in the student and Y = the
teacher's value of the same name as the layer's output; W, b = argmin ||XW + b − Y||² + λ·||W||² (see
graphopt.refit). The fit works on raw tensors, so any output type is fine: logits, regression values,
detection or segmentation maps.

Layers: ``layers=last`` (default) takes, for each graph output, the nearest refittable layers before it:
walking back from the output over producers through ANY ops (breadth first over non-constant inputs), each
path stops at the first Gemm/MatMul/Conv (any kernel size) that can be refit — a float constant weight (Conv:
groups=1) in the main graph whose output the teacher also has (below) with the same channel count. A layer
that cannot be refit (e.g. its output was shrunk by channel_prune, a depthwise Conv, an encoded weight) is
walked past to the layers before it, with a note. So a classifier gets its last Gemm, and a segmentation head
ending in ConvTranspose → Sigmoid gets the Conv before the ConvTranspose layers. Or a list of node names.
Target: the teacher's value of the layer's output name; when the teacher has none, the teacher's graph output
that the layer feeds through Identity/Dropout (Gemm/MatMul also Reshape/Flatten/Squeeze/Unsqueeze); else
the layer is skipped. Layers whose weights are encoded (codebook, int8) are skipped: run distill before
kmeans/quantize. A pruned layer keeps its zeros (mask = weight != 0). A layer is written only when the refit
lowers its calibration error (graphopt.refit.refit_layer). Chosen layers that feed one another are refit in
order, upstream first, each on activations captured after the previous refit.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Callable

import numpy as np
import onnx_ir as ir

from graphopt.capture import layer_moments
from graphopt.costs import value_dims
from graphopt.errors import DataError, GraphoptError
from graphopt.linear import LinearLayer, as_linear
from graphopt.options import BaseOptions, option
from graphopt.passbase import GraphoptPass, GraphoptResult
from graphopt.refit import refit_layer
from graphopt.graphs import all_nodes, is_default_domain
from graphopt.weights import encoding_of, is_constant

LAST = "last"
_LINEAR = ("Gemm", "MatMul", "Conv")
_IDENTITY = frozenset({"Identity", "Dropout"})
_ROW_SHAPE = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})  # keep a Gemm's rows of d_out values
_MAX_NOTED = 6  # walked-past layers named in the notes; the rest are counted


def _is_const(value: ir.Value | None) -> bool:
    return value is None or is_constant(value)


def last_linear_nodes(graph: ir.Graph, refuse: Callable[[ir.Node], str | None] | None = None,
                      passed: list[tuple[ir.Node, str]] | None = None) -> list[ir.Node]:
    """The nearest Gemm/MatMul/Conv nodes before each graph output, walking back through any ops.

    Breadth first over producers (non-constant inputs only, main graph only); each path stops at the first
    linear node that ``refuse`` accepts (returns None). A refused one is appended with its reason to ``passed``
    and walked past through its data input (a MatMul also through a non-constant right side)."""
    found: list[ir.Node] = []
    seen: set[int] = set()
    queue = deque(graph.outputs)
    while queue:
        value = queue.popleft()
        node = value.producer()
        if node is None or id(node) in seen or node.graph is not graph:
            continue
        seen.add(id(node))
        if node.op_type in _LINEAR and is_default_domain(node):
            why = refuse(node) if refuse is not None else None
            if why is None:
                found.append(node)
                continue
            if passed is not None:
                passed.append((node, why))
            data = node.inputs[:2] if node.op_type == "MatMul" else node.inputs[:1]
        else:
            data = node.inputs
        queue.extend(v for v in data if not _is_const(v))
    return found


def _graph_output_through_identity(layer: LinearLayer) -> str | None:
    """Name of the graph output that ``layer`` feeds through ops that leave its values as they are."""
    allowed = _IDENTITY | (_ROW_SHAPE if layer.kind != "conv" else frozenset())
    value = layer.output
    while not value.is_graph_output():
        uses = list(value.uses())
        if len(uses) != 1 or uses[0].idx != 0 or uses[0].node.op_type not in allowed:
            return None
        value = uses[0].node.outputs[0]
    return value.name


def _upstream(node: ir.Node) -> set[int]:
    """ids of every node that ``node`` depends on (main-graph producers, transitively)."""
    seen: set[int] = set()
    stack = [v for v in node.inputs if v is not None]
    while stack:
        producer = stack.pop().producer()
        if producer is None or id(producer) in seen:
            continue
        seen.add(id(producer))
        stack.extend(v for v in producer.inputs if v is not None)
    return seen


def _rounds(layers: list[LinearLayer]) -> list[list[LinearLayer]]:
    """Batches of layers no one of which feeds another; earlier batches feed later ones."""
    ups = {id(layer.node): _upstream(layer.node) for layer in layers}
    left, rounds = list(layers), []
    while left:
        ready = [a for a in left if not any(id(b.node) in ups[id(a.node)] for b in left if b is not a)]
        rounds.append(ready)
        left = [a for a in left if a not in ready]
    return rounds


def _refittable(model: ir.Model, node: ir.Node) -> tuple[LinearLayer | None, str]:
    """The node as a refittable layer, or None and why not."""
    layer = as_linear(node)
    if layer is None:
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        kind = encoding_of(weight)
        return None, (f"weight is {kind}-encoded; run distill before kmeans/quantize" if kind else
                      "not a Gemm/MatMul/Conv (groups=1) with a constant float weight")
    if node.graph is not model.graph:
        return None, "inside a subgraph (its activations cannot be captured)"
    return layer, ""


class _Teacher:
    """The teacher's values by name, and their channel counts (inferred once, weight-less, when missing)."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.values = {o.name: o for n in model.graph for o in n.outputs}
        self.values.update({v.name: v for v in model.graph.inputs})
        self.outputs = {v.name for v in model.graph.outputs}
        self._inferred: dict[str, tuple] | None = None

    def _dims(self, name: str) -> tuple | None:
        value = self.values.get(name)
        if value is not None and value.shape is not None and len(value.shape) > 0:
            return tuple(d if isinstance(d, int) else None for d in value.shape)
        if self._inferred is None:
            try:
                self._inferred = value_dims(self.model)
            except Exception:  # noqa: BLE001 - shapes are a check here; the capture still verifies them
                self._inferred = {}
        dims = self._inferred.get(name)
        return tuple(dims) if dims else None

    def target(self, layer: LinearLayer) -> tuple[str | None, str]:
        """The teacher value ``layer`` is refit to, or None and why there is none."""
        name = layer.output.name
        if name not in self.values:
            name = _graph_output_through_identity(layer)
            if name is None or name not in self.outputs:
                return None, (f"the teacher has no value {layer.output.name!r} and the layer does not feed a graph "
                              "output unchanged")
        dims = self._dims(name)
        channels = None if dims is None else dims[1 if layer.kind == "conv" and len(dims) > 1 else -1]
        if channels is not None and channels != layer.d_out:
            return None, f"the teacher's {name!r} has {channels} channels, the layer {layer.d_out} (pruned?)"
        return name, ""


class Distill(GraphoptPass):
    """Refit chosen linear layers of the current model so their outputs match the original model's."""

    name = "distill"
    summary = "training-free distillation: ridge-refit the last (or named) linear layers to the teacher's outputs"
    data_required = True

    @dataclasses.dataclass(frozen=True)
    class Options(BaseOptions):
        layers: list[str] = option([LAST], "node names of the Gemm/MatMul/Conv layers to refit, or 'last': the "
                                           "nearest refittable linear layer(s) before each graph output")
        ridge: float = option(1e-4, "ridge λ (relative to the mean input energy of the layer)", low=0.0)
        max_samples: int = option(256, "calibration samples captured", low=1)

        def check(self) -> None:
            if not self.layers:
                raise ValueError("option layers is empty: give node names or 'last'")

    def call(self, model: ir.Model) -> GraphoptResult:
        calib = self.context.require_calib(self.name)
        teacher = self.context.teacher
        if teacher is None:
            raise GraphoptError("pass 'distill' needs the original model as teacher (run it through "
                                "graphopt.optimize, or give PassContext(teacher=...))")
        notes: list[str] = []
        chosen = self._choose(model, _Teacher(teacher), notes)
        targets = {layer.name: target for layer, target in chosen}
        rows = []
        for batch in _rounds([layer for layer, _ in chosen]):
            try:
                moments = layer_moments_for(self, model, batch, calib, targets, teacher)
            except DataError as err:
                notes.append(f"{', '.join(layer.name for layer in batch)}: capture failed: {err}; skipped")
                continue
            for layer in batch:
                rows.append(self._refit(layer, moments[layer.name], targets[layer.name]))
        changed = [r for r in rows if r["changed"]]
        if rows:
            notes.append(f"{len(changed)} of {len(rows)} layer(s) refit to the teacher; the others kept (the refit "
                         "would not lower their calibration error)" if len(changed) < len(rows) else
                         f"{len(changed)} layer(s) refit to the teacher")
        return self.result(model, rows, notes, modified=bool(changed))

    def _choose(self, model: ir.Model, teacher: _Teacher, notes: list[str]) -> list[tuple[LinearLayer, str]]:
        """(layer, teacher value name) pairs to refit: the nearest ones before the outputs and/or named ones."""
        wanted = list(dict.fromkeys(self.options.layers))
        picked: list[tuple[LinearLayer, str]] = []
        if LAST in wanted:
            chosen: dict[int, tuple[LinearLayer, str]] = {}

            def refuse(node: ir.Node) -> str | None:
                layer, why = _refittable(model, node)
                target, why = (None, why) if layer is None else teacher.target(layer)
                if layer is not None and target is not None:
                    chosen[id(node)] = (layer, target)
                    return None
                return why

            passed: list[tuple[ir.Node, str]] = []
            picked = [chosen[id(node)] for node in last_linear_nodes(model.graph, refuse, passed)]
            if passed:
                named = "; ".join(f"{node.name or node.outputs[0].name}: {why}" for node, why in passed[:_MAX_NOTED])
                more = f" ({len(passed) - _MAX_NOTED} more not named)" if len(passed) > _MAX_NOTED else ""
                notes.append(f"walked past {len(passed)} layer(s) that cannot be refit{more}: {named}")
            if not picked:
                notes.append("no refittable linear layer found before the graph outputs")
        names = [n for n in wanted if n != LAST]
        if names:
            by_name = {node.name: node for node in all_nodes(model) if node.name}
            missing = [n for n in names if n not in by_name]
            if missing:
                raise GraphoptError(f"pass 'distill': layers names no node: {', '.join(missing)}")
            for name in names:
                node = by_name[name]
                if any(layer.node is node for layer, _ in picked):
                    continue
                layer, why = _refittable(model, node)
                target, why = (None, why) if layer is None else teacher.target(layer)
                if layer is None or target is None:
                    notes.append(f"{name}: {why}; skipped")
                else:
                    picked.append((layer, target))
        return picked

    def _refit(self, layer: LinearLayer, moments, target: str) -> dict:
        w = layer.matrix()
        zeros = int(np.count_nonzero(w == 0))
        fit = refit_layer(layer, moments, lam=self.options.ridge, mask=(w != 0) if zeros else None)
        return {"layer": layer.name, "op": layer.node.op_type, "target": target, "rows": fit.rows,
                "params": int(w.size), "kept_zeros": zeros,
                "rel_error_before": float(f"{fit.error_before:.4g}"),
                "rel_error": float(f"{min(fit.error_after, fit.error_before):.4g}"), "changed": fit.changed,
                **({"reason": fit.reason} if fit.reason else {})}


def layer_moments_for(pass_: Distill, model: ir.Model, layers: list[LinearLayer], calib, targets: dict[str, str],
                      teacher: ir.Model):
    return layer_moments(model, layers, calib, targets={layer.name: targets[layer.name] for layer in layers},
                         target_model=teacher, threads=pass_.context.threads, max_samples=pass_.options.max_samples,
                         progress=pass_.context.progress)
