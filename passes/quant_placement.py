"""Where int8 pays, measured on this machine: latency-aware placement and the accuracy budget for quantize.

Latency (``target=latency``): whether int8 is faster depends on the op, its shape and the CPU, so each weight
op (Conv/ConvTranspose/Gemm/MatMul with a constant weight) is timed alone with onnxruntime at the run's thread
count, as three one-node models interleaved by :func:`graphopt.bench.benchmark`:
- float: x → op (→ its Relu/Clip) → y;
- int8: the same in QDQ with float x and y (Q → op → DQ after onnxruntime's fusion);
- boundary: only the Q of x and the DQ of y, so int8 − boundary is the integer kernel alone, as it runs
  inside a chain of int8 ops; and, for MatMul/Gemm, the dynamic int8 form.
An op whose integer kernel is not faster stays float. The rest form connected int8 regions; a region pays
only if its kernels' gain beats the Q at each entry and the DQ at each exit (priced per element from the
measured boundaries). Finally the whole quantized model is timed against the float one, interleaved; while it is
not faster the region with the least estimated gain goes back to float (no region left: no change).
Everything is bounded by ``latency_budget_s``; ops not timed in time keep their planned int8.

Accuracy (``max_drop``): the planned set is checked as a whole against the teacher on calibration data
(:func:`graphopt.sensitivity.measure_combination`); if it breaks the budget, each op is measured alone
(:func:`graphopt.sensitivity.measure`) and the k most sensitive go back to float, k found by bisection with
combination checks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from graphopt import bench, capture, modelio
from graphopt import sensitivity as sens
from graphopt.passes import qdq
from graphopt.passes.quant_dynamic import emit_dynamic
from graphopt.weights import constant_array

Range = tuple[float, float]
MARGIN = 0.97  # faster means at most 97% of the float time (timing noise on a busy machine is a few %)


@dataclass
class LayerTiming:
    node: str
    op: str
    float_ms: float
    int8_ms: float  # the integer kernel alone (int8 model minus its boundary Q/DQ)
    boundary_ms: float  # Q of the input + DQ of the output
    elems: int  # elements of input + output (prices boundaries elsewhere)
    dynamic_ms: float | None = None

    @property
    def gain_ms(self) -> float:
        return self.float_ms - self.int8_ms

    def row(self) -> dict:
        out = {"node": self.node, "op": self.op, "action": "timed", "float_ms": round(self.float_ms, 4),
               "int8_kernel_ms": round(self.int8_ms, 4), "qdq_boundary_ms": round(self.boundary_ms, 4)}
        if self.dynamic_ms is not None:
            out["dynamic_ms"] = round(self.dynamic_ms, 4)
        return out


# A LayerTimer times the given nodes (tests inject a fake one); a ModelTimer returns candidate/float latency.
LayerTimer = Callable[[ir.Model, Sequence[ir.Node], Mapping[str, Range], qdq.QdqConfig, float],
                      dict[str, LayerTiming]]
ModelTimer = Callable[[ir.Model, ir.Model], float]


# --- one-node models -------------------------------------------------------------------------------------------


def _copy_value(v: ir.Value, shape=None) -> ir.Value:
    return ir.Value(name=v.name, type=v.type or ir.TensorType(ir.DataType.FLOAT),
                    shape=ir.Shape(shape) if shape is not None else v.shape, const_value=v.const_value)


def _micro(node: ir.Node, in_shape: tuple[int, ...], opset: int) -> ir.Model:
    """x → node (→ the Relu/Clip that folds into it) → y, weights shared with the model (never written)."""
    x = _copy_value(node.inputs[0], in_shape)
    inits, ins = [], [x]
    for v in node.inputs[1:]:
        c = _copy_value(v) if v is not None else None
        if c is not None:
            inits.append(c)
        ins.append(c)
    out = ir.Value(name=node.outputs[0].name, type=ir.TensorType(ir.DataType.FLOAT))
    new = ir.Node(node.domain, node.op_type, ins, attributes=list(node.attributes.values()), name=node.name,
                  outputs=[out])
    nodes = [new]
    target = qdq.fold_target(node)
    if target is not node.outputs[0]:
        fold = target.producer()
        extra = [_copy_value(v) if v is not None else None for v in fold.inputs[1:]]
        inits += [v for v in extra if v is not None]
        y = ir.Value(name=target.name, type=ir.TensorType(ir.DataType.FLOAT))
        nodes.append(ir.Node(fold.domain, fold.op_type, [out, *extra], attributes=list(fold.attributes.values()),
                             name=fold.name, outputs=[y]))
        out = y
    graph = ir.Graph([x], [out], nodes=nodes, initializers=inits, opset_imports={"": max(opset, 13)})
    return ir.Model(graph, ir_version=8)


def _boundary(x_name: str, x_shape, y_name: str, y_shape, x_range: Range, y_range: Range,
              cfg: qdq.QdqConfig) -> ir.Model:
    """Only the boundary ops: QuantizeLinear(x) and DequantizeLinear(y_q)."""
    dtype = np.uint8 if cfg.activation_type == "uint8" else np.int8
    qtype = ir.DataType.from_numpy(np.dtype(dtype))
    x = ir.Value(name=x_name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(x_shape))
    yq = ir.Value(name=f"{y_name}__q", type=ir.TensorType(qtype), shape=ir.Shape(y_shape))
    inits, outs, nodes = [], [], []
    for i, (src, rng, op) in enumerate(((x, x_range, "QuantizeLinear"), (yq, y_range, "DequantizeLinear"))):
        scale, zp = qdq.activation_qparams(*rng, cfg.activation_type)
        s = ir.Value(name=f"s{i}", const_value=ir.tensor(np.asarray(scale, np.float32), name=f"s{i}"))
        z = ir.Value(name=f"z{i}", const_value=ir.tensor(np.asarray(zp, dtype), name=f"z{i}"))
        inits += [s, z]
        out = ir.Value(name=f"o{i}")
        nodes.append(ir.Node("", op, [src, s, z], outputs=[out]))
        outs.append(out)
    graph = ir.Graph([x, yq], outs, nodes=nodes, initializers=inits, opset_imports={"": 13})
    return ir.Model(graph, ir_version=8)


def _proto(model: ir.Model) -> onnx.ModelProto:
    return modelio.to_proto(model)


def capture_shapes(model: ir.Model, names: Sequence[str], dataset, threads: int = 1) -> dict[str, tuple]:
    """Shapes of the named values on the first calibration feed."""
    for acts in capture.stream(model, list(dict.fromkeys(names)), dataset, threads, max_samples=1):
        return {k: tuple(np.shape(v)) for k, v in acts.items()}
    return {}


def time_layers(model: ir.Model, nodes: Sequence[ir.Node], ranges: Mapping[str, Range], cfg: qdq.QdqConfig,
                shapes: Mapping[str, tuple], threads: int = 1, budget_s: float = 30.0,
                dynamic: bool = False) -> dict[str, LayerTiming]:
    """Time each node's float, int8 and boundary one-node models (see the module doc) within ``budget_s``."""
    opset = model.opset_imports.get("", 13)
    rng = np.random.default_rng(0)
    start, out = time.perf_counter(), {}
    for node in nodes:
        if time.perf_counter() - start > budget_s:
            break
        x, y = node.inputs[0], qdq.fold_target(node)
        if x.name not in shapes or y.name not in shapes or x.name not in ranges or y.name not in ranges:
            continue
        try:
            flt = _micro(node, shapes[x.name], opset)
            q = _micro(node, shapes[x.name], opset)
            qdq.emit(q, [next(iter(q.graph))], ranges, qdq.QdqConfig(cfg.activation_type, cfg.per_channel, True))
            models = [flt, q, _boundary(x.name, shapes[x.name], y.name, shapes[y.name], ranges[x.name],
                                        ranges[y.name], cfg)]
            if dynamic and node.op_type in ("MatMul", "Gemm"):
                d = _micro(node, shapes[x.name], opset)
                emit_dynamic(d, [next(iter(d.graph))], cfg.per_channel)
                models.append(d)
            lo, hi = ranges[x.name]
            feed = {x.name: rng.uniform(lo, hi, shapes[x.name]).astype(np.float32),
                    f"{y.name}__q": rng.integers(0, 127, shapes[y.name]).astype(
                        np.uint8 if cfg.activation_type == "uint8" else np.int8)}
            rows = bench.benchmark([_proto(m) for m in models], [feed], threads=threads, warmup=3, repeats=15,
                                   min_time_s=0.05)
        except Exception:  # an op the one-node model cannot express: no timing, plan unchanged
            continue
        elems = int(np.prod(shapes[x.name])) + int(np.prod(shapes[y.name]))
        ms = [r.median_ms for r in rows]
        out[node.name] = LayerTiming(node.name, node.op_type, ms[0], max(ms[1] - ms[2], 0.0), ms[2], elems,
                                     ms[3] if len(ms) > 3 else None)
    return out


