"""The pipeline: canonicalize, the recipe's passes, cleanup — each verified, gated, and rolled back if it fails.

After every pass: the onnx checker, an onnxruntime session, and the outputs compared with the original model
on the evaluation samples. A pass whose result breaks its budget (its own ``max_drop``, else the run's) or the
worst-channel SNR floor is rolled back and the run goes on. So is one that makes the model slower than before
it, or than the input, beyond the measured noise (:mod:`graphopt.latency`), unless it aims at size or the run
allows slower models. Passes must never modify a weight array in place
(snapshots share tensors); they give an initializer a new tensor instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import onnx_ir as ir

from graphopt import bench, costs, cpu, data as datamod, modelio
from graphopt.errors import GraphoptError, first_line
from graphopt.latency import MIN_MARGIN, LatencyProbe, Timer, Timing, batch_one
from graphopt.metrics import Comparison, Evaluator, metric_for_gate
from graphopt.metrics.evaluator import Scored, unchanged_outputs
from graphopt.passbase import PassContext
from graphopt.recipe import Step, resolve_recipe
from graphopt.report import BASELINE, FAILED, KEPT, NO_CHANGE, ROLLED_BACK, PassRow, Report
from graphopt.verify import LARGE_BYTES, Checkpoints, Gate, Materialized, is_heavy, release_mapped, release_memory

DEFAULT_MAX_DROP = 0.01

__all__ = ["DEFAULT_MAX_DROP", "Gate", "Pipeline", "RunOptions", "optimize"]


@dataclasses.dataclass
class RunOptions:
    threads: int = 1
    latency: bool = True  # time each kept pass against the original, interleaved (small models; final always)
    latency_repeats: int = 20
    latency_seconds: float = 5.0  # cap on one latency measurement
    progress: bool = True
    score_output: str | None = None
    map_threshold: float = 0.5  # agreement on a one-channel [N, 1, H, W] score output (metrics.MAP_THRESHOLD)
    debug: bool = False
    target_cpu: str | None = None  # graphopt.cpu.TARGETS; None: the recipe's, else portable
    allow_slower: bool = False  # keep passes that make the model slower (the latency guard only reports)
    timer: Timer | None = None  # how models are timed (graphopt.latency); tests inject fake timings


def machine_line() -> str:
    return f"{bench.cpu_name()} (int8 kernels: {cpu.host().isa}), {os.cpu_count()} cores, {platform.system()}, " \
           f"Python {platform.python_version()}"


@dataclasses.dataclass
class _Verdict:
    comparison: Comparison | None
    failure: str | None
    latency: tuple[float, float] | None = None
    timing: Timing | None = None
    session: Any = None  # the candidate's onnxruntime session, the next pass's "before" when it is kept
    nbytes: int | None = None
    materialized: Materialized | None = None  # the candidate's file, when checkpoints live on disk
    scored: Scored | None = None  # its outputs and score by the user's function (a function only)


class Pipeline:
    def __init__(self, steps: list[Step], gate: Gate, run: RunOptions):
        self.steps, self.gate, self.run = steps, gate, run
        self.current: Comparison | None = None  # the metrics of the model as it stands
        self._bench_feeds: list = []
        self._shapes: dict | None = None
        self.model: ir.Model | None = None  # the model as it stands, while execute() runs
        self.in_place = False  # the caller's ir.Model: rewritten in place, rollbacks from in-memory snapshots
        self.probe: LatencyProbe | None = None
        self._before: Any = None  # session of the model as it stands, once a pass was kept (else the original)
        self._ceiling = 1.0  # the input's latency, raised by kept passes that were allowed to be slower
        self._layers_gate = gate  # what passes measure layers with (gate.proxy: not the user's function)
        self._scored: Scored | None = None  # the model as it stands: outputs and the user's score (a function only)

    def execute(self, model: ir.Model, reference: Any, calib: datamod.Dataset, evaluation: datamod.Dataset,
                report: Report, source_bytes: int | None = None, folder: Path | None = None) -> ir.Model:
        """Run the steps on ``model`` (owned from here on) and write their rows into ``report``; the input row
        gets ``source_bytes``. :meth:`record_final` adds what only the written model can tell. Checkpoints of
        large models go to ``folder``, which the caller keeps until the model is saved (its weights may still be
        read from there); without it, to a temporary folder, and the weights are read into memory at the end."""
        # MACs per inference: the first evaluation feed's shapes with one sample.
        self._shapes = {k: (1, *v.shape[1:]) for k, v in evaluation.feeds[0].items() if v.ndim}
        self._bench_feeds = batch_one(datamod.input_specs(model), evaluation.feeds[:4])
        if self.run.latency:
            self.probe = LatencyProbe(self._bench_feeds, self.run.threads, self.run.latency_repeats,
                                      self.run.latency_seconds, self.run.timer)
        evaluator = Evaluator(reference, evaluation, threads=self.run.threads, score_output=self.run.score_output,
                              progress=self.run.progress, map_threshold=self.run.map_threshold, task=self.gate.task)
        self.current = evaluator.evaluate(reference, progress=False, exact=True)
        self._scored = evaluator.latest
        release_memory()
        report.passes.append(self._row("input", BASELINE, 0.0, model))
        report.passes[0].file_bytes = source_bytes
        self.gate, note = self.gate.resolved(self.current)
        self._layers_gate = self.gate.proxy(self.current)
        report.metric, report.min_snr = self.gate.metric, self.gate.min_snr
        if note:
            report.passes[0].notes.append(note)
        teacher, self._shared_teacher = None, None  # the shared one: the evaluator's reference, run as the teacher
        with contextlib.ExitStack() as stack:
            tmp = folder or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="graphopt-run-")))
            # An in-memory model from the caller is rewritten in place, so its state is never swapped for reloads.
            large = modelio.tensor_bytes(model) > LARGE_BYTES and not self.in_place
            self._checkpoints = Checkpoints(tmp, large, reference)
            report.passes[0].notes.append(self._guard_note(is_heavy(model)))
            self.model, model = model, None  # only self.model may hold it: large runs free it while verifying
            for step in self.steps:
                self._step(step, teacher, calib, evaluator, reference, report)
                if step.name == "canonicalize" and not calib.synthetic:
                    teacher = self.model.clone()  # the original as later passes see models; tensors are shared
                    # its outputs are the reference's: passes run the evaluator's recorded reference session
                    self._shared_teacher = evaluator.recorded_reference if unchanged_outputs(self.current) else None
                release_mapped(self.model, teacher)  # what this pass read of a weights file leaves the resident size
            model, self.model = (self.model if folder is not None else _in_memory(self.model)), None
        if self.gate.metric == "task":  # once, of the final model: it runs the user's function twice more
            self.current.stressed_task = evaluator.stressed_task(model)
        report.final = self.current.to_dict()
        if self.gate.metric != "snr":
            report.final_drop = self.current.drop(self.gate.metric)
            report.final_stressed_drop = self.current.drop(self.gate.metric, stressed=True)
        report.final_spread = self.current.spread(self.gate.metric)
        report.passed = self.gate.failure(self.current, self.gate.max_drop) is None
        return model

    def _step(self, step: Step, teacher: ir.Model | None, calib: datamod.Dataset, evaluator: Evaluator,
              reference: Any, report: Report) -> None:
        self._checkpoints.before(self.model)
        budget = step.options.max_drop if step.options.max_drop is not None else self.gate.max_drop
        layers = self._layers_gate
        context = PassContext(calib=calib, teacher=teacher, threads=self.run.threads, metric=layers.metric,
                              score_output=self.run.score_output, map_threshold=self.run.map_threshold,
                              max_drop=budget, min_snr=layers.min_snr, progress=self.run.progress,
                              task=self.gate.task, task_reference=self.current.reference_task,
                              shared_teacher_session=self._shared_teacher,
                              target=cpu.resolve_target(self.run.target_cpu),
                              # heavy models are timed only at the end: two sessions would not fit
                              latency=None if self._checkpoints.on_disk or is_heavy(self.model) else self.probe)
        start = time.perf_counter()
        try:
            instance = step.pass_cls(step.options, context)
            slower_ok = self.run.allow_slower or instance.accepts_slower()
            result = instance(self.model)
        except GraphoptError:
            raise
        except Exception as err:  # a pass bug or an unsupported graph: roll back, go on
            if self.run.debug:
                traceback.print_exc()
            self.model = self._checkpoints.restore()
            row = self._row(step.label(), FAILED, time.perf_counter() - start, self.model)
            row.reason = first_line(err)
            report.passes.append(row)
            return
        seconds = time.perf_counter() - start
        notes, rows = list(result.notes), list(result.rows)
        modified = result.modified
        del result  # it holds the model
        release_mapped(teacher)  # its pages of the weights file, read through the model it shares tensors with
        if not modified:
            row = self._row(step.label(), NO_CHANGE, seconds, self.model)
        else:
            params_macs = self._params_macs(self.model)
            verdict = self._verify(evaluator, budget, reference, slower_ok, step.pass_cls.exact)
            kept = verdict.failure is None
            if kept:
                self.current, self._scored = verdict.comparison, verdict.scored
                self._kept_timing(verdict, slower_ok)
            if self.model is None or not kept:  # freed while verifying, or rolled back
                self.model = (self._checkpoints.keep(verdict.materialized) if kept
                              else self._checkpoints.restore())
            row = self._row(step.label(), KEPT if kept else ROLLED_BACK, seconds, None, verdict.comparison,
                            verdict.latency, verdict.nbytes, params_macs if kept else None)
            row.reason = verdict.failure or ""
            if verdict.timing is not None:
                row.latency_vs_before = round(verdict.timing.vs_before.value, 4)
                row.latency_noise = round(verdict.timing.vs_before.margin, 4)
                if kept and slower_ok and verdict.timing.vs_before.slower:
                    row.notes.append(f"slower than before it, {verdict.timing.vs_before.describe()}: kept, "
                                     + ("--allow-slower" if self.run.allow_slower else "the pass aims at size"))
            release_memory()
        row.notes, row.rows = row.notes + notes, rows
        report.passes.append(row)

    def _verify(self, evaluator: Evaluator, budget: float, reference: Any, slower_ok: bool,
                exact: bool = False) -> _Verdict:
        """Check, run and gate ``self.model`` (``exact``: made by an exact pass, see Evaluator.evaluate). With
        checkpoints on disk the in-memory model is freed once it is written, so onnxruntime's copy of the weights
        does not sit beside it; the caller reloads."""
        on_disk = self._checkpoints.on_disk
        with tempfile.TemporaryDirectory(prefix="graphopt-verify-") as tmp:
            folder = self._checkpoints.folder_for_candidate() if on_disk else Path(tmp)
            try:
                mat = Materialized(self.model, folder, to_file=on_disk)
                mat.check()
            except Exception as err:
                return _Verdict(None, f"onnx checker: {first_line(err)}")
            if on_disk:
                self.model = None
                release_memory()
            try:
                session = mat.session(self.run.threads)
                comparison = evaluator.evaluate(session, progress=False, exact=exact, since=self._scored)
            except Exception as err:
                return _Verdict(None, f"onnxruntime could not run it: {first_line(err)}", materialized=mat)
            verdict = _Verdict(comparison, self.gate.failure(comparison, budget), nbytes=mat.nbytes,
                               materialized=mat, scored=evaluator.latest)
            if verdict.failure is None and self.probe is not None and not mat.heavy:
                self._guard(verdict, reference, session, slower_ok)
        return verdict

    def _guard(self, verdict: _Verdict, reference: Any, session: Any, slower_ok: bool) -> None:
        """Time the candidate against the model before it (and the input); fail it when slower."""
        if self._before is None:
            timing = self.probe.compare(reference, session)
        else:
            timing = self.probe.compare(self._before, session, original=reference)
        verdict.timing, verdict.session = timing, session
        verdict.latency = (timing.candidate_ms, timing.vs_original.value)
        if slower_ok:
            return
        if timing.vs_before.slower:
            verdict.failure = f"slower than before it: {timing.vs_before.describe()}"
        elif timing.vs_original.value > self._ceiling * (1.0 + timing.vs_original.margin):
            verdict.failure = f"slower than the input: {timing.vs_original.describe()}"

    def _kept_timing(self, verdict: _Verdict, slower_ok: bool) -> None:
        if verdict.timing is None:  # not timed (a large model): later passes are timed against the input
            self._before = None
            return
        self._before = verdict.session
        if slower_ok:
            self._ceiling = max(self._ceiling, verdict.timing.vs_original.value)

    def _guard_note(self, heavy: bool) -> str:
        if self.probe is None:
            return "latency guard off: no timing (--no-latency)"
        if heavy:
            return "latency guard off: the model is too large to time each pass; only the final model is timed"
        allowed = " (--allow-slower: slower passes are kept and noted)" if self.run.allow_slower else ""
        return (f"latency guard: a pass slower than the model before it, or than the input, beyond the noise "
                f"margin (at least {MIN_MARGIN:.0%}) is rolled back, unless it aims at size{allowed}")

    def _latency(self, reference: Any, candidate: Any, interleaved: bool = True) -> tuple[float, float] | None:
        """Median ms of ``candidate`` and its ratio to ``reference``: interleaved, or one model after the
        other when two sessions of a large model would not fit beside each other."""
        if not self._bench_feeds:
            return None
        timing = dict(threads=self.run.threads, warmup=2, repeats=self.run.latency_repeats,
                      max_time_s=self.run.latency_seconds, stats=False)
        if interleaved:
            rows = bench.benchmark([reference, candidate], self._bench_feeds, **timing)
            return rows[1].median_ms, rows[1].ratio
        first = bench.benchmark([reference], self._bench_feeds, **timing)[0].median_ms
        release_memory()
        second = bench.benchmark([candidate], self._bench_feeds, **timing)[0].median_ms
        return second, second / first

    def record_final(self, report: Report, reference: Any, final: Any, heavy: bool, saved_bytes: int | None) -> None:
        """The written model's size on the last row, and the final model (a file, or a proto) timed against the
        original on the last kept pass's row when per-pass timing did not measure it (large models). Large
        models are timed one after the other: two sessions would not fit together."""
        if saved_bytes is not None:
            report.passes[-1].file_bytes = saved_bytes
        kept = [row for row in report.passes if row.status == KEPT]
        if not self.run.latency or not kept or kept[-1].latency_ms is not None:
            return
        last = kept[-1]
        latency = self._latency(reference, final, interleaved=not heavy)
        if latency is not None:
            last.latency_ms, last.latency_ratio = round(latency[0], 4), round(latency[1], 4)
            last.notes.append("latency: the final model against the original"
                              + (", one after the other" if heavy else ""))
            if latency[1] > 1.0 + MIN_MARGIN and not self.run.allow_slower:
                last.notes.append(f"the final model is slower than the input (x{latency[1]:.3f}): this model was "
                                  "too large to time each pass, so no pass was rolled back for it")

    def _params_macs(self, model: ir.Model) -> tuple[int, int | None]:
        try:
            macs = costs.count_macs(model, self._shapes)
        except Exception:  # MACs are informative; a model shape inference cannot handle has none
            macs = None
        return costs.count_params(model), macs

    def _row(self, label: str, status: str, seconds: float, model: ir.Model | None,
             comparison: Comparison | None = None, latency: tuple[float, float] | None = None,
             file_bytes: int | None = None, params_macs: tuple[int, int | None] | None = None) -> PassRow:
        comparison = comparison if comparison is not None else (self.current if status != ROLLED_BACK else None)
        if params_macs is None:
            params_macs = self._params_macs(model if model is not None else self.model)
        return PassRow(step=label, status=status, seconds=round(seconds, 3), params=params_macs[0],
                       file_bytes=file_bytes, macs=params_macs[1],
                       metrics=comparison.to_dict() if comparison is not None else None,
                       latency_ms=None if latency is None else round(latency[0], 4),
                       latency_ratio=None if latency is None else round(latency[1], 4))


def _in_memory(model: ir.Model) -> ir.Model:
    """Read tensors still backed by a checkpoint file into memory, before its folder is deleted."""
    for graph in [model.graph, *model.graph.subgraphs()]:
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                old = value.const_value
                tensor = ir.tensor(old.numpy().copy(), name=old.name)
                tensor.metadata_props.update(old.metadata_props)
                value.const_value = tensor
    return model


def _load(model: str | os.PathLike | ir.Model, output: str | os.PathLike | None) -> tuple[ir.Model, Any]:
    """The model to optimize, and the `output` path after the checks on it."""
    if isinstance(model, ir.Model):
        return model, output
    if output is None:
        output = modelio.default_output(model)
    modelio.check_output_path(model, output)
    return modelio.load_model(model), output


def _check_run_values(max_drop: float, min_snr: float | None, synthetic_samples: int, run: RunOptions) -> None:
    """The same refusals for the API as for the CLI, before any work."""
    if not 0.0 <= max_drop <= 1.0:
        raise GraphoptError(f"--max-drop {max_drop}: expected a fraction between 0 and 1 (0.01 = one point)")
    if min_snr is not None and not -1000.0 <= min_snr <= 1000.0:
        raise GraphoptError(f"--min-snr {min_snr}: expected decibels (for example 30)")
    if synthetic_samples < 1:
        raise GraphoptError(f"--samples {synthetic_samples}: expected at least 1")
    if run.threads < 1:
        raise GraphoptError(f"--threads {run.threads}: expected at least 1")


def optimize(model: str | os.PathLike | ir.Model, output: str | os.PathLike | None = None, *,
             passes: str | list | None = None, recipe: str | os.PathLike | None = None,
             calib: Any = None, data: Any = None, shapes: dict[str, tuple[int, ...]] | None = None,
             max_drop: float = DEFAULT_MAX_DROP, min_snr: float | None = None, metric: str | None = None,
             run: RunOptions | None = None, report_path: str | os.PathLike | None = None,
             synthetic_samples: int = 8, target_cpu: str | None = None, metric_fn: Any = None) -> Report:
    """Optimize ``model`` with a recipe and write ``output`` atomically; returns the report.

    ``passes`` uses the recipe grammar (CLI string or list), ``recipe`` a YAML/JSON file. ``calib``/``data``:
    an .npz file, a folder of .npz feeds, a CalibrationDataReader or a graphopt.data.Dataset. A model given
    by path is never touched. An in-memory ``model`` may be modified; the optimized ir.Model is
    ``report.optimized`` (a rollback replaces the model object, so read it there). ``target_cpu``
    (:data:`graphopt.cpu.TARGETS`; else the run's, the recipe's, or ``portable``) is the CPU the model is built for.
    ``metric_fn`` (a function of an onnxruntime session, or "module:function"; :mod:`graphopt.metrics.task`)
    puts the budget on the user's own score: the gate metric is then ``task``.
    """
    run = run or RunOptions()
    _check_run_values(max_drop, min_snr, synthetic_samples, run)
    steps, recipe_target = resolve_recipe(passes, recipe)  # recipe errors before any work
    target = cpu.resolve_target(target_cpu or run.target_cpu or recipe_target)
    run = dataclasses.replace(run, target_cpu=target.name)
    task = metric_for_gate(metric, metric_fn)
    source = str(model) if not isinstance(model, ir.Model) else (model.graph.name or "<in-memory model>")
    loaded, output = _load(model, output)
    specs = datamod.input_specs(loaded)
    calib_ds, eval_ds = datamod.resolve(specs, data=data, calib=calib, shapes=shapes,
                                        synthetic_samples=synthetic_samples)
    if calib_ds.synthetic:
        for step in steps:
            if why := step.pass_cls.needs_data(step.options):
                raise GraphoptError(f"pass {step.label()!r} needs calibration data ({why}): give --calib or --data "
                                    "(an .npz with the model's inputs, or a folder of .npz feeds)")
    if metric == "accuracy" and eval_ds.labels is None:
        raise GraphoptError("--metric accuracy needs labels: the evaluation .npz has no 'labels' key")
    report = Report(model=source, output=str(output) if output else None, data=eval_ds.describe(),
                    synthetic=eval_ds.synthetic, metric=metric or "", max_drop=max_drop, min_snr=min_snr, passes=[],
                    machine=machine_line(), target_cpu=target.describe())
    pipeline = Pipeline(steps, Gate(metric, max_drop, min_snr, task), run)
    pipeline.in_place = isinstance(model, ir.Model)
    with tempfile.TemporaryDirectory(prefix="graphopt-ref-") as tmp:
        if isinstance(model, ir.Model):  # the original must outlive the in-place rewrites
            original = Materialized(loaded, Path(tmp))
            reference, original_bytes = original.handle, original.nbytes
        else:  # onnxruntime reads the untouched input file itself
            reference, original_bytes = str(model), loaded.graph.meta.get(modelio.SOURCE_BYTES)
        holder = [loaded]
        del loaded  # execute() owns the model now: large runs swap it for checkpoint reloads and free this one
        # checkpoints live until the save: a large final model's weights are copied from its checkpoint file, not
        # read into memory first (2.4 GB MLP: 2.4 GB less at the end of the run)
        work = Path(tmp) / "run"
        work.mkdir()
        final = pipeline.execute(holder.pop(), reference, calib_ds, eval_ds, report, original_bytes, folder=work)
        report.optimized = final if pipeline.in_place else None  # not a field: never serialized
        heavy = is_heavy(final)
        if output is not None:
            modelio.save_model(final, output)
            if not isinstance(model, ir.Model):
                del final  # time the written file, without the in-memory copy beside onnxruntime's
                release_memory()
            pipeline.record_final(report, reference, str(output), heavy, modelio.saved_bytes(output))
        else:
            with tempfile.TemporaryDirectory(prefix="graphopt-final-") as final_tmp:
                pipeline.record_final(report, reference, Materialized(final, Path(final_tmp)).handle, heavy, None)
    if report_path is not None:
        report.write_json(report_path)
        report.write_markdown(Path(report_path).with_suffix(".md"))
    return report
