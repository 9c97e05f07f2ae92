"""The selection step of quantize: which planned nodes end up int8 (static or dynamic), and in which
activation type.

In order: LSTMs (and, with ``dynamic=on``, every MatMul/Gemm) go dynamic; with ``target=latency`` each weight op
is timed alone and the ones whose integer kernel is slower (or faster in dynamic int8) are moved, then regions that
do not pay for their Q/DQ go float (:mod:`.quant_placement`); the most sensitive ops stay float until
``max_drop`` holds; finally whole models decide (:meth:`.quant_placement.Placement.choose`): the placement, every
planned op int8 (per-op timings of tiny ops are noise), and with ``activation_type=auto`` both of them with int8
activations as well — int8 activations run VGG's big convs faster on VNNI CPUs but most other conv nets 2-3x
slower, so only a measurement can tell. A candidate the accuracy budget has not seen is checked before it wins.
Every whole-selection accuracy check (``budget_samples`` samples) sees its candidate bias-corrected when
``bias_correction`` is on, as the emitted model will be; the per-op screen (``sensitivity_samples``) does not.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

import onnx_ir as ir

from graphopt import cpu
from graphopt import sensitivity as sens
from graphopt.graphs import name_nodes
from graphopt.passes import calibrate as calib
from graphopt.passes import qdq
from graphopt.passes import quant_dynamic as qd
from graphopt.passes import quant_placement as qp
from graphopt.passes.quant_correct import correct_biases

if TYPE_CHECKING:
    from graphopt.passes.quantize import Plan, Quantize, QuantizeOptions

PlanFn = Callable[[ir.Model, "QuantizeOptions", "dict[str, calib.Range] | None"], "Plan"]
OTHER_TYPE = {"uint8": "int8", "int8": "uint8"}


@dataclasses.dataclass
class Selection:
    plan: Plan
    rows: list[dict]
    notes: list[str]
    activation_type: str  # the activation type to emit (``auto`` resolved)


def select(qpass: Quantize, model: ir.Model, planned: Plan, ranges: dict[str, calib.Range],
           plan_fn: PlanFn) -> Selection:
    """Narrow ``planned`` (see the module doc); ``plan_fn`` is :func:`.quantize.plan`."""
    opts, ctx = qpass.options, qpass.context
    cfg = qpass.config(model)
    base = cfg.activation_type
    name_nodes(model)  # selection works by node name (clones, exclude lists)
    rows: list[dict] = []
    notes: list[str] = []
    reasons: dict[str, str] = {}  # node name → why it went back to float (or dynamic)
    latency_float: set[str] = set()  # the names per-op or per-region timing sent back to float
    user_skip = set(opts.exclude_nodes)
    dyn: set[str] = set()
    if opts.dynamic != "off":
        dyn |= {n.name for n in model.graph if n.op_type == "LSTM" and n.name not in user_skip
                and "LSTM" not in opts.exclude_ops and qd.dynamic_reason(n) is None}
    if opts.dynamic == "on":
        dyn |= {n.name for n in planned.nodes if n.op_type in ("MatMul", "Gemm") and qd.dynamic_reason(n) is None}

    def replan(m: ir.Model, excluded: set[str]) -> Plan:
        return plan_fn(m, dataclasses.replace(opts, exclude_nodes=[*opts.exclude_nodes, *sorted(excluded)]),
                       dict(ranges))

    for name in dyn:
        reasons[name] = "dynamic int8"
    measure = opts.target == "latency"
    if measure:
        measure, note = cpu.placement_note(ctx.target)
        notes.append(note)
    placer = qp.Placement(ctx.threads, opts.latency_budget_s, qpass.layer_timer, qpass.model_timer)
    data = ctx.calib
    current = replan(model, set(reasons))
    shapes: dict[str, tuple] = {}
    if measure and data is not None:
        anchors = qp.weight_anchors(current.nodes)
        shapes = qp.capture_shapes(model, current.tensors(opts.quantize_outputs), data, ctx.threads)
        timed = placer.time_layers(model, anchors, ranges, cfg, shapes, dynamic=opts.dynamic == "auto")
        rows += [t.row() for t in timed.values()]
        for node in anchors:
            t = timed.get(node.name)
            if t is None:
                continue
            if (t.dynamic_ms is not None and qd.dynamic_reason(node) is None and t.dynamic_ms < qp.MARGIN * t.float_ms
                    and t.dynamic_ms < t.int8_ms + t.boundary_ms):
                dyn.add(node.name)
                reasons[node.name] = (f"dynamic int8: {t.dynamic_ms:.3f} ms vs static {t.int8_ms + t.boundary_ms:.3f}"
                                      f" ms alone, float {t.float_ms:.3f} ms")
            elif t.int8_ms > qp.MARGIN * t.float_ms:
                reasons[node.name] = f"int8 kernel measured slower: {t.int8_ms:.3f} ms vs {t.float_ms:.3f} ms float"
                latency_float.add(node.name)
        current = replan(model, set(reasons))
        price = qp.boundary_price(placer.timings)
        for _ in range(4):  # regions whose kernel gain does not pay for their entry Q / exit DQ go float
            losing = [r for r in qp.regions(current.nodes, opts.quantize_outputs)
                      if any(n.name in placer.timings for n in r)
                      and qp.region_gain(r, placer.timings, shapes, price, opts.quantize_outputs) <= 0]
            if not losing:
                break
            for region in losing:
                gain = qp.region_gain(region, placer.timings, shapes, price, opts.quantize_outputs)
                for node in region:
                    reasons[node.name] = f"its int8 region does not pay for its Q/DQ (est. {gain:+.3f} ms)"
                    latency_float.add(node.name)
            current = replan(model, set(reasons))
    pool = {n.name for n in current.nodes} | dyn

    def build(m: ir.Model, keep: set[str], act: str = base) -> None:
        """Emit exactly ``keep`` (static QDQ in ``act`` activations, or dynamic for names in ``dyn``)."""
        p = replan(m, ({n.name for n in m.graph} - keep) | dyn)
        if p.nodes:
            qdq.emit(m, p.nodes, ranges, dataclasses.replace(cfg, activation_type=act))
        qd.emit_dynamic(m, [n for n in m.graph if n.name in keep & dyn], cfg.per_channel, safe_pairs=cfg.safe_pairs)

    # The checks judge the head of the calibration data; their corrections fit its tail, so a check does not
    # grade a correction on the samples it was fitted to (as far as the feeds allow).
    tail = data
    if data is not None and len(data.feeds) > 1:
        tail = data.take_feeds(list(reversed(range(len(data.feeds)))), f"{data.source}, from the end")

    def correct(m: ir.Model) -> None:
        """Bias correction as the final model gets it, on fewer samples (``bias_correction``)."""
        if qpass.correcting():
            correct_biases(model, m, tail, ctx.threads, qpass.check_correction_samples())

    # the accuracy budget: every own-scale op and weight op is a candidate (shape ops follow their input)
    if ctx.max_drop is not None and data is not None and pool:
        cands = [n.name for n in current.nodes if n.op_type not in qdq.SHARED_SCALE_OPS] + sorted(dyn)

        def build_check(m: ir.Model, keep: set[str]) -> None:
            """A whole-selection check: judged as it will be emitted (bias-corrected)."""
            build(m, keep | (pool - set(cands)))
            correct(m)

        def build_one(m: ir.Model, name: str) -> None:
            """The single-op screen: that op alone, uncorrected."""
            if name in dyn:
                qd.emit_dynamic(m, [n for n in m.graph if n.name == name], cfg.per_channel,
                                 safe_pairs=cfg.safe_pairs)
            else:
                qdq.emit(m, [n for n in m.graph if n.name == name], ranges, cfg)

        budget = qp.accuracy_budget(ctx, model, cands, build_check, ctx.max_drop, opts.min_snr_db,
                                    opts.sensitivity_samples, opts.sensitivity_budget_s, opts.budget_samples,
                                    build_one)
        notes += budget.notes
        rows += budget.rows
        for name in budget.excluded:
            reasons[name] = "kept float for the accuracy budget (sensitive on calibration data)"
            dyn.discard(name)
        current = replan(model, set(reasons) | dyn)
        pool = {n.name for n in current.nodes} | dyn
    elif ctx.max_drop is None:
        notes.append("no max_drop in the context: accuracy budget not applied (the pipeline gate still checks)")
    act = base
    if measure and pool and data is not None:
        # every planned op int8: what per-op timing rejected comes back (accuracy exclusions stay)
        everything = {n.name for n in replan(model, (set(reasons) - latency_float) | dyn).nodes} | dyn
        choices = candidates(pool, everything, base, opts.activation_type == "auto")
        if placer.left() <= 0:
            choices = choices[:1]

        def accept(choice: qp.Choice) -> bool:
            if ctx.max_drop is None:
                return True
            def apply(m: ir.Model) -> None:
                build(m, set(choice.keep), choice.activation_type)
                correct(m)
            row = sens.measure_combination(ctx, model, [apply], opts.budget_samples)
            return qp.holds(row, ctx.max_drop, opts.min_snr_db)

        chosen, ratios = placer.choose(model, choices, lambda m, c: build(m, set(c.keep), c.activation_type),
                                       data, accept)
        if chosen is not None:
            keep, act, ratio = set(chosen.keep), chosen.activation_type, ratios[choices.index(chosen)]
            label = "" if chosen is choices[0] else f" ({chosen.label}, {act} activations)"
            notes.append(f"whole model measured at {ratio:.2f}x float latency{label}")
        else:  # nothing faster: back off region by region from the placement, in its faster activation type
            # Only a type the accuracy budget has judged for this selection (the other one was never checked).
            known, act = min((r, c.activation_type) for c, r in zip(choices, ratios)
                             if c.keep == choices[0].keep and c.checked)
            price = qp.boundary_price(placer.timings)
            groups = [(qp.region_gain(r, placer.timings, shapes, price, opts.quantize_outputs), {n.name for n in r})
                      for r in qp.regions(current.nodes, opts.quantize_outputs)]
            groups += [(placer.timings[n].float_ms - (placer.timings[n].dynamic_ms or 0.0)
                        if n in placer.timings else 0.0, {n}) for n in dyn]
            keep, ratio = placer.back_off(model, groups, lambda m, k: build(m, k, act), data, known=known)
            if ratio is not None:
                notes.append(f"whole model measured at {ratio:.2f}x float latency" + ("" if keep else
                             ": int8 is not faster here, nothing quantized"))
        for name in keep & latency_float:
            reasons.pop(name, None)  # brought back by the every-planned-op candidate
        for name in (pool | everything) - keep:
            reasons.setdefault(name, "back to float: the whole model was not faster with it")
            dyn.discard(name)
        current = replan(model, ((pool | everything) - keep) | set(reasons) | dyn)
    notes += placer.notes
    current.dynamic = [n for n in model.graph if n.name in dyn]
    for node in list(current.skipped):
        if node.name in reasons and node.name not in dyn:
            current.skipped[node] = reasons[node.name]
    current.skipped = {n: r for n, r in current.skipped.items() if n.name not in dyn}
    current.weight_only = planned.weight_only
    float_list = [n for n, r in reasons.items() if n not in dyn]
    if float_list:
        notes.append("kept float by measurement (latency or accuracy): exclude_nodes=" + "|".join(float_list))
    return Selection(current, rows, notes, act)


def candidates(placement: set[str], everything: set[str], base: str, both_types: bool) -> list[qp.Choice]:
    """The whole-model choices: the placement (checked by the accuracy budget) first, every planned op int8, and
    with ``both_types`` each of them in the other activation type (not checked)."""
    out = [qp.Choice("placement", frozenset(placement), base),
           qp.Choice("every planned op", frozenset(everything), base, checked=False)]
    if both_types:
        out += [dataclasses.replace(c, activation_type=OTHER_TYPE[base], checked=False) for c in out]
    return qp.dedupe(out)