def time_models(reference: ir.Model, candidate: ir.Model, dataset, threads: int = 1, repeats: int = 10,
                min_time_s: float = 0.5) -> float:
    """candidate/reference median latency, interleaved, on the first two calibration feeds. Sessions come from
    runtime.make_session on the models themselves (it handles large and file-backed tensors)."""
    import statistics

    from graphopt.runtime import make_session

    sessions = [make_session(m, threads) for m in (reference, candidate)]
    names = [{i.name for i in s.get_inputs()} for s in sessions]
    feeds = [[{k: v for k, v in f.items() if k in n} for f in dataset.feeds[:2]] for n in names]
    for r in range(2):
        for s, f in zip(sessions, feeds):
            s.run(None, f[r % len(f)])
    times: list[list[float]] = [[], []]
    start, r = time.perf_counter(), 0
    while r < repeats or time.perf_counter() - start < min_time_s:
        for j in range(2):
            i = (r + j) % 2
            t0 = time.perf_counter()
            sessions[i].run(None, feeds[i][r % len(feeds[i])])
            times[i].append(time.perf_counter() - t0)
        r += 1
    return statistics.median(times[1]) / statistics.median(times[0])


# --- regions --------------------------------------------------------------------------------------------------


def regions(nodes: Sequence[ir.Node], quantize_outputs: bool = False) -> list[list[ir.Node]]:
    """Connected groups of int8 nodes (joined where one's int8 output is another's input)."""
    chosen = set(nodes)
    parent = {n: n for n in nodes}

    def find(n):
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for node in nodes:
        for out in qdq.output_targets(node, quantize_outputs):
            for use in out.uses():
                if use.node in chosen:
                    parent[find(use.node)] = find(node)
    groups: dict[ir.Node, list[ir.Node]] = {}
    for node in nodes:
        groups.setdefault(find(node), []).append(node)
    return list(groups.values())


