"""The selection step of quantize: which planned nodes end up int8 (static or dynamic), and in which
activation type.

In order (:func:`select`, one named step each): LSTMs (and, with ``dynamic=on``, every MatMul/Gemm) go dynamic;
with ``target=latency`` each weight op is timed alone and the ones whose integer kernel is slower (or faster in
dynamic int8) are moved, then regions that do not pay for their Q/DQ go float (:mod:`.placement`); the most
sensitive ops stay float until ``max_drop`` holds; finally whole models decide
(:meth:`.placement.Placement.choose`): the placement, every planned op int8 (per-op timings of tiny ops are
noise), and with ``activation_type=auto`` both of them with int8 activations as well — int8 activations run VGG's
big convs faster on VNNI CPUs but most other conv nets 2-3x slower, so only a measurement can tell. A candidate
the accuracy budget has not seen is checked before it wins. Every whole-selection accuracy check
(``budget_samples`` samples) sees its candidate bias-corrected when ``bias_correction`` is on, as the emitted
model will be; the per-op screen (``sensitivity_samples``) does not.

The steps share two objects: a :class:`Selector` (what is fixed for the run, and the edits its timings and
checks make on model clones) and a :class:`SelectState` (what each step hands on to the next).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import onnx_ir as ir

from graphopt import cpu
from graphopt import sensitivity as sens
from graphopt.graphs import name_nodes
from graphopt.passes.quantize import placement as qp
from graphopt.passes.quantize import qdq
from graphopt.passes.quantize.calibrate import Range
from graphopt.passes.quantize.correct import correct_biases
from graphopt.passes.quantize.dynamic import dynamic_reason, emit_dynamic
from graphopt.passes.quantize.options import QuantizeOptions
from graphopt.passes.quantize.plan import Plan, plan
from graphopt.passes.quantize.timing import capture_shapes

OTHER_TYPE = {"uint8": "int8", "int8": "uint8"}
REGION_ROUNDS = 4  # rounds of sending regions that do not pay for their Q/DQ to float


@dataclasses.dataclass
class Selection:
    plan: Plan
    rows: list[dict]
    notes: list[str]
    activation_type: str  # the activation type to emit (``auto`` resolved)
    # int8 names in the accuracy budget's order, first ranked first: what goes float next should the emitted
    # model (corrected on more samples than the budget's checks) break the budget after all
    spare: list[str] = dataclasses.field(default_factory=list)


def replan(model: ir.Model, options: QuantizeOptions, ranges: dict[str, Range], excluded: set[str]) -> Plan:
    """The plan of ``model`` with the ``excluded`` names kept float as well as the options' own exclusions."""
    return plan(model, dataclasses.replace(options, exclude_nodes=[*options.exclude_nodes, *sorted(excluded)]),
                dict(ranges))


@dataclasses.dataclass
class Selector:
    """What one selection keeps fixed: the model, its ranges, the options and context, the emission config, the
    placer (its timers, budget and timings), and the samples of the bias correction inside each whole-selection
    check (None: the checks are not corrected)."""

    model: ir.Model
    ranges: dict[str, Range]
    options: QuantizeOptions
    context: Any  # graphopt.passbase.PassContext
    cfg: qdq.QdqConfig
    placer: qp.Placement
    correct_samples: int | None = None
    measure: bool = False  # target=latency and this host can time for the target

    @property
    def data(self):
        return self.context.calib

    @functools.cached_property
    def tail(self):
        """The calibration data from its end: the checks judge its head, their corrections fit its tail, so a check
        does not grade a correction on the samples it was fitted to (as far as the feeds allow)."""
        data = self.data
        if data is not None and len(data.feeds) > 1:
            return data.take_feeds(list(reversed(range(len(data.feeds)))), f"{data.source}, from the end")
        return data

    def replan(self, m: ir.Model, excluded: set[str]) -> Plan:
        """The plan of ``m`` with the ``excluded`` names kept float too."""
        return replan(m, self.options, self.ranges, excluded)

    def build(self, m: ir.Model, keep: set[str], dyn: set[str], act: str | None = None) -> None:
        """Emit exactly ``keep`` (static QDQ in ``act`` activations, or dynamic for names in ``dyn``)."""
        p = self.replan(m, ({n.name for n in m.graph} - keep) | dyn)
        if p.nodes:
            cfg = self.cfg if act is None else dataclasses.replace(self.cfg, activation_type=act)
            qdq.emit(m, p.nodes, self.ranges, cfg)
        emit_dynamic(m, [n for n in m.graph if n.name in keep & dyn], self.cfg.per_channel,
                     safe_pairs=self.cfg.safe_pairs)

    def build_checked(self, m: ir.Model, keep: set[str], dyn: set[str], act: str | None = None) -> None:
        """:meth:`build`, then bias correction as the final model gets it, on fewer samples: what a
        whole-selection check judges."""
        self.build(m, keep, dyn, act)
        if self.correct_samples is not None:
            correct_biases(self.model, m, self.tail, self.context.threads, self.correct_samples)

    def build_one(self, m: ir.Model, name: str, dyn: set[str]) -> None:
        """The single-op screen: that op alone, uncorrected."""
        if name in dyn:
            emit_dynamic(m, [n for n in m.graph if n.name == name], self.cfg.per_channel,
                         safe_pairs=self.cfg.safe_pairs)
        else:
            qdq.emit(m, [n for n in m.graph if n.name == name], self.ranges, self.cfg)


