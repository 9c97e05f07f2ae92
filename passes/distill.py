"""distill: closed-form, training-free teacher–student refit of chosen linear layers (ridge least squares).

The original model (the pass context's teacher) is the teacher, the current model the student. For each
chosen Gemm/MatMul/Conv (groups=1) layer of the student, X = the layer's input in the student and Y = the
teacher's value of the same name as the layer's output; W, b = argmin ||XW + b − Y||² + λ·||W||² (see
graphopt.refit). The fit works on raw tensors, so any output type is fine: logits, regression values,
detection or segmentation maps.

Layers: ``layers=last`` (default) takes, for each graph output, the last linear layers before it: walking
back from the output through elementwise ops (activations, Add/Mul/…, Dropout, Identity, Cast), Softmax/
LogSoftmax, shape ops (Reshape, Flatten, Transpose, Squeeze, Unsqueeze) and Concat; of the Convs found only
1×1 ones are taken (name a k×k Conv explicitly to refit it). Or a list of node names (any supported layer).
When the teacher has no value of the layer's output name, the teacher's graph output that the layer feeds
through Identity/Dropout (Gemm/MatMul also Reshape/Flatten/Squeeze/Unsqueeze) is used; else the layer is
skipped with a note. Layers whose weights are encoded (codebook, int8) are skipped: run distill before
kmeans/quantize. A pruned layer keeps its zeros (mask = weight != 0). A layer is written only when the refit
lowers its calibration error (graphopt.refit.refit_layer). Chosen layers that feed one another are refit in
order, upstream first, each on activations captured after the previous refit.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from graphopt.errors import DataError, GraphoptError
from graphopt.linear import LinearLayer, as_linear
from graphopt.options import BaseOptions, option
from graphopt.passbase import GraphoptPass, GraphoptResult
from graphopt.weights import all_nodes, encoding_of

LAST = "last"
_LINEAR = ("Gemm", "MatMul", "Conv")
_ELEMENTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "Where",
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish",
    "Softplus", "Softsign", "Gelu", "Mish", "Clip", "Exp", "Log", "Neg", "Abs", "Sqrt", "Erf",
    "Dropout", "Identity", "Cast", "Softmax", "LogSoftmax", "Concat"})
_SHAPE = frozenset({"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze"})  # data is input 0
_IDENTITY = frozenset({"Identity", "Dropout"})
_ROW_SHAPE = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})  # keep a Gemm's rows of d_out values


def _is_const(value: ir.Value | None) -> bool:
    return value is None or value.is_initializer() or ir.convenience.get_const_tensor(value) is not None


def last_linear_nodes(graph: ir.Graph) -> list[ir.Node]:
    """Gemm/MatMul/Conv nodes whose output reaches a graph output through elementwise/shape ops only."""
    found: list[ir.Node] = []
    seen: set[int] = set()
    stack = [v for v in graph.outputs]
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        node = value.producer()
        if node is None or node.graph is not graph or node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in _LINEAR:
            if node not in found:
                found.append(node)
        elif node.op_type in _SHAPE:
            stack.append(node.inputs[0])
        elif node.op_type in _ELEMENTWISE:
            stack.extend(v for v in node.inputs if not _is_const(v))
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


class Distill(GraphoptPass):
    """Refit chosen linear layers of the current model so their outputs match the original model's."""

    name = "distill"
    summary = "training-free distillation: ridge-refit the last (or named) linear layers to the teacher's outputs"
    needs_data = True

    @dataclasses.dataclass(frozen=True)
    class Options(BaseOptions):
        layers: list[str] = option([LAST], "node names of the Gemm/MatMul/Conv layers to refit, or 'last': the "
                                           "last linear layer(s) before each graph output")
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
        layers = self._choose(model, notes)
        teacher_values = {o.name: o for n in teacher.graph for o in n.outputs}
        teacher_values.update({v.name: v for v in teacher.graph.inputs})
        teacher_outputs = {v.name for v in teacher.graph.outputs}
        targets: dict[str, str] = {}
        usable = []
        for layer in layers:
            name = layer.output.name
            if name not in teacher_values:
                name = _graph_output_through_identity(layer)
                if name is None or name not in teacher_outputs:
                    notes.append(f"{layer.name}: the teacher has no value {layer.output.name!r} and the layer does "
                                 "not feed a graph output unchanged; skipped")
                    continue
            if not self._shape_fits(layer, teacher_values.get(name)):
                notes.append(f"{layer.name}: the teacher's {name!r} has another shape than the layer's output "
                             f"({layer.d_out} channels); skipped")
                continue
            targets[layer.name] = name
            usable.append(layer)
        rows = []
        for batch in _rounds(usable):
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

    def _choose(self, model: ir.Model, notes: list[str]) -> list[LinearLayer]:
        wanted = list(dict.fromkeys(self.options.layers))
        nodes: list[ir.Node] = []
        if LAST in wanted:
            for node in last_linear_nodes(model.graph):
                w = node.inputs[1] if len(node.inputs) > 1 else None
                if node.op_type == "Conv" and w is not None and w.shape is not None and \
                        any(d != 1 for d in list(w.shape)[2:]):
                    notes.append(f"{node.name}: last layer is a k×k Conv; name it in layers= to refit it")
                    continue
                nodes.append(node)
        names = [n for n in wanted if n != LAST]
        if names:
            by_name = {node.name: node for node in all_nodes(model) if node.name}
            missing = [n for n in names if n not in by_name]
            if missing:
                raise GraphoptError(f"pass 'distill': layers names no node: {', '.join(missing)}")
            nodes += [by_name[n] for n in names if by_name[n] not in nodes]
        layers = []
        for node in nodes:
            layer = as_linear(node)
            weight = node.inputs[1] if len(node.inputs) > 1 else None
            if layer is None:
                kind = encoding_of(weight)
                why = (f"weight is {kind}-encoded; run distill before kmeans/quantize" if kind else
                       "not a Gemm/MatMul/Conv (groups=1) with a constant float weight")
                notes.append(f"{node.name}: {why}; skipped")
            elif node.graph is not model.graph:
                notes.append(f"{node.name}: inside a subgraph (its activations cannot be captured); skipped")
            else:
                layers.append(layer)
        if not layers and not notes:
            notes.append("no linear layer found before the graph outputs")
        return layers

    @staticmethod
    def _shape_fits(layer: LinearLayer, value: ir.Value | None) -> bool:
        """False only when the teacher's value is known to have another channel count."""
        if value is None or value.shape is None or len(value.shape) == 0:
            return True
        dim = value.shape[1 if layer.kind == "conv" else -1]
        return not isinstance(dim, int) or dim == layer.d_out

    def _refit(self, layer: LinearLayer, moments, target: str) -> dict:
        from graphopt.refit import refit_layer

        w = layer.matrix()
        zeros = int(np.count_nonzero(w == 0))
        fit = refit_layer(layer, moments, lam=self.options.ridge, mask=(w != 0) if zeros else None)
        return {"layer": layer.name, "op": layer.node.op_type, "target": target, "rows": fit.rows,
                "params": int(w.size), "kept_zeros": zeros,
                "rel_error_before": float(f"{fit.error_before:.4g}"),
                "rel_error": float(f"{min(fit.error_after, fit.error_before):.4g}"), "changed": fit.changed}


def layer_moments_for(pass_: Distill, model: ir.Model, layers: list[LinearLayer], calib, targets: dict[str, str],
                      teacher: ir.Model):
    from graphopt.capture import layer_moments

    return layer_moments(model, layers, calib, targets={layer.name: targets[layer.name] for layer in layers},
                         target_model=teacher, threads=pass_.context.threads, max_samples=pass_.options.max_samples,
                         progress=pass_.context.progress)