def _elems(value: ir.Value, shapes: Mapping[str, tuple]) -> int:
    return int(np.prod(shapes[value.name])) if value.name in shapes else 0


def region_gain(region: Sequence[ir.Node], timings: Mapping[str, LayerTiming], shapes: Mapping[str, tuple],
                ms_per_elem: float, quantize_outputs: bool = False) -> float:
    """Kernel gains of the region's timed ops minus the price of its entry Qs and exit DQs (ms)."""
    members = set(region)
    gain = sum(timings[n.name].gain_ms for n in region if n.name in timings)
    entries, exits = set(), set()
    for node in region:
        for i in qdq.activation_inputs(node):
            v = node.inputs[i]
            src = v.producer()
            inside = src in members or (src is not None and src.op_type in qdq.FOLD_OPS and
                                        src.inputs[0].producer() in members)
            if not v.is_initializer() and not inside:
                entries.add(v)
        for out in qdq.output_targets(node, quantize_outputs):
            if any(u.node not in members for u in out.uses()) or out.is_graph_output():
                exits.add(out)
    return gain - ms_per_elem * sum(_elems(v, shapes) for v in entries | exits)


def boundary_price(timings: Mapping[str, LayerTiming]) -> float:
    """ms per element of a Q or DQ: the median over the timed boundaries."""
    per = [t.boundary_ms / t.elems for t in timings.values() if t.elems]
    return float(np.median(per)) if per else 0.0