@dataclasses.dataclass
class SelectState:
    """What the steps of :func:`select` hand on: the current plan, the names going dynamic, why each name left
    static int8, and the rows and notes so far."""

    current: Plan
    dyn: set[str]  # names emitted in dynamic int8
    reasons: dict[str, str]  # node name → why it went back to float (or dynamic)
    latency_float: set[str] = dataclasses.field(default_factory=set)  # names per-op/region timing sent to float
    shapes: dict[str, tuple] = dataclasses.field(default_factory=dict)  # activation shapes on the first feed
    act: str = "uint8"  # the activation type to emit
    rows: list[dict] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    order: list[str] = dataclasses.field(default_factory=list)  # the accuracy budget's ranking

    @property
    def pool(self) -> set[str]:
        """Every name still int8: the current plan's nodes and the dynamic ones."""
        return {n.name for n in self.current.nodes} | self.dyn


def select(model: ir.Model, planned: Plan, ranges: dict[str, Range], options: QuantizeOptions, context,
           cfg: qdq.QdqConfig, placer: qp.Placement, correct_samples: int | None = None) -> Selection:
    """Narrow ``planned`` (see the module doc); ``cfg`` is the emission config (``activation_type=auto``
    resolved to its starting type), ``correct_samples`` the bias correction inside each whole-selection check."""
    name_nodes(model)  # selection works by node name (clones, exclude lists)
    sel = Selector(model, ranges, options, context, cfg, placer, correct_samples)
    dyn = _dynamic_from_options(model, planned, options)
    notes: list[str] = []
    if options.target == "latency":
        sel.measure, note = cpu.placement_note(context.target)
        notes.append(note)
    st = SelectState(sel.replan(model, set(dyn)), dyn, dict.fromkeys(dyn, "dynamic int8"), act=cfg.activation_type,
                     notes=notes)
    if sel.measure and sel.data is not None:
        _time_ops(sel, st)
        _drop_losing_regions(sel, st)
    if context.max_drop is not None and sel.data is not None and st.pool:
        _apply_accuracy_budget(sel, st)
    elif context.max_drop is None:
        st.notes.append("no max_drop in the context: accuracy budget not applied (the pipeline gate still checks)")
    if sel.measure and st.pool and sel.data is not None:
        _choose_whole_model(sel, st)
    st.notes += placer.notes
    return _finish(model, planned, st)


def _dynamic_from_options(model: ir.Model, planned: Plan, opts: QuantizeOptions) -> set[str]:
    """Names dynamic by option: every LSTM unless ``dynamic=off``; with ``dynamic=on`` every planned MatMul/Gemm."""
    dyn: set[str] = set()
    user_skip = set(opts.exclude_nodes)
    if opts.dynamic != "off":
        dyn |= {n.name for n in model.graph if n.op_type == "LSTM" and n.name not in user_skip
                and "LSTM" not in opts.exclude_ops and dynamic_reason(n) is None}
    if opts.dynamic == "on":
        dyn |= {n.name for n in planned.nodes if n.op_type in ("MatMul", "Gemm") and dynamic_reason(n) is None}
    return dyn


def _time_ops(sel: Selector, st: SelectState) -> None:
    """Each weight op timed alone: a slower integer kernel stays float, a faster dynamic form goes dynamic."""
    opts, model = sel.options, sel.model
    anchors = qp.weight_anchors(st.current.nodes)
    st.shapes = capture_shapes(model, st.current.tensors(opts.quantize_outputs), sel.data, sel.context.threads)
    timed = sel.placer.time_layers(model, anchors, sel.ranges, sel.cfg, st.shapes, dynamic=opts.dynamic == "auto")
    st.rows += [t.row() for t in timed.values()]
    for node in anchors:
        t = timed.get(node.name)
        if t is None:
            continue
        if (t.dynamic_ms is not None and dynamic_reason(node) is None and t.dynamic_ms < qp.MARGIN * t.float_ms
                and t.dynamic_ms < t.int8_ms + t.boundary_ms):
            st.dyn.add(node.name)
            st.reasons[node.name] = (f"dynamic int8: {t.dynamic_ms:.3f} ms vs static {t.int8_ms + t.boundary_ms:.3f}"
                                     f" ms alone, float {t.float_ms:.3f} ms")
        elif t.int8_ms > qp.MARGIN * t.float_ms:
            st.reasons[node.name] = f"int8 kernel measured slower: {t.int8_ms:.3f} ms vs {t.float_ms:.3f} ms float"
            st.latency_float.add(node.name)
    st.current = sel.replan(model, set(st.reasons))


