"""Where int8 pays, measured on this machine: latency-aware placement and the accuracy budget for quantize.

Latency (``target=latency``): each weight op is timed alone (:mod:`.timing`); an op whose integer kernel
is not faster stays float. The rest form connected int8 regions; a region pays only if its kernels' gain beats
the Q at each entry and the DQ at each exit (priced per element from the measured boundaries); of a region that
does not, the timed ops that pay for their own Q and DQ stay int8 alone. Per-op times of
tiny ops are noise next to a whole model, so the final choice is made on whole models
(:meth:`Placement.choose`): the placement above, every planned op int8, and (``activation_type=auto``) each of
them with int8 activations too, all timed interleaved with the float model; the fastest one that keeps the
accuracy budget wins. While none is faster than float, the region with the least estimated gain goes back to
float (:meth:`Placement.back_off`; no region left: no change). Everything is bounded by ``latency_budget_s``.

Accuracy (``max_drop``): the planned set is checked as a whole against the teacher on calibration data
(:func:`graphopt.sensitivity.measure_combination`), its drop held with the output error made
metrics.STRESS times larger as well (the checks see a few samples, and ``graphopt auto`` refuses a model at the
budget's edge, as budget-seeking does); if it breaks the budget, each op is measured alone
(:func:`graphopt.sensitivity.measure`) and the k most sensitive go back to float, k found by bisection with
combination checks. With measured timings the ranking is sensitivity per ms the op's int8 kernel saves, so the
budget is paid with the ops whose int8 form is worth least (an Add or a tiny conv before a big conv).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from graphopt import sensitivity as sens
from graphopt.passes.quantize import qdq
from graphopt.passes.quantize.dynamic import emit_dynamic
from graphopt.passes.quantize.timing import (LayerTimer, LayerTiming, ModelTimer, capture_shapes, time_candidates,
                                             time_layers)
from graphopt.weights import constant_array

__all__ = ["MARGIN", "BudgetResult", "Choice", "LayerTimer", "LayerTiming", "ModelTimer", "Placement",
           "accuracy_budget", "boundary_price", "dedupe", "region_gain", "regions", "weight_anchors"]
# what the accuracy budget counts an untimed op (Add, Mul) kept float to cost: below every timed op's saving on
# PP-OCRv4 rec (0.017-2.7 ms, AMX host), so a sensitive elementwise op goes float before a conv
COST_FLOOR_MS = 0.01
MARGIN = 0.97  # faster means at most 97% of the float time (timing noise on a busy machine is a few %)


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
    excluded: list[str] = field(default_factory=list)  # first ranked first
    rows: list[dict] = field(default_factory=list)
    # every measured anchor, most sensitive (per ms saved, with timings) first; empty: not ranked
    order: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def accuracy_budget(context, model: ir.Model, anchors: Sequence[str], build: Callable[[ir.Model, set[str]], None],
                    max_drop: float, min_snr_db: float = 30.0, max_samples: int = 128,
                    time_budget_s: float | None = 120.0, check_samples: int | None = None,
                    build_single: Callable[[ir.Model, str], None] | None = None,
                    cost_ms: Mapping[str, float] | None = None) -> BudgetResult:
    """Names (of ``anchors``) to keep float so that ``build(clone, kept_anchor_names)`` stays in budget.
    ``max_samples``: per single-op measurement; ``check_samples``: per whole-set check (None: ``max_samples``);
    ``build_single(clone, name)``: the single-op screen's edit (None: ``build(clone, {name})``); ``cost_ms``:
    the measured ms each op's int8 form saves (target=latency), so the ranking is sensitivity per ms."""
    out = BudgetResult()
    full = set(anchors)
    check_samples = max_samples if check_samples is None else check_samples
    first = sens.measure_combination(context, model, [lambda m: build(m, full)], check_samples)
    if sens.holds(first, max_drop, min_snr_db, stressed=True):
        out.notes.append(f"accuracy budget holds with every planned op int8 (calibration drop "
                         f"{_fmt(first.drop)}, worst-channel SNR {first.worst_snr_db:.1f} dB; max_drop {max_drop:g})")
        return out
    single = build_single or (lambda m, n: build(m, {n}))
    cands = [sens.Candidate(name, name, "int8", (lambda m, n=name: single(m, n))) for name in anchors]
    table = sens.measure(context, model, cands, max_samples, time_budget_s)
    out.notes += table.notes
    ranked = sorted(table, key=lambda r: _rank_key(r, cost_ms))
    out.rows = [{**r.to_dict(), "node": r.layer, "action": "sensitivity", "rank": i + 1}
                for i, r in enumerate(ranked)]
    order = [r.layer for r in ranked]
    lo, hi = 1, len(order)  # smallest k with the budget holding; k = n (nothing int8) holds trivially
    checks = 0
    while lo < hi:
        k = (lo + hi) // 2
        row = sens.measure_combination(context, model, [lambda m, keep=full - set(order[:k]): build(m, keep)],
                                       check_samples)
        checks += 1
        if sens.holds(row, max_drop, min_snr_db, stressed=True):
            hi = k
        else:
            lo = k + 1
    out.excluded, out.order = order[:lo], order
    out.notes.append(f"accuracy budget: {len(out.excluded)} of {len(order)} ops kept float (most sensitive on "
                     f"calibration data{' per ms saved' if cost_ms is not None else ''}, {checks} combination "
                     "checks); exclude_nodes="
                     + "|".join(out.excluded))
    return out


