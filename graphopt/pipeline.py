"""The pipeline: canonicalize, the recipe's passes, cleanup — each verified, gated, and rolled back if it fails.

After every pass: the onnx checker, an onnxruntime session, and the outputs compared with the original model
on the evaluation samples. A pass whose result breaks its budget (its own ``max_drop``, else the run's) or the
worst-channel SNR floor is rolled back and the run goes on. Passes must never modify a weight array in place
(snapshots share tensors); they give an initializer a new tensor instead.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from graphopt import bench, data as datamod, modelio
from graphopt.errors import GraphoptError
from graphopt.metrics import Comparison, Evaluator
from graphopt.passbase import PassContext
from graphopt.recipe import Step, resolve
from graphopt.report import BASELINE, FAILED, KEPT, NO_CHANGE, ROLLED_BACK, PassRow, Report

DEFAULT_MAX_DROP = 0.01
# When no class-score output exists (regression, detection maps), the gate is the worst-channel SNR.
DEFAULT_MIN_SNR_WITHOUT_SCORES = 30.0


@dataclasses.dataclass(frozen=True)
class Gate:
    metric: str  # accuracy | agreement | snr
    max_drop: float
    min_snr: float | None

    def failure(self, comparison: Comparison, budget: float) -> str | None:
        """Why ``comparison`` breaks the gate with ``budget``, or None if it holds."""
        drop = comparison.drop(self.metric) if self.metric != "snr" else None
        if drop is not None and drop > budget + 1e-9:
            return f"{self.metric} drop {drop:.4f} exceeds the budget {budget:g}"
        if self.min_snr is not None and comparison.worst_snr_db < self.min_snr:
            return f"worst-channel SNR {comparison.worst_snr_db:.1f} dB is below {self.min_snr:g} dB"
        return None


@dataclasses.dataclass
class RunOptions:
    threads: int = 1
    latency: bool = True  # measure latency after each kept pass (interleaved with the original)
    latency_repeats: int = 20
    progress: bool = True
    score_output: str | None = None
    debug: bool = False


def machine_line() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}, " \
           f"Python {platform.python_version()}"


class _Materialized:
    """A model serialized once for the checker, onnxruntime and the size column (temp file when large)."""

    def __init__(self, model: ir.Model, tmp: Path):
        self.large = modelio.tensor_bytes(model) > modelio.EXTERNAL_THRESHOLD
        if self.large:
            self.path = tmp / "model.onnx"
            modelio.save_model(model, self.path, external=True)
            self.handle: Any = str(self.path)
            self.nbytes = sum(p.stat().st_size for p in tmp.iterdir())
        else:
            proto = modelio.to_proto(model)
            self.handle = proto
            self.nbytes = proto.ByteSize()

    def check(self) -> None:
        onnx.checker.check_model(self.handle)


class Pipeline:
    def __init__(self, steps: list[Step], gate: Gate, run: RunOptions):
        self.steps, self.gate, self.run = steps, gate, run
        self._last_comparison: Comparison | None = None
        self._bench_feeds: list = []

    def execute(self, model: ir.Model, reference: Any, calib: datamod.Dataset, evaluation: datamod.Dataset,
                report: Report) -> ir.Model:
        # MACs per inference: the first evaluation feed's shapes with one sample.
        shapes = {k: (1, *v.shape[1:]) for k, v in evaluation.feeds[0].items() if v.ndim} if evaluation.feeds else None
        evaluator = Evaluator(reference, evaluation, threads=self.run.threads,
                              score_output=self.run.score_output, progress=self.run.progress)
        self._bench_feeds = evaluation.feeds[:4]
        baseline = evaluator.evaluate(reference, progress=False)
        report.passes.append(self._row("input", BASELINE, 0.0, model, baseline, None, shapes))
        if baseline.value(self.gate.metric) is None and self.gate.metric != "snr":
            self.gate = Gate("snr", self.gate.max_drop, self.gate.min_snr or DEFAULT_MIN_SNR_WITHOUT_SCORES)
            report.metric, report.min_snr = self.gate.metric, self.gate.min_snr
            report.passes[0].notes.append(
                f"no class-score output: the gate is worst-channel SNR >= {self.gate.min_snr:g} dB")
        teacher = None
        self._last_comparison = baseline  # the metrics of the model as it stands
        for step in self.steps:
            snapshot = model.clone()
            budget = step.options.max_drop if step.options.max_drop is not None else self.gate.max_drop
            context = PassContext(calib=calib, teacher=teacher, threads=self.run.threads, metric=self.gate.metric,
                                  score_output=self.run.score_output, max_drop=budget, progress=self.run.progress)
            start = time.perf_counter()
            try:
                result = step.pass_cls(step.options, context)(model)
            except GraphoptError:
                raise
            except Exception as err:  # a pass bug or an unsupported graph: roll back, go on
                model = snapshot
                if self.run.debug:
                    traceback.print_exc()
                row = self._row(step.label(), FAILED, time.perf_counter() - start, model, self._last_comparison,
                                None, shapes)
                row.reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                report.passes.append(row)
                continue
            seconds = time.perf_counter() - start
            row = self._verify(step, result, model, snapshot, evaluator, budget, seconds, shapes, reference)
            report.passes.append(row)
            if row.status == ROLLED_BACK:
                model = snapshot
            if step.name == "canonicalize":
                teacher = model.clone()  # the original, as every later pass sees models
        final_cmp = self._final_comparison(evaluator, model)
        report.final = final_cmp.to_dict()
        report.passed = self.gate.failure(final_cmp, self.gate.max_drop) is None
        return model

    def _final_comparison(self, evaluator: Evaluator, model: ir.Model) -> Comparison:
        with tempfile.TemporaryDirectory(prefix="graphopt-final-") as tmp:
            return evaluator.evaluate(_Materialized(model, Path(tmp)).handle, progress=False)

    def _verify(self, step: Step, result: Any, model: ir.Model, snapshot: ir.Model, evaluator: Evaluator,
                budget: float, seconds: float, shapes: dict | None, reference: Any) -> PassRow:
        label = step.label()
        if not result.modified:
            row = self._row(label, NO_CHANGE, seconds, snapshot, self._last_comparison, None, shapes)
            row.notes, row.rows = list(result.notes), list(result.rows)
            return row
        with tempfile.TemporaryDirectory(prefix="graphopt-verify-") as tmp:
            try:
                mat = _Materialized(model, Path(tmp))
                mat.check()
            except Exception as err:
                return self._broken(label, seconds, snapshot, shapes, result, f"onnx checker: {_first_line(err)}")
            try:
                comparison = evaluator.evaluate(mat.handle, progress=False)
            except Exception as err:
                return self._broken(label, seconds, snapshot, shapes, result,
                                    f"onnxruntime could not run it: {_first_line(err)}")
            failure = self.gate.failure(comparison, budget)
            latency = None
            if failure is None and self.run.latency:
                latency = self._latency(reference, mat.handle, evaluator)
            row = self._row(label, ROLLED_BACK if failure else KEPT, seconds, model, comparison, latency, shapes,
                            file_bytes=mat.nbytes)
        row.reason = failure or ""
        row.notes, row.rows = list(result.notes), list(result.rows)
        if failure is None:
            self._last_comparison = comparison
        return row

    def _broken(self, label: str, seconds: float, snapshot: ir.Model, shapes, result, reason: str) -> PassRow:
        row = self._row(label, ROLLED_BACK, seconds, snapshot, None, None, shapes)
        row.reason, row.notes, row.rows = reason, list(result.notes), list(result.rows)
        return row

    def _latency(self, reference: Any, candidate: Any, evaluator: Evaluator) -> tuple[float, float] | None:
        feeds = self._bench_feeds
        if not feeds:
            return None
        rows = bench.benchmark([reference, candidate], feeds, threads=self.run.threads, warmup=2,
                               repeats=self.run.latency_repeats)
        return rows[1].median_ms, rows[1].ratio

    def _row(self, label: str, status: str, seconds: float, model: ir.Model, comparison: Comparison | None,
             latency: tuple[float, float] | None, shapes: dict | None, file_bytes: int | None = None) -> PassRow:
        try:
            macs = bench.count_macs(model, shapes)
        except Exception:  # MACs are informative; a model shape inference cannot handle has none
            macs = None
        return PassRow(step=label, status=status, seconds=round(seconds, 3), params=bench.count_params(model),
                       file_bytes=file_bytes, macs=macs,
                       metrics=comparison.to_dict() if comparison is not None else None,
                       latency_ms=None if latency is None else round(latency[0], 4),
                       latency_ratio=None if latency is None else round(latency[1], 4))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def optimize(model: str | os.PathLike | ir.Model, output: str | os.PathLike | None = None, *,
             passes: str | list | None = None, recipe: str | os.PathLike | None = None,
             calib: Any = None, data: Any = None, shapes: dict[str, tuple[int, ...]] | None = None,
             max_drop: float = DEFAULT_MAX_DROP, min_snr: float | None = None, metric: str | None = None,
             run: RunOptions | None = None, report_path: str | os.PathLike | None = None) -> Report:
    """Optimize ``model`` with a recipe and write ``output`` atomically; returns the report.

    ``passes`` uses the recipe grammar (CLI string or list), ``recipe`` a YAML/JSON file. ``calib``/``data``:
    an .npz file, a folder of .npz feeds, a CalibrationDataReader or a graphopt.data.Dataset.
    """
    run = run or RunOptions()
    steps = resolve(passes, recipe)  # recipe errors before any work
    if metric is not None and metric not in ("accuracy", "agreement", "snr"):
        raise GraphoptError(f"--metric {metric}: expected accuracy, agreement or snr")
    source = str(model) if not isinstance(model, ir.Model) else (model.graph.name or "<in-memory model>")
    if isinstance(model, ir.Model):
        loaded = model
    else:
        if output is None:
            output = modelio.default_output(model)
        modelio.check_output_path(model, output)
        loaded = modelio.load_model(model)
    if output is not None and not isinstance(model, ir.Model):
        modelio.check_output_path(model, output)
    specs = datamod.input_specs(loaded)
    calib_ds, eval_ds = datamod.resolve(specs, data=data, calib=calib, shapes=shapes)
    needy = [s.name for s in steps if getattr(s.pass_cls, "needs_data", False)]
    if needy and calib_ds.synthetic:
        raise GraphoptError(f"pass {needy[0]!r} needs calibration data: give --calib or --data "
                            "(an .npz with the model's inputs, or a folder of .npz feeds)")
    if metric is None:
        metric = "accuracy" if eval_ds.labels is not None else "agreement"
    if metric == "accuracy" and eval_ds.labels is None:
        raise GraphoptError("--metric accuracy needs labels: the evaluation .npz has no 'labels' key")
    gate = Gate(metric, max_drop, min_snr)
    with tempfile.TemporaryDirectory(prefix="graphopt-ref-") as tmp:
        original = _Materialized(loaded, Path(tmp))
        reference = original.handle  # the original, before any pass
        report = Report(model=source, output=str(output) if output else None, data=eval_ds.describe(),
                        synthetic=eval_ds.synthetic, metric=metric, max_drop=max_drop, min_snr=min_snr,
                        passes=[], machine=machine_line())
        final = Pipeline(steps, gate, run).execute(loaded, reference, calib_ds, eval_ds, report)
        report.passes[0].file_bytes = original.nbytes
    if output is not None:
        modelio.save_model(final, output)
        report.passes[-1].file_bytes = Path(output).stat().st_size
    if report_path is not None:
        report.write_json(report_path)
        report.write_markdown(Path(report_path).with_suffix(".md"))
    return report