def _drop_losing_regions(sel: Selector, st: SelectState) -> None:
    """Regions whose kernel gain does not pay for their entry Q / exit DQ go float, but for the timed ops that pay
    for their own Q and DQ alone (a few rounds: dropping one changes its neighbours' boundaries). On MobileNet-style
    nets a pointwise conv's region spans the HardSwish after it (HardSigmoid stays float, so its Mul adds a Q and
    a DQ) and the depthwise conv next to it (slower in int8 on AVX2): PP-OCRv4 rec, AVX2 host, a region of five
    convs est. -1.205 ms, of which two pointwise convs pay alone (+0.144 and +0.107 ms)."""
    timings, q_out = sel.placer.timings, sel.options.quantize_outputs
    price = qp.boundary_price(timings)
    alone: set[str] = set()
    for _ in range(REGION_ROUNDS):
        losing = [r for r in qp.regions(st.current.nodes, q_out)
                  if any(n.name in timings for n in r) and qp.region_gain(r, timings, st.shapes, price, q_out) <= 0]
        if not losing:
            break
        for region in losing:
            gain = qp.region_gain(region, timings, st.shapes, price, q_out)
            paying = {n.name for n in region if n.name in timings
                      and qp.region_gain([n], timings, st.shapes, price, q_out) > 0} if len(region) > 1 else set()
            alone |= paying
            for node in region:
                if node.name not in paying:
                    st.reasons[node.name] = f"its int8 region does not pay for its Q/DQ (est. {gain:+.3f} ms)"
                    st.latency_float.add(node.name)
        st.current = sel.replan(sel.model, set(st.reasons))
    alone -= set(st.reasons)  # a later round may have sent one back
    if alone:
        st.notes.append(f"{len(alone)} op(s) kept int8 alone from regions that did not pay for their Q/DQ: "
                        + "|".join(sorted(alone)))


def _apply_accuracy_budget(sel: Selector, st: SelectState) -> None:
    """The most sensitive ops (for latency: per ms their int8 kernel saves) stay float until ``max_drop`` holds:
    every own-scale op and weight op is a candidate (shape ops follow their input)."""
    opts, ctx = sel.options, sel.context
    pool = st.pool
    cands = [n.name for n in st.current.nodes if n.op_type not in qdq.SHARED_SCALE_OPS] + sorted(st.dyn)
    rest = pool - set(cands)
    budget = qp.accuracy_budget(ctx, sel.model, cands, lambda m, keep: sel.build_checked(m, keep | rest, st.dyn),
                                ctx.max_drop, opts.min_snr_db, opts.sensitivity_samples, opts.sensitivity_budget_s,
                                opts.budget_samples, lambda m, name: sel.build_one(m, name, st.dyn),
                                _saved_ms(sel.placer.timings, st.dyn) if sel.measure else None)
    st.notes += budget.notes
    st.rows += budget.rows
    st.order = budget.order
    for name in budget.excluded:
        st.reasons[name] = "kept float for the accuracy budget (sensitive on calibration data)"
        st.dyn.discard(name)
    st.current = sel.replan(sel.model, set(st.reasons) | st.dyn)


def _saved_ms(timings: dict[str, qp.LayerTiming], dyn: set[str]) -> dict[str, float]:
    """The ms each timed op's int8 kernel (static, or dynamic for ``dyn``) saves against float."""
    return {name: t.float_ms - (t.dynamic_ms if name in dyn and t.dynamic_ms is not None else t.int8_ms)
            for name, t in timings.items()}


