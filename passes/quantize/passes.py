"""The quantize family's passes: quantize (static int8 QDQ), quantize_dynamic and bias_correct.

:class:`Quantize` runs in separable steps, so placement and accuracy budgets can replace one of them:

1. :func:`.plan.plan` decides which nodes may be quantized and why the others stay float.
2. :meth:`Quantize.calibrate` measures the ranges of the tensors the plan needs (:mod:`.calibrate`).
3. :func:`.select.select` narrows the plan: MatMul/Gemm/LSTM that run faster in dynamic int8 go to
   :mod:`.dynamic` (``dynamic``), ops whose int8 kernel or int8 region is measured slower than float stay float
   (``target=latency``, :mod:`.placement`), the most sensitive ops (with ``target=latency``: per ms their int8
   kernel saves) stay float until ``max_drop`` holds on calibration data, and whole models decide: the placement
   or every planned op, uint8 or int8 activations (``activation_type=auto``), whichever measures fastest inside
   the budget.
4. :func:`.qdq.emit` writes exactly the chosen nodes with the given ranges.
5. ``bias_correction``: :func:`.correct.correct_biases` subtracts each int8 layer's mean output shift (against
   the model before quantize) from its bias, and marks the model so ``bias_correct`` leaves it alone. The
   accuracy budget's whole-selection checks correct their candidates the same way (on fewer samples), so the
   budget judges the model that is emitted; the per-op sensitivity screen stays uncorrected.
6. With the teacher in the context, the emitted model itself is checked against ``max_drop``: corrected on more
   samples than the checks were, it can land past the budget's edge. Then the next most sensitive int8 ops go
   float and the float model is emitted again (:meth:`Quantize._emit_within_budget`).

:class:`QuantizeDynamic` emits :mod:`.dynamic`'s int8 forms where :mod:`.placement` measures them faster;
:class:`BiasCorrect` corrects a model quantized earlier in the pipeline (:mod:`.correct`).
"""

from __future__ import annotations

import collections
import dataclasses

import onnx_ir as ir

from graphopt import cpu
from graphopt import sensitivity as sens
from graphopt.errors import GraphoptError
from graphopt.graphs import default_opset, infer_shapes
from graphopt.passbase import GraphoptPass, GraphoptResult
from graphopt.passes.quantize import qdq
from graphopt.passes.quantize.calibrate import Range, calibrate
from graphopt.passes.quantize.correct import MARKER, correct_biases, is_corrected, mark_corrected
from graphopt.passes.quantize.dynamic import candidates as dynamic_candidates
from graphopt.passes.quantize.dynamic import emit_dynamic
from graphopt.passes.quantize.intweights import reusing
from graphopt.passes.quantize.options import BiasCorrectOptions, QuantizeDynamicOptions, QuantizeOptions
from graphopt.passes.quantize.placement import Placement
from graphopt.passes.quantize.plan import Plan, already_quantized, plan
from graphopt.passes.quantize.select import Selection, replan, select


FINAL_RETRIES = 3  # checks of the emitted model, each of which may send more ops to float (1, then 2, then 4)


