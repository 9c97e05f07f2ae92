"""gap: global average pooling — exact rewrites, and the Flatten→Gemm head substitution (Network in Network).

Exact (always):
- ReduceMean over exactly the spatial axes 2..r-1 of a float input of known rank (axes as attribute before
  opset 18 or as a constant input from 18; negative axes and any order) → GlobalAveragePool, followed by
  Flatten(axis=1) when keepdims=0 ([N, C, 1, …] → [N, C], the ReduceMean's shape).
- AveragePool whose window is the whole (statically known) feature map, no padding, no dilation →
  GlobalAveragePool (the output is [N, C, 1, …] either way).
The two kernels sum in different orders: equal within float rounding, not bit for bit.

Head substitution (``head=true``): X [N, C, *S] → Flatten/Reshape → Gemm/MatMul over the C·ΠS features
becomes X → GlobalAveragePool → Flatten → Gemm with W'[o, c] = Σ_s W[o, c, s] = ΠS · mean_s W[o, c, s].
Exact when X is spatially uniform (x[c, s] = mean_s x[c, s]), approximate otherwise.

``through=K`` also swallows the K fully connected layers after the first (each reached through single-use
elementwise activations/Dropout/Identity only): ``through=0`` replaces the first Gemm alone; ``through=1``
the first and the second — one GAP→Gemm whose output stands in for the second layer's output; ``through=2``
the first three (VGG's fc6, fc7, fc8). The activations between them vanish: the replaced stack becomes one
linear map. Without data its weights are the composition of the averaged first layer with the later layers
as if those activations were identity (rough); with calibration data and ``refit=true`` the new Gemm is fit
by ridge least squares to the teacher's value of the last replaced layer's output (X = GAP features of the
current model), and kept only where that lowers the calibration error.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from graphopt.capture import layer_moments
from graphopt.errors import DataError
from graphopt.graphs import all_graphs, attr as _attr, infer_shapes, is_default_domain
from graphopt.linear import LinearLayer, as_linear
from graphopt.options import BaseOptions, option
from graphopt.passbase import GraphoptPass, GraphoptResult
from graphopt.refit import refit_layer
from graphopt.weights import constant_array, encoding_of, set_initializer

_FLOATS = (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16)
# Single-input elementwise ops that may sit between the fully connected layers that through=K swallows.
_BETWEEN = frozenset({"Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "HardSigmoid",
                      "HardSwish", "Softplus", "Softsign", "Gelu", "Mish", "Clip", "Dropout", "Identity"})


def _dims(value: ir.Value | None) -> list | None:
    """Dims of the value's shape (ints, or None for unknown/symbolic), or None if the rank is unknown."""
    if value is None or value.shape is None:
        return None
    return [d if isinstance(d, int) else None for d in value.shape]


def _const_ints(value: ir.Value | None) -> list[int] | None:
    array = constant_array(value, nodes=True)
    return None if array is None else [int(v) for v in array.reshape(-1)]


def _is_float(value: ir.Value) -> bool:
    return value.dtype in _FLOATS