# --- the accuracy budget --------------------------------------------------------------------------------------


@dataclass
class BudgetResult:
    excluded: list[str] = field(default_factory=list)  # most sensitive first
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


SNR_MARGIN_DB = 1.0  # calibration and evaluation data differ: aim 1 dB inside an snr budget


def _holds(row: sens.SensitivityRow, max_drop: float, min_snr_db: float) -> bool:
    if not row.measured:
        return False
    if row.drop is not None:
        return row.drop <= max_drop + 1e-12
    return row.worst_snr_db >= min_snr_db + SNR_MARGIN_DB


def accuracy_budget(context, model: ir.Model, anchors: Sequence[str], build: Callable[[ir.Model, set[str]], None],
                    max_drop: float, min_snr_db: float = 30.0, max_samples: int = 128,
                    time_budget_s: float | None = 120.0) -> BudgetResult:
    """Names (of ``anchors``) to keep float so that ``build(clone, kept_anchor_names)`` stays in budget."""
    out = BudgetResult()
    full = set(anchors)
    first = sens.measure_combination(context, model, [lambda m: build(m, full)], max_samples)
    if _holds(first, max_drop, min_snr_db):
        out.notes.append(f"accuracy budget holds with every planned op int8 (calibration drop "
                         f"{_fmt(first.drop)}, worst-channel SNR {first.worst_snr_db:.1f} dB; max_drop {max_drop:g})")
        return out
    cands = [sens.Candidate(name, name, "int8", (lambda m, n=name: build(m, {n}))) for name in anchors]
    table = sens.measure(context, model, cands, max_samples, time_budget_s)
    out.notes += table.notes
    # Most sensitive first: largest drop, then lowest SNR; unmeasured ones are treated as the most sensitive.
    ranked = sorted(table, key=lambda r: (r.measured, -(r.drop or 0.0), r.worst_snr_db))
    out.rows = [{**r.to_dict(), "node": r.layer, "action": "sensitivity", "rank": i + 1}
                for i, r in enumerate(ranked)]
    order = [r.layer for r in ranked]
    lo, hi = 1, len(order)  # smallest k with the budget holding; k = n (nothing int8) holds trivially
    checks = 0
    while lo < hi:
        k = (lo + hi) // 2
        row = sens.measure_combination(context, model, [lambda m, keep=full - set(order[:k]): build(m, keep)],
                                       max_samples)
        checks += 1
        if _holds(row, max_drop, min_snr_db):
            hi = k
        else:
            lo = k + 1
    out.excluded = order[:lo]
    out.notes.append(f"accuracy budget: {len(out.excluded)} of {len(order)} ops kept float (most sensitive on "
                     f"calibration data, {checks} combination checks); exclude_nodes="
                     + "|".join(out.excluded))
    return out


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


# --- the latency search ------------------------------------------------------------------------------------