class Quantize(GraphoptPass):
    """Static int8 QDQ: per-channel int8 weights, int32 bias, calibrated uint8/int8 activations."""

    name = "quantize"
    summary = "static int8 (QDQ): int8 per-channel weights, int32 bias, calibrated activations"
    Options = QuantizeOptions
    data_required = True
    exact = False

    def accepts_slower(self) -> bool:
        return self.options.target == "size"

    # --- hooks ------------------------------------------------------------------------------------------
    def plan(self, model: ir.Model, ranges: dict[str, Range] | None = None) -> Plan:
        return plan(model, self.options, ranges)

    def calibrate(self, model: ir.Model, names: list[str]) -> dict[str, Range]:
        data = self.context.require_calib(self.name)
        return calibrate(model, names, data, self.options.calibration, self.options.percentile,
                         threads=self.context.threads, max_samples=self.options.calib_samples,
                         progress=self.context.progress)

    def correcting(self) -> bool:
        """Bias correction applies: asked for and calibration data at hand."""
        return self.options.bias_correction and self.context.calib is not None

    def check_correction_samples(self) -> int:
        """Samples for the corrections inside the budget's checks (cheaper than the final one)."""
        return min(self.options.correction_samples, max(4, self.options.correction_samples // 4))

    layer_timer = None  # tests inject fake timings (see placement.LayerTimer / ModelTimer)
    model_timer = None

    def select(self, model: ir.Model, planned: Plan, ranges: dict[str, Range]) -> Selection:
        """Latency placement, dynamic int8, the accuracy budget and the activation type (:func:`.select.select`)."""
        placer = Placement(self.context.threads, self.options.latency_budget_s, self.layer_timer, self.model_timer)
        correct_samples = self.check_correction_samples() if self.correcting() else None
        return select(model, planned, ranges, self.options, self.context, self.config(model), placer,
                      correct_samples)

    def config(self, model: ir.Model) -> qdq.QdqConfig:
        """The emission config; ``activation_type=auto`` starts from uint8 (what x86 runs fast on most nets)."""
        opset = default_opset(model, 0)
        act = "uint8" if self.options.activation_type == "auto" else self.options.activation_type
        return qdq.QdqConfig(act, self.options.per_channel and opset >= 13, self.options.quantize_outputs,
                             self.context.target.saturates)

    # --- the pass -----------------------------------------------------------------------------------------
    def call(self, model: ir.Model) -> GraphoptResult:
        with reusing():  # every candidate clone shares the weights: each is quantized once
            return self._quantize(model)

    def _quantize(self, model: ir.Model) -> GraphoptResult:
        note = already_quantized(model)
        if note:
            return self.result(model, [], [note], modified=False)
        notes: list[str] = []
        if any(v.dtype is None for node in model.graph for v in node.outputs):
            shape_note = infer_shapes(model)
            if shape_note:
                notes.append(shape_note)
        if any(n.op_type == "BatchNormalization" for n in model.graph):
            notes.append("BatchNormalization present: run fold_batchnorm before quantize, else Conv-BN-Relu chains "
                         "cannot fuse into integer kernels (slower than float)")
        first = self.plan(model)
        ranges: dict[str, Range] = {}
        if first.nodes:
            ranges = self.calibrate(model, first.tensors(self.options.quantize_outputs))
        chosen = self.select(model, self.plan(model, ranges), ranges)
        final = chosen.plan
        notes += chosen.notes
        cfg = dataclasses.replace(self.config(model), activation_type=chosen.activation_type)
        if self.options.per_channel and not cfg.per_channel:
            notes.append("opset < 13: per-axis DequantizeLinear needs 13 (run canonicalize); weights per tensor")
        final, rows, emit_notes = self._emit_within_budget(model, final, ranges, cfg, chosen.spare)
        notes += emit_notes
        skipped_rows = [{"node": n.name, "op": n.op_type, "action": "float", "reason": r}
                        for n, r in final.skipped.items()]
        modified = bool(rows)
        counts = collections.Counter(r["op"] for r in rows if r["action"] == "int8")
        if counts:
            ops = ", ".join(f"{op} x{n}" for op, n in counts.most_common())
            notes.append(f"int8 ({cfg.activation_type} activations, {self.options.calibration} "
                         f"calibration): {ops}")
        if final.weight_only:
            notes.append(f"{len(final.weight_only)} node(s) inside If/Loop bodies: int8 weights only (float "
                         "activations; subgraph values cannot be calibrated)")
        if skipped_rows:
            notes.append(f"{len(skipped_rows)} node(s) stay float (see rows for the reason)")
        if not modified:
            notes.append("nothing to quantize")
        return self.result(model, rows + skipped_rows + chosen.rows, notes, modified=modified)

    def _emit(self, model: ir.Model, final: Plan, ranges: dict[str, Range], cfg: qdq.QdqConfig,
              reference: ir.Model | None) -> tuple[list[dict], list[str]]:
        """Emit ``final`` into ``model``, then bias correction against the float ``reference``: rows and notes."""
        rows = qdq.emit(model, final.nodes, ranges, cfg, self.mark) if final.nodes else []
        rows += qdq.emit_weights_only(final.weight_only, cfg, self.mark)
        if final.dynamic:
            rows += emit_dynamic(model, final.dynamic, cfg.per_channel, self.mark, cfg.safe_pairs)
        if not (reference is not None and self.correcting() and final.nodes):
            return rows, []
        fixed, notes = correct_biases(reference, model, self.context.calib, self.context.threads,
                                      self.options.correction_samples, mark=self.mark)
        rows += _merge_correction(rows, fixed)
        if any(r["action"] == "bias corrected" for r in fixed):
            mark_corrected(model, self.name)
        return rows, notes

    def _emit_within_budget(self, model: ir.Model, final: Plan, ranges: dict[str, Range], cfg: qdq.QdqConfig,
                            spare: list[str]) -> tuple[Plan, list[dict], list[str]]:
        """:meth:`_emit`, then the emitted model checked against ``max_drop`` (against the float teacher): the
        budget's checks correct biases on fewer samples than the emitted model, so it can land past the budget's
        edge (PP-OCRv4 rec, AMX host: the checks held, the emitted model dropped 4 lines of 300 where 3 was the
        budget, and the gate threw all of int8 away). Then the next ``spare`` names (1, 2, 4, … at a time, most
        sensitive first) go float and the float model is emitted again, at most FINAL_RETRIES times."""
        ctx = self.context
        checking = bool(spare) and ctx.max_drop is not None and ctx.calib is not None and ctx.teacher is not None
        pristine = model.clone() if final.nodes and (checking or self.correcting()) else None
        rows, notes = self._emit(model, final, ranges, cfg, pristine)
        retried: list[str] = []
        for attempt in range(FINAL_RETRIES):  # the model emitted last is left to the pipeline's gate
            if not (checking and final.nodes and spare):
                break
            row = sens.measure_combination(ctx, model, [lambda m: None], self.options.budget_samples)
            if sens.holds(row, ctx.max_drop, self.options.min_snr_db, stressed=True):
                break
            more, spare = spare[:2 ** attempt], spare[2 ** attempt:]
            retried.append(f"{'|'.join(more)} back to float{sens.check_text(row)}")  # what the check that broke saw
            fresh = pristine.clone()  # back to float in place (an in-place pass keeps its model object)
            fresh.graph.meta.update(model.graph.meta)
            model.graph = fresh.graph
            final = _narrowed(model, final, set(more), ranges, self.options)
            rows, notes = self._emit(model, final, ranges, cfg, pristine)
        if retried:
            notes.insert(0, "the emitted model broke max_drop where the budget's checks held (they correct biases on "
                            "fewer samples): " + "; ".join(retried))
        return final, rows, notes


def _narrowed(model: ir.Model, final: Plan, more: set[str], ranges: dict[str, Range], opts: QuantizeOptions) -> Plan:
    """``final`` on a fresh float ``model`` (nodes found by name) without the names in ``more``."""
    static = {n.name for n in final.nodes} - more
    dynamic = {n.name for n in final.dynamic} - more
    narrowed = replan(model, opts, ranges, {n.name for n in model.graph} - static)
    narrowed.dynamic = [n for n in model.graph if n.name in dynamic]
    # the earlier reasons (read by name and op type only), and the new ones
    narrowed.skipped = {**final.skipped, **{n: "kept float: the emitted model broke max_drop with it int8"
                                            for n in model.graph if n.name in more}}
    return narrowed


def _merge_correction(rows: list[dict], fixed: list[dict]) -> list[dict]:
    """Bias-correction rows go into their node's int8 row (key ``bias_correction``: one row per node); the
    ones without an int8 row are returned."""
    int8 = {r["node"]: r for r in rows if r.get("action") == "int8"}
    left = []
    for r in fixed:
        target = int8.get(r.get("node"))
        if target is None:
            left.append(r)
        else:
            target["bias_correction"] = {k: v for k, v in r.items() if k not in ("node", "op")}
    return left


class QuantizeDynamic(GraphoptPass):
    """int8 weights with run-time activation quantization for MatMul/Gemm/LSTM, placed where it is faster."""

    name = "quantize_dynamic"
    summary = "dynamic int8: int8 weights, activations quantized at run time (MatMul, Gemm, LSTM)"
    Options = QuantizeDynamicOptions
    exact = False
    layer_timer = None  # tests inject fake timings (placement.LayerTimer / ModelTimer)
    model_timer = None

    def accepts_slower(self) -> bool:
        return self.options.target == "size"

    def call(self, model: ir.Model) -> GraphoptResult:
        with reusing():  # the timing models and the emitted model share the weights: each is quantized once
            return self._quantize(model)

    def _quantize(self, model: ir.Model) -> GraphoptResult:
        note = already_quantized(model)
        if note:
            return self.result(model, [], [note], modified=False)
        opts = self.options
        nodes = dynamic_candidates(model, opts.exclude_nodes, opts.exclude_ops)
        notes: list[str] = []
        if not nodes:
            return self.result(model, [], ["nothing to quantize: no MatMul/Gemm/LSTM with constant float weights"],
                               modified=False)
        calib = self.context.calib
        timed = opts.target == "latency" and calib is not None and not calib.synthetic
        if timed:
            timed, note = cpu.placement_note(self.context.target)
            notes.append(note)
        if timed:
            placer = Placement(self.context.threads, opts.latency_budget_s, self.layer_timer, self.model_timer)
            nodes, place_rows, place_notes = placer.place_dynamic(model, nodes, calib, opts.per_channel,
                                                                  self.context.target.saturates)
            notes += place_notes
        else:
            place_rows = []
            if opts.target == "latency" and (calib is None or calib.synthetic):
                notes.append("no calibration data to time on: every candidate quantized (target=latency unmeasured)")
        rows = emit_dynamic(model, nodes, opts.per_channel, self.mark, self.context.target.saturates)
        if not rows:
            notes.append("nothing quantized: no candidate was measured faster than float")
        return self.result(model, rows + place_rows, notes, modified=bool(rows))


class BiasCorrect(GraphoptPass):
    """Empirical bias correction after quantize: per-channel output mean shifts subtracted from biases."""

    name = "bias_correct"
    summary = "after quantize: subtract each int8 layer's per-channel output mean shift (vs float) from its bias"
    Options = BiasCorrectOptions
    data_required = True
    exact = False

    def call(self, model: ir.Model) -> GraphoptResult:
        by = is_corrected(model)
        if by:
            return self.result(model, [], [f"biases already corrected by {by} (metadata_props {MARKER!r}): nothing "
                                           "done (correcting twice would subtract each shift twice)"], modified=False)
        data = self.context.require_calib(self.name)
        if self.context.teacher is None:
            raise GraphoptError("pass 'bias_correct' needs the float teacher (run it in a pipeline with real "
                                "calibration data, after quantize)")
        if not any(n.op_type == "DequantizeLinear" for n in model.graph):
            return self.result(model, [], ["no QDQ in the model: run quantize before bias_correct"], modified=False)
        rows, notes = correct_biases(self.context.teacher, model, data, self.context.threads, self.options.samples,
                                     self.options.waves, self.options.max_rel_error, self.mark)
        modified = any(r["action"] == "bias corrected" for r in rows)
        if modified:
            mark_corrected(model, self.name)
        return self.result(model, rows, notes, modified=modified)