def _take_over(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """``new`` replaces ``old`` everywhere (graph outputs included) and takes its name, type and shape."""
    new.type, new.shape = old.type, old.shape
    name = old.name
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    old.name = f"{name}_replaced"
    new.name = name


def _drop_unused(graph: ir.Graph, values: list[ir.Value | None]) -> None:
    """Remove initializers (and Constant nodes) among ``values`` that nothing uses any more."""
    for value in values:
        if value is None or value.uses() or value.is_graph_output():
            continue
        if value.is_initializer() and value.name in graph.initializers:
            graph.initializers.pop(value.name)
        producer = value.producer()
        if producer is not None and producer.op_type == "Constant" and producer.graph is graph:
            graph.remove(producer, safe=True)


# --- exact rewrites ------------------------------------------------------------------------------------


def _reduce_mean_plan(node: ir.Node) -> bool | None:
    """keepdims if this ReduceMean averages exactly the spatial axes of a float input, else None."""
    x = node.inputs[0]
    dims = _dims(x)
    if x is None or dims is None or len(dims) < 3 or not _is_float(x):
        return None
    axes_attr = node.attributes.get("axes")
    axes = list(axes_attr.value) if axes_attr is not None else (
        _const_ints(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None)
    if not axes:  # no axes: every axis (or nothing with noop_with_empty_axes)
        return None
    rank = len(dims)
    norm = [a + rank if a < 0 else a for a in axes]
    if len(set(norm)) != len(norm) or set(norm) != set(range(2, rank)):
        return None
    return bool(_attr(node, "keepdims", 1))


def _avgpool_full_window(node: ir.Node) -> bool:
    x = node.inputs[0]
    dims = _dims(x)
    if x is None or dims is None or len(dims) < 3 or not _is_float(x):
        return False
    spatial, n = dims[2:], len(dims) - 2
    kernel = list(_attr(node, "kernel_shape", []))
    strides = list(_attr(node, "strides", [1] * n))
    if any(d is None for d in spatial) or len(kernel) != n or any(d != 1 for d in _attr(node, "dilations", [1])):
        return False
    auto_pad = _attr(node, "auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):  # one output step iff stride >= size; pads = k - size
        if any(s < d or k < d for s, k, d in zip(strides, kernel, spatial)):
            return False
        extra = [k - d for k, d in zip(kernel, spatial)]
        begins = [e // 2 if auto_pad == "SAME_UPPER" else e - e // 2 for e in extra]
        pads = begins + [e - b for e, b in zip(extra, begins)]
    elif auto_pad == "VALID":
        pads = [0] * (2 * n)
    else:
        pads = list(_attr(node, "pads", [0] * (2 * n)))
    ceil = bool(_attr(node, "ceil_mode", 0))
    for i, (d, k, s) in enumerate(zip(spatial, kernel, strides)):
        room = d + pads[i] + pads[i + n] - k  # one output position: 0 <= room < stride (ceil mode: room == 0)
        if room < 0 or (room > 0 if ceil else room >= s) or k - pads[i] < d:  # the window must cover the map
            return False
    # Padding cells count in the divisor unless count_include_pad=0; then the mean is over the map alone.
    return not any(pads) or not _attr(node, "count_include_pad", 0)


def _exact_rewrites(pass_: Gap, graph: ir.Graph, rows: list[dict]) -> None:
    for node in list(graph):
        if not is_default_domain(node):
            continue
        if node.op_type == "ReduceMean":
            keepdims = _reduce_mean_plan(node)
            if keepdims is None:
                continue
        elif node.op_type == "AveragePool" and _avgpool_full_window(node):
            keepdims = True
        else:
            continue
        base = node.name or node.outputs[0].name
        gap = pass_.mark(ir.Node("", "GlobalAveragePool", [node.inputs[0]], name=f"{base}_gap"))
        new = [gap]
        out = gap.outputs[0]
        if not keepdims:
            out.name = f"{base}_gap_out"
            flat = pass_.mark(ir.Node("", "Flatten", [out], attributes=[ir.AttrInt64("axis", 1)],
                                      name=f"{base}_flatten"))
            new.append(flat)
            out = flat.outputs[0]
        graph.insert_before(node, new)
        old_inputs = list(node.inputs)
        _take_over(graph, node.outputs[0], out)
        graph.remove(node, safe=True)
        _drop_unused(graph, old_inputs[1:])
        rows.append({"rewrite": f"{node.op_type}→GlobalAveragePool" + ("" if keepdims else "+Flatten"),
                     "node": node.name, "exact": True})


# --- head substitution -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Head:
    source: ir.Value  # X [N, C, *S]
    flatten: ir.Node  # the Flatten/Reshape to [N, C·ΠS]
    layers: list[LinearLayer]  # the first layer, then the ones `through` swallows
    between: list[ir.Node]  # activations between them (they vanish)
    channels: int
    spatial: tuple[int, ...]

    def nodes(self) -> list[ir.Node]:
        out = [self.flatten, *self.between]
        for layer in self.layers:
            out += [layer.node] + ([layer.bias_node] if layer.bias_node is not None else [])
        return out

    def params(self) -> int:
        return sum(layer.d_in * layer.d_out + (layer.d_out if layer.bias is not None else 0)
                   for layer in self.layers)


def _flattens_to_features(node: ir.Node, dims: list) -> bool:
    """Flatten(axis=1) or Reshape to [N, C·ΠS] of an input with dims ``dims``."""
    features = int(np.prod(dims[1:]))
    if node.op_type == "Flatten":
        axis = int(_attr(node, "axis", 1))
        return axis in (1, 1 - len(dims))
    shape = _const_ints(node.inputs[1]) if len(node.inputs) > 1 else None
    if shape is None or len(shape) != 2 or (0 in shape and _attr(node, "allowzero", 0)):
        return False
    first, second = shape
    if second not in (-1, features):
        return False
    return first == 0 or (first == -1 and second == features) or (dims[0] is not None and first == dims[0])


def _next_layer(layer: LinearLayer) -> tuple[list[ir.Node], LinearLayer] | None:
    """The fully connected layer fed by ``layer`` through single-use elementwise ops only."""
    value, between = layer.output, []
    while True:
        uses = list(value.uses())
        if value.is_graph_output() or len(uses) != 1 or uses[0].idx != 0:
            return None
        node = uses[0].node
        if not is_default_domain(node):
            return None
        if node.op_type in _BETWEEN and all(not o.uses() and not o.is_graph_output() for o in node.outputs[1:]):
            between.append(node)
            value = node.outputs[0]
            continue
        nxt = as_linear(node) if node.op_type in ("Gemm", "MatMul") else None
        return (between, nxt) if nxt is not None and nxt.kind in ("gemm", "matmul") else None


def find_heads(graph: ir.Graph, through: int, notes: list[str]) -> list[Head]:
    heads = []
    for node in list(graph):
        if node.op_type not in ("Flatten", "Reshape") or not is_default_domain(node):
            continue
        x, out = node.inputs[0], node.outputs[0]
        dims = _dims(x)
        if x is None or dims is None or len(dims) < 3 or any(d is None for d in dims[1:]) or not _is_float(x):
            continue
        channels, spatial = dims[1], tuple(dims[2:])
        if int(np.prod(spatial)) <= 1 or not _flattens_to_features(node, dims):
            continue
        uses = list(out.uses())
        if out.is_graph_output() or len(uses) != 1 or uses[0].idx != 0:
            continue
        first = as_linear(uses[0].node) if uses[0].node.op_type in ("Gemm", "MatMul") else None
        head_node = uses[0].node
        if first is None and head_node.op_type in ("Gemm", "MatMul") and encoding_of(head_node.inputs[1]):
            notes.append(f"head {head_node.name}: weight already in a compressed form "
                         f"({encoding_of(head_node.inputs[1])}); skipped (run gap before kmeans/quantize)")
        if first is None or first.kind not in ("gemm", "matmul") or first.d_in != channels * int(np.prod(spatial)):
            continue
        layers, between = [first], []
        while len(layers) <= through:
            found = _next_layer(layers[-1])
            if found is None:
                notes.append(f"head {first.name}: through={through} but only {len(layers) - 1} later fully "
                             f"connected layer(s) follow through single-use activations; replaced {len(layers)}")
                break
            between += found[0]
            layers.append(found[1])
        heads.append(Head(x, node, layers, between, channels, spatial))
    return heads


def head_weights(head: Head) -> tuple[np.ndarray, np.ndarray]:
    """(W [C, O], b [O]) of the GAP→Gemm: averaged first layer, later layers composed as if linear."""
    first = head.layers[0]
    taps = int(np.prod(head.spatial))
    w = first.matrix().reshape(head.channels, taps, first.d_out).sum(axis=1)
    b = first.bias_vector()
    for layer in head.layers[1:]:
        m = layer.matrix()
        w, b = w @ m, b @ m + layer.bias_vector()
    return w, b


class Gap(GraphoptPass):
    """ReduceMean/full-window AveragePool → GlobalAveragePool (exact); head=true: Flatten→Gemm → GAP→Gemm."""

    name = "gap"
    summary = "global average pooling: exact ReduceMean/AveragePool rewrites; head=true: Flatten→Gemm → GAP→Gemm"

    @dataclasses.dataclass(frozen=True)
    class Options(BaseOptions):
        head: bool = option(False, "also replace Flatten/Reshape→Gemm/MatMul heads over C×H×W features by "
                                   "GlobalAveragePool→Gemm (approximate; false: exact rewrites only)")
        refit: bool = option(True, "with calibration data: ridge-refit the new head Gemm to the teacher's "
                                   "output of the last replaced layer")
        through: int = option(0, "head: fully connected layers after the first that the new GAP→Gemm also "
                                 "replaces (0: the first only; 2: VGG's fc6–fc8)", low=0)
        ridge: float = option(1e-4, "ridge λ of the refit (relative to the mean input energy)", low=0.0)
        max_samples: int = option(256, "calibration samples used by the refit", low=1)

    def call(self, model: ir.Model) -> GraphoptResult:
        rows: list[dict] = []
        notes: list[str] = []
        if self._needs_shapes(model):

            failed = infer_shapes(model)
            if failed:
                notes.append(failed)
        for graph in all_graphs(model):
            _exact_rewrites(self, graph, rows)
        if self.options.head:
            self._heads(model, rows, notes)
        return self.result(model, rows, notes)

    @staticmethod
    def _needs_shapes(model: ir.Model) -> bool:
        ops = ("ReduceMean", "AveragePool", "Flatten", "Reshape")
        return any(n.op_type in ops and n.inputs and _dims(n.inputs[0]) is None for n in model.graph)

    # --- heads -----------------------------------------------------------------------------------------
    def _heads(self, model: ir.Model, rows: list[dict], notes: list[str]) -> None:
        opts = self.options
        graph = model.graph
        heads = find_heads(graph, opts.through, notes)
        if not heads:
            notes.append("head=true: no Flatten/Reshape→Gemm/MatMul over C×H×W features found")
            return
        calib = self.context.calib
        refit = opts.refit and calib is not None and not calib.synthetic
        if opts.refit and not refit:
            notes.append("refit=true but no real calibration data: head weights are the spatial average"
                         + (" composed through the removed activations as if they were identity"
                            if any(len(h.layers) > 1 for h in heads) else ""))
        teacher = self.context.teacher
        if refit and teacher is None:
            teacher = model.clone()  # outside a pipeline: the model as it is now is the reference
        for head in heads:
            rows.append(self._substitute(model, graph, head, teacher if refit else None, notes))

    def _substitute(self, model: ir.Model, graph: ir.Graph, head: Head, teacher: ir.Model | None,
                    notes: list[str]) -> dict:
        first, last = head.layers[0], head.layers[-1]
        base = first.name
        w, b = head_weights(head)
        dtype = first.weight.const_value.numpy().dtype
        params_before = head.params()
        target = last.output
        w_value = set_initializer(graph, f"{base}_gap_w", np.ascontiguousarray(w.T).astype(dtype))
        b_value = set_initializer(graph, f"{base}_gap_b", b.astype(dtype))
        gap = self.mark(ir.Node("", "GlobalAveragePool", [head.source], name=f"{base}_gap"))
        gap.outputs[0].name = f"{base}_gap_out"
        flat = self.mark(ir.Node("", "Flatten", [gap.outputs[0]], attributes=[ir.AttrInt64("axis", 1)],
                                 name=f"{base}_gap_flatten"))
        flat.outputs[0].name = f"{base}_gap_features"
        gemm = self.mark(ir.Node("", "Gemm", [flat.outputs[0], w_value, b_value],
                                 attributes=[ir.AttrInt64("transB", 1)], name=f"{base}_gap_gemm"))
        flat.outputs[0].type = gap.outputs[0].type = head.source.type
        flat.outputs[0].shape = ir.Shape([head.source.shape[0], head.channels])
        gap.outputs[0].shape = ir.Shape([head.source.shape[0], head.channels] + [1] * len(head.spatial))
        graph.insert_before(head.flatten, [gap, flat, gemm])
        old = head.nodes()
        old_inputs = [v for n in old for v in n.inputs[1:]]
        _take_over(graph, target, gemm.outputs[0])
        graph.remove(old, safe=True)
        _drop_unused(graph, old_inputs)
        replaced = [layer.name for layer in head.layers]
        if head.between:
            notes.append(f"head {base}: activations between the replaced layers vanish: "
                         + ", ".join(f"{n.op_type} {n.name}" for n in head.between))
        params_after = w.size + b.size
        row = {"rewrite": "head→GAP", "layer": base, "replaced": replaced,
               "features": "x".join(str(d) for d in (head.channels, *head.spatial)),
               "params_before": int(params_before), "params_after": int(params_after),
               "param_cut": round(1.0 - params_after / max(params_before, 1), 4),
               "exact": False, "refit": False, "rel_error_before": None, "rel_error": None}
        if teacher is not None:
            self._refit(model, gemm, gemm.outputs[0].name, teacher, row, notes)
        return row

    def _refit(self, model: ir.Model, gemm: ir.Node, target: str, teacher: ir.Model, row: dict,
               notes: list[str]) -> None:
        layer = as_linear(gemm)
        if layer is None:
            return
        if not any(target in (o.name for o in n.outputs) for n in teacher.graph):
            notes.append(f"head {row['layer']}: the teacher has no value {target!r}; averaged weights kept")
            return
        try:
            moments = layer_moments(model, [layer], self.context.calib, targets={layer.name: target},
                                    target_model=teacher, threads=self.context.threads,
                                    max_samples=self.options.max_samples, progress=self.context.progress)
        except DataError as err:
            notes.append(f"head {row['layer']}: refit skipped: {err}")
            return
        fit = refit_layer(layer, moments[layer.name], lam=self.options.ridge)
        row.update(refit=fit.changed, rel_error_before=float(f"{fit.error_before:.4g}"),
                   rel_error=float(f"{min(fit.error_after, fit.error_before):.4g}"), rows=fit.rows)