def _rank_key(row: sens.SensitivityRow, cost_ms: Mapping[str, float] | None) -> tuple:
    """Most sensitive first: largest stressed drop (a coarse metric such as line accuracy leaves most single ops
    at drop 0; their stressed drops still differ), then drop, then lowest SNR; unmeasured ones rank first. With
    ``cost_ms``, each per ms its int8 form saves (an untimed op, such as an Add, at least COST_FLOOR_MS): on
    PP-OCRv4 rec (AMX, auto's search samples) the plain ranking sent 19 convs worth 15 ms back to float, and
    quantize left the model at x0.690 of float; ranked per ms, x0.572."""
    if cost_ms is None:
        return row.measured, -(row.stressed_or_drop or 0.0), -(row.drop or 0.0), row.worst_snr_db
    per_ms = 1.0 / max(cost_ms.get(row.layer, 0.0), COST_FLOOR_MS)
    noise = 10.0 ** (-row.worst_snr_db / 10.0)  # output noise / signal: what ranks ops a coarse metric ties
    return row.measured, -(row.stressed_or_drop or 0.0) * per_ms, -(row.drop or 0.0) * per_ms, -noise * per_ms


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


# --- the latency search ------------------------------------------------------------------------------------


@dataclass
class Choice:
    """One whole-model candidate: the node names kept int8 (static or dynamic) and the activation type."""

    label: str
    keep: frozenset[str]
    activation_type: str
    checked: bool = True  # the accuracy budget is known to hold for it


def dedupe(choices: Sequence[Choice]) -> list[Choice]:
    """Choices with a distinct (keep, activation type), first one wins (it is the better checked one)."""
    seen: dict[tuple[frozenset[str], str], Choice] = {}
    for c in choices:
        seen.setdefault((c.keep, c.activation_type), c)
    return list(seen.values())


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

    def ratios(self, reference: ir.Model, candidates: Sequence[ir.Model], dataset) -> list[float]:
        """Latency of each candidate / the reference's, measured together (interleaved)."""
        if self.model_timer is not None:
            return [self.model_timer(reference, c) for c in candidates]
        return time_candidates(reference, candidates, dataset, self.threads)

    def ratio(self, reference: ir.Model, candidate: ir.Model, dataset) -> float:
        return self.ratios(reference, [candidate], dataset)[0]

    def choose(self, model: ir.Model, choices: Sequence[Choice], build: Callable[[ir.Model, Choice], None],
               dataset, accept: Callable[[Choice], bool]) -> tuple[Choice | None, list[float]]:
        """Time every whole-model choice against float, interleaved; the fastest one faster than float that
        keeps the accuracy budget (``checked``, or ``accept`` measures it) wins. Returns (winner or None, the
        ratios of ``choices`` in order)."""
        clones = []
        for choice in choices:
            clone = model.clone()
            build(clone, choice)
            clones.append(clone)
        ratios = self.ratios(model, clones, dataset)
        del clones
        self.notes.append("whole-model candidates: " + ", ".join(
            f"{c.label} ({c.activation_type}) {r:.2f}x" for c, r in zip(choices, ratios)))
        for i in sorted(range(len(choices)), key=lambda k: ratios[k]):
            if ratios[i] > MARGIN:
                break
            if choices[i].checked or accept(choices[i]):
                return choices[i], ratios
            self.notes.append(f"{choices[i].label} ({choices[i].activation_type}) measured {ratios[i]:.2f}x but "
                              "breaks the accuracy budget")
        return None, ratios

    def back_off(self, model: ir.Model, groups: list[tuple[float, set[str]]],
                 build: Callable[[ir.Model, set[str]], None], dataset,
                 known: float | None = None) -> tuple[set[str], float | None]:
        """Drop the least-gain groups until the whole model is faster than float (or the budget ends);
        ``known`` is the already measured ratio of all groups together."""
        groups = sorted(groups, key=lambda g: -g[0])
        ratio = None
        while groups:
            keep = set().union(*(g[1] for g in groups))
            if known is not None:
                ratio, known = known, None
            else:
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

    def place_dynamic(self, model: ir.Model, nodes: list[ir.Node], dataset, per_channel: bool,
                      safe_pairs: bool = True) -> tuple[list[ir.Node], list[dict], list[str]]:
        """The dynamic pass: nodes measured faster in dynamic int8, then the whole-model check."""
        mm = [n for n in nodes if n.op_type in ("MatMul", "Gemm")]
        names = [n.inputs[0].name for n in mm] + [n.outputs[0].name for n in mm]
        shapes = capture_shapes(model, names, dataset, self.threads) if mm else {}
        ranges = {k: (-1.0, 1.0) for k in names}  # the dynamic form needs no range; one-node feeds use it
        cfg = qdq.QdqConfig("uint8", per_channel, False, safe_pairs)
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
            emit_dynamic(m, [n for n in m.graph if n.name in names], per_channel, safe_pairs=safe_pairs)

        kept, ratio = self.back_off(model, gains, build, dataset) if keep else (set(), None)
        if ratio is not None:
            self.notes.append(f"whole model with dynamic int8: {ratio:.2f}x float latency")
        return [by_name[n] for n in by_name if n in kept], rows, self.notes


def weight_anchors(nodes: Sequence[ir.Node]) -> list[ir.Node]:
    """The planned nodes with a constant weight (the ones worth timing)."""
    return [n for n in nodes if qdq.weight_index(n) is not None and constant_array(n.inputs[1]) is not None]