@dataclass
class Placement:
    """Latency placement for one pass run; ``layer_timer``/``model_timer`` may be replaced (tests)."""

    threads: int = 1
    budget_s: float = 60.0
    layer_timer: LayerTimer | None = None
    model_timer: ModelTimer | None = None
    notes: list[str] = field(default_factory=list)
    timings: dict[str, LayerTiming] = field(default_factory=dict)
    _start: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self._start)

    def time_layers(self, model, nodes, ranges, cfg, shapes, dynamic=False) -> dict[str, LayerTiming]:
        if self.layer_timer is not None:
            found = self.layer_timer(model, nodes, ranges, cfg, self.left())
        else:
            found = time_layers(model, nodes, ranges, cfg, shapes, self.threads, max(self.left() * 0.6, 0.0),
                                dynamic)
        self.timings.update(found)
        missing = [n.name for n in nodes if n.name not in found]
        if missing:
            self.notes.append(f"{len(missing)} op(s) not timed (latency_budget_s or not expressible alone): "
                              "kept as planned")
        return found

    def ratio(self, reference: ir.Model, candidate: ir.Model, dataset) -> float:
        if self.model_timer is not None:
            return self.model_timer(reference, candidate)
        return time_models(reference, candidate, dataset, self.threads)

    def back_off(self, model: ir.Model, groups: list[tuple[float, set[str]]],
                 build: Callable[[ir.Model, set[str]], None], dataset) -> tuple[set[str], float | None]:
        """Drop the least-gain groups until the whole model is faster than float (or the budget ends)."""
        groups = sorted(groups, key=lambda g: -g[0])
        ratio = None
        while groups:
            keep = set().union(*(g[1] for g in groups))
            clone = model.clone()
            build(clone, keep)
            ratio = self.ratio(model, clone, dataset)
            if ratio <= MARGIN:
                return keep, ratio
            if self.left() <= 0:
                self.notes.append(f"latency_budget_s spent with the model at {ratio:.2f}x float: nothing kept")
                return set(), ratio
            gain, dropped = groups.pop()
            self.notes.append(f"whole model {ratio:.2f}x float: {len(dropped)} op(s) of the least-gain region "
                              f"(est. {gain:+.3f} ms) back to float")
        return set(), ratio

    def place_dynamic(self, model: ir.Model, nodes: list[ir.Node], dataset, per_channel: bool
                      ) -> tuple[list[ir.Node], list[dict], list[str]]:
        """The dynamic pass: nodes measured faster in dynamic int8, then the whole-model check."""
        mm = [n for n in nodes if n.op_type in ("MatMul", "Gemm")]
        names = [n.inputs[0].name for n in mm] + [n.outputs[0].name for n in mm]
        shapes = capture_shapes(model, names, dataset, self.threads) if mm else {}
        ranges = {k: (-1.0, 1.0) for k in names}  # the dynamic form needs no range; one-node feeds use it
        cfg = qdq.QdqConfig("uint8", per_channel, False)
        timed = self.time_layers(model, mm, ranges, cfg, shapes, dynamic=True)
        rows, keep = [], []
        for node in nodes:
            t = timed.get(node.name)
            if t is not None and t.dynamic_ms is not None and t.dynamic_ms > MARGIN * t.float_ms:
                rows.append({"node": node.name, "op": node.op_type, "action": "float",
                             "reason": f"dynamic int8 measured slower ({t.dynamic_ms:.3f} ms vs "
                                       f"{t.float_ms:.3f} ms float)"})
                continue
            keep.append(node)
        gains = [((t.float_ms - t.dynamic_ms) if (t := timed.get(n.name)) and t.dynamic_ms else 0.0, {n.name})
                 for n in keep]
        by_name = {n.name: n for n in keep}

        def build(m: ir.Model, names: set[str]) -> None:
            emit_dynamic(m, [n for n in m.graph if n.name in names], per_channel)

        kept, ratio = self.back_off(model, gains, build, dataset) if keep else (set(), None)
        if ratio is not None:
            self.notes.append(f"whole model with dynamic int8: {ratio:.2f}x float latency")
        return [by_name[n] for n in by_name if n in kept], rows, self.notes


def _name_nodes(model: ir.Model) -> None:
    """Selection works by node name (clones, exclude lists): unnamed or duplicate names get unique ones."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph):
        if not node.name or node.name in seen:
            base = f"{node.op_type}_{i}"
            node.name = base if base not in seen else f"{base}_{id(node)}"
        seen.add(node.name)


def weight_anchors(nodes: Sequence[ir.Node]) -> list[ir.Node]:
    """The planned nodes with a constant weight (the ones worth timing)."""
    return [n for n in nodes if qdq.weight_index(n) is not None and constant_array(n.inputs[1]) is not None]