def _choose_whole_model(sel: Selector, st: SelectState) -> None:
    """Whole models decide: the placement or every planned op, in either activation type, timed against float;
    with none faster, the placement backs off region by region."""
    pool = st.pool
    # every planned op int8: what per-op timing rejected comes back (accuracy exclusions stay)
    everything = {n.name for n in sel.replan(sel.model, (set(st.reasons) - st.latency_float) | st.dyn).nodes} | st.dyn
    choices = candidates(pool, everything, sel.cfg.activation_type, sel.options.activation_type == "auto")
    if sel.placer.left() <= 0:  # timing budget spent: still time every planned op against the placement (the base
        # activation type only). Per-op timings on a noisy host can keep a placement slower than its input (PP-OCRv4
        # det, AVX2 host: placements x0.705 and x0.883 of float from two builds, every planned op int8 x0.689; the
        # fused input x0.797)
        choices = [c for c in choices if c.activation_type == sel.cfg.activation_type]
    chosen, ratios = sel.placer.choose(sel.model, choices,
                                       lambda m, c: sel.build(m, set(c.keep), st.dyn, c.activation_type),
                                       sel.data, lambda c: _accepts(sel, st, c))
    if chosen is not None:
        keep, st.act, ratio = set(chosen.keep), chosen.activation_type, ratios[choices.index(chosen)]
        label = "" if chosen is choices[0] else f" ({chosen.label}, {st.act} activations)"
        st.notes.append(f"whole model measured at {ratio:.2f}x float latency{label}")
    else:
        keep = _back_off(sel, st, choices, ratios)
    for name in keep & st.latency_float:
        st.reasons.pop(name, None)  # brought back by the every-planned-op candidate
    for name in (pool | everything) - keep:
        st.reasons.setdefault(name, "back to float: the whole model was not faster with it")
        st.dyn.discard(name)
    st.current = sel.replan(sel.model, ((pool | everything) - keep) | set(st.reasons) | st.dyn)


def _accepts(sel: Selector, st: SelectState, choice: qp.Choice) -> bool:
    """Whether a whole-model choice the budget has not seen keeps ``max_drop`` (checked as it will be emitted)."""
    ctx = sel.context
    if ctx.max_drop is None:
        return True
    row = sens.measure_combination(ctx, sel.model,
                                   [lambda m: sel.build_checked(m, set(choice.keep), st.dyn, choice.activation_type)],
                                   sel.options.budget_samples)
    return sens.holds(row, ctx.max_drop, sel.options.min_snr_db, stressed=True)


def _back_off(sel: Selector, st: SelectState, choices: list[qp.Choice], ratios: list[float]) -> set[str]:
    """Nothing faster: back off region by region from the placement, in its faster activation type; the names
    kept."""
    # Only a type the accuracy budget has judged for this selection (the other one was never checked).
    known, st.act = min((r, c.activation_type) for c, r in zip(choices, ratios)
                        if c.keep == choices[0].keep and c.checked)
    timings, q_out = sel.placer.timings, sel.options.quantize_outputs
    price = qp.boundary_price(timings)
    groups = [(qp.region_gain(r, timings, st.shapes, price, q_out), {n.name for n in r})
              for r in qp.regions(st.current.nodes, q_out)]
    groups += [(timings[n].float_ms - (timings[n].dynamic_ms or 0.0) if n in timings else 0.0, {n}) for n in st.dyn]
    act = st.act
    keep, ratio = sel.placer.back_off(sel.model, groups, lambda m, k: sel.build(m, k, st.dyn, act), sel.data,
                                      known=known)
    if ratio is not None:
        st.notes.append(f"whole model measured at {ratio:.2f}x float latency" + ("" if keep else
                        ": int8 is not faster here, nothing quantized"))
    return keep


def _finish(model: ir.Model, planned: Plan, st: SelectState) -> Selection:
    """The selection: the current plan with the dynamic nodes, each float node's reason, and the weight-only
    nodes of the first plan."""
    current, dyn, reasons = st.current, st.dyn, st.reasons
    current.dynamic = [n for n in model.graph if n.name in dyn]
    for node in list(current.skipped):
        if node.name in reasons and node.name not in dyn:
            current.skipped[node] = reasons[node.name]
    current.skipped = {n: r for n, r in current.skipped.items() if n.name not in dyn}
    current.weight_only = planned.weight_only
    float_list = [n for n, r in reasons.items() if n not in dyn]
    if float_list:
        st.notes.append("kept float by measurement (latency or accuracy): exclude_nodes=" + "|".join(float_list))
    int8 = {n.name for n in current.nodes} | dyn
    return Selection(current, st.rows, st.notes, st.act, [n for n in st.order if n in int8])


def candidates(placement: set[str], everything: set[str], base: str, both_types: bool) -> list[qp.Choice]:
    """The whole-model choices: the placement (checked by the accuracy budget) first, every planned op int8, and
    with ``both_types`` each of them in the other activation type (not checked)."""
    out = [qp.Choice("placement", frozenset(placement), base),
           qp.Choice("every planned op", frozenset(everything), base, checked=False)]
    if both_types:
        out += [dataclasses.replace(c, activation_type=OTHER_TYPE[base], checked=False) for c in out]
    return qp.dedupe(out)
