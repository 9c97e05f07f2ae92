"""One case of the generated-graph run: a generated model and a recipe go through ``graphopt.optimize`` from a
file, and the invariants below are checked. Pure: it returns an :class:`Outcome` (events, notes, the first
finding) instead of calling hypothesis, so it can run in the isolated worker (isolation.py).

What must hold, whatever the model:
- no exception escapes but a one-line GraphoptError, and the input file's bytes are unchanged; and since every
  model is valid, its data fits it and the recipe grammar took the options, even a GraphoptError is a finding;
- no pass row is ``failed`` (a pass raised and the pipeline rolled it back: a bug, shown with its reason), and
  no exact step (canonicalize, cleanup, an exact pass) is rolled back while no lossy pass was kept before it:
  the gate then only rejects an exact rewrite that is not exact, or one the checker or onnxruntime refuses
  (after a kept lossy pass the model may sit at the budget's edge, where rounding may tip a sample);
- ``report.passed``: the pipeline keeps a pass only when the gate holds on its result with the run's budget (no
  step gets its own ``max_drop`` here) and the input meets the gate against itself, so the final model does;
- the written model passes onnx.checker and runs in onnxruntime with the input's output names and shapes;
- exact recipes keep the outputs within RTOL/ATOL_OF_SCALE of the input model on the calibration feeds."""

from __future__ import annotations

import dataclasses
import tempfile
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import graphopt
import graphopt.pipeline
from graphopt.errors import GraphoptError, first_line
from graphopt.report import FAILED, KEPT, ROLLED_BACK, Report
from tests.fuzz.strategies import GeneratedModel, is_exact
from tests.helpers import assert_same_outputs, run_model

SAMPLES = 32  # calibration (and evaluation) samples per run: enough rows for small refits, cheap to run

# Exact passes may change the order of float32 operations, never what they compute. The worst honest change is
# a fold (BatchNormalization into a conv: w·γ/√(σ²+ε)) or a fused op (Gelu's kernel for Erf) rounding
# differently: a few ulps (1e-7 relative) per op, amplified by sums over fan-ins ≤ 16·3·3 and a dozen layers
# whose weights keep activations near unit scale — about 1e-5 of the output scale at worst. 1e-4 of the scale
# (plus 1e-3 relative) is ten times above that; a wrong rewrite (a dropped bias, a misplaced axis, a wrong
# epsilon) moves outputs by a sizeable fraction of their scale, far above it.
RTOL, ATOL_OF_SCALE = 1e-3, 1e-4


@dataclasses.dataclass
class Case:
    model: GeneratedModel
    steps: list[tuple[str, dict]]  # (pass, options): the pass under test last
    with_data: bool  # False: no --calib/--data, synthetic inputs (passes that need data always get data)
    data_seed: int

    @property
    def name(self) -> str:
        return self.steps[-1][0]

    @property
    def recipe(self) -> list[dict]:
        return [{name: options} for name, options in self.steps]

    @property
    def exact(self) -> bool:
        return all(is_exact(name, options) for name, options in self.steps)


@dataclasses.dataclass
class Outcome:
    events: list[str] = dataclasses.field(default_factory=list)  # hypothesis events: statuses, refusals
    notes: list[str] = dataclasses.field(default_factory=list)  # shown with a failing example
    finding: str | None = None  # the first broken invariant


def _batches(model: GeneratedModel, feeds: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """One run's feeds: all samples at once, or chunks of a fixed batch."""
    (name, x), = feeds.items()
    size = model.batch or len(x)
    return [{name: x[i:i + size]} for i in range(0, len(x), size)]


def _check_written(case: Case, src: Path, out: Path, feeds: dict[str, np.ndarray]) -> None:
    written = onnx.load(str(out))
    onnx.checker.check_model(written)
    for batch in _batches(case.model, feeds):
        before = run_model(str(src), batch)
        if case.exact:
            scale = max(max(float(np.max(np.abs(v))) for v in before.values()), 1e-6)
            assert_same_outputs(str(src), written, batch, rtol=RTOL, atol=ATOL_OF_SCALE * scale)
            continue
        after = run_model(written, batch)
        assert list(after) == list(before), f"output names {list(after)}, the input's {list(before)}"
        for key, value in before.items():
            assert after[key].shape == value.shape, f"output {key!r}: shape {after[key].shape} vs {value.shape}"


def _optimize(case: Case, tmp: Path, src: Path, out: Path, outcome: Outcome) -> Report | None:
    """graphopt.optimize on the case; None when it refused (a one-line GraphoptError) or raised (a finding)."""
    data: dict[str, Any] = {}
    if case.with_data:
        np.savez(tmp / "calib.npz", **case.model.feeds(SAMPLES, case.data_seed))
        np.savez(tmp / "data.npz", **case.model.feeds(SAMPLES, case.data_seed + 1))
        data = {"calib": str(tmp / "calib.npz"), "data": str(tmp / "data.npz")}
    try:
        return graphopt.optimize(str(src), str(out), passes=case.recipe,
                                 run=graphopt.pipeline.RunOptions(latency=False, progress=False), **data)
    except GraphoptError as err:
        message = str(err).strip()
        outcome.events.append(f"{case.name}: refused ({message[:100]})")
        if not message or "\n" in message:
            outcome.finding = f"GraphoptError message is not one line: {message!r}"
        else:  # a valid model, data that fits it, options the recipe grammar accepted: nothing to refuse
            outcome.finding = f"{case.name}: a valid model refused: {message}"
    except Exception as err:  # noqa: BLE001 - any other exception is what we are looking for
        outcome.notes.append(traceback.format_exc())
        outcome.finding = f"{case.name} raised {first_line(err)}"
    return None


def _check_rows(case: Case, report: Report) -> str | None:
    lossy_kept = False  # after a kept lossy pass the model may sit at the budget's edge: rounding may tip it
    for row in report.passes[1:]:
        step = row.step.partition(":")[0]
        if row.status == FAILED:
            return f"step {row.step!r} failed: {row.reason}"
        exact = step in ("canonicalize", "cleanup") or any(is_exact(n, o) for n, o in case.steps if n == step)
        if row.status == ROLLED_BACK and exact and not lossy_kept:
            return f"exact step {row.step!r} rolled back: {row.reason}"
        lossy_kept = lossy_kept or (row.status == KEPT and not exact)
    if not report.passed:
        return f"the gate failed after {case.name}: {report.final}"
    return None


def run_case(case: Case) -> Outcome:
    """Run one case through graphopt.optimize and check the invariants in the module docstring."""
    outcome = Outcome()
    with tempfile.TemporaryDirectory(prefix="graphopt-fuzz-") as folder:
        tmp = Path(folder)
        src, out = tmp / "model.onnx", tmp / "out.onnx"
        src.write_bytes(case.model.proto.SerializeToString())
        source_bytes = src.read_bytes()
        report = _optimize(case, tmp, src, out, outcome)
        if src.read_bytes() != source_bytes:
            outcome.finding = outcome.finding or "the input file changed"
        if report is None or outcome.finding:
            return outcome
        outcome.events += [f"{row.step.partition(':')[0]}: {row.status}" for row in report.passes[1:]]
        outcome.finding = _check_rows(case, report)
        if outcome.finding:
            return outcome
        try:
            _check_written(case, src, out, case.model.feeds(SAMPLES, case.data_seed))
        except Exception as err:  # noqa: BLE001 - checker, onnxruntime or a comparison
            outcome.finding = f"the model {case.name} wrote: {' '.join(str(err).split())[:400]}"
    return outcome
