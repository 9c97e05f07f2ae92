"""The user's own yardstick (--metric-fn / metric_fn=): the budget is on the number the function returns, for
optimize, budget-seeking passes and auto alike; and one clear line when the function is missing or misbehaves."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from graphopt import cli, optimize
from graphopt.auto import auto
from graphopt.errors import GraphoptError
from graphopt.metrics import load_metric_fn, metric_for_gate
from graphopt.options import BaseOptions
from graphopt.passbase import GraphoptPass
from graphopt.pipeline import RunOptions
from graphopt.weights import constant_array, replace_initializer
from tests.helpers import DIGITS

MODEL, CALIB, TEST = DIGITS / "digits.onnx", DIGITS / "calib.npz", DIGITS / "test.npz"
QUIET = RunOptions(latency=False, progress=False)


def digits_accuracy(session) -> float:
    """The digits task the search never sees: accuracy on test.npz (a real user metric)."""
    data = np.load(TEST)
    scores = session.run(None, {"input": data["input"]})[0]
    return float((scores.argmax(axis=1) == data["labels"]).mean())


def accuracy_of(path) -> float:
    from graphopt.runtime import make_session

    return digits_accuracy(make_session(str(path)))


def indifferent(session) -> float:
    return 1.0


def test_the_gate_follows_the_users_number_not_graphopts_guess(tmp_path):
    # 95% of the weights gone: the digits classifier is wrecked (agreement far below 99%) ...
    wrecked = "prune:sparsity=0.95,scope=global"
    plain = optimize(str(MODEL), tmp_path / "a.onnx", passes=wrecked, data=CALIB, run=QUIET)
    assert plain.passes[-2].status == "rolled back" and "accuracy drop" in plain.passes[-2].reason
    # ... a user's metric that does not care keeps it: the budget is on the user's number only
    kept = optimize(str(MODEL), tmp_path / "b.onnx", passes=wrecked, data=CALIB, run=QUIET, metric_fn=indifferent)
    assert kept.metric == "task" and kept.passed
    row = next(r for r in kept.passes if r.step.startswith("prune"))
    assert row.status == "kept" and row.metrics["task"] == 1.0 and row.metrics["agreement"] < 0.9
    # ... and the real task (accuracy on test.npz) rolls it back, naming the task drop
    strict = optimize(str(MODEL), tmp_path / "c.onnx", passes=wrecked, data=CALIB, run=QUIET, metric_fn=digits_accuracy)
    row = next(r for r in strict.passes if r.step.startswith("prune"))
    assert row.status == "rolled back" and row.reason.startswith("task drop "), row.reason
    assert strict.passes[0].metrics["reference_task"] == pytest.approx(accuracy_of(MODEL))


def test_budget_seeking_checks_whole_models_on_the_users_number(tmp_path):
    calls = []

    def counting(session):
        calls.append(1)
        return digits_accuracy(session)

    report = optimize(str(MODEL), tmp_path / "k.onnx", passes="kmeans:bits=auto,max_samples=64", data=CALIB,
                      run=QUIET, metric_fn=counting, max_drop=0.01)
    row = next(r for r in report.passes if r.step.startswith("kmeans"))
    assert any("task drop" in n for n in row.notes), row.notes  # the bisection's checks are on the task
    assert row.status == "kept" and report.passed
    final = row.metrics["reference_task"] - row.metrics["task"]
    assert final <= 0.01 + 1e-9
    assert len(calls) >= 3  # the reference, at least one whole-model check, the pass's gate


def test_int8_placement_keeps_the_users_budget_not_the_proxys(tmp_path):
    # a user's number that every int8 op costs: twice the logits' relative error on test.npz. Every op int8
    # costs it 0.019 (2 points), while graphopt's proxy (agreement on the calibration samples) sees no drop
    data = np.load(TEST)
    ref = np.asarray(_logits(MODEL, data))

    def close(session) -> float:
        out = session.run(None, {"input": data["input"]})[0]
        return 1.0 - 2.0 * float(np.linalg.norm(out - ref) / np.linalg.norm(ref))

    report = optimize(str(MODEL), tmp_path / "q.onnx", passes="quantize:target=size", data=CALIB, run=QUIET,
                      metric_fn=close, max_drop=0.01)
    row = next(r for r in report.passes if r.step.startswith("quantize"))
    # quantize's own whole-model checks were on the user's number: it kept float what that needed, so the gate
    # had nothing to roll back (on the proxy it made every op int8 and the gate threw the pass away)
    assert row.status == "kept", row.reason
    assert row.metrics["reference_task"] - row.metrics["task"] <= 0.01 + 1e-9
    assert any("kept float" in n and "accuracy budget" in n for n in row.notes), row.notes
    assert any(n.startswith("int8 (") for n in row.notes), row.notes  # some ops are int8 still


def _logits(path, data) -> np.ndarray:
    from graphopt.runtime import make_session

    return make_session(str(path)).run(None, {"input": data["input"]})[0]


def test_the_stressed_task_score_is_the_users_number_on_doubled_output_error(tmp_path):
    """auto accepts a candidate only when the user's number also holds with the output error doubled (as the
    stressed agreement does for graphopt's own metrics): a search stopping where the number just holds stops where
    unseen samples break it. PP-OCRv4 rec: a pick 1 line of 150 down on the search lines was 2 down held out."""
    from graphopt.metrics import task_metric

    class Fixed:  # a stand-in session: the same outputs for any feed
        def __init__(self, *outputs):
            self.outputs = list(outputs)

        def run(self, names, feed, options=None):
            return self.outputs

    labels = np.array([1, 2, 3])
    seen = []
    metric = task_metric(lambda session: seen.append((session, session.run(None, {}))) or 0.0)
    candidate = Fixed(np.array([1.5, 2.0]), labels)
    metric.stressed_score(candidate, Fixed(np.array([1.0, 2.5]), labels))
    (session, out), = seen
    assert session is candidate  # the user's function gets the session itself (its type checks hold) ...
    np.testing.assert_allclose(out[0], [2.0, 1.5])  # ... outputs: reference + 2 x (candidate - reference)
    assert out[1] is labels  # not float: the candidate's own
    assert candidate.run(None, {})[0].tolist() == [1.5, 2.0]  # run is itself again afterwards

    out = tmp_path / "k.onnx"
    report = optimize(str(MODEL), out, passes="kmeans:bits=2", data=CALIB, run=QUIET, metric_fn=digits_accuracy,
                      max_drop=1.0)
    data = np.load(TEST)
    ref, cand = _logits(MODEL, data), _logits(out, data)
    worst = min((cand.argmax(1) == data["labels"]).mean(), ((ref + 2 * (cand - ref)).argmax(1) == data["labels"]).mean())
    assert report.final_stressed_drop == pytest.approx((ref.argmax(1) == data["labels"]).mean() - worst)
    assert report.final_stressed_drop > report.final["reference_task"] - report.final["task"]  # 2 bits: it bites


def test_cli_metric_fn_from_a_file(tmp_path, capsys):
    fn = tmp_path / "mytask.py"
    fn.write_text("import numpy as np\n"
                  f"DATA = np.load({str(TEST)!r})\n"
                  "def top1(session):\n"
                  "    s = session.run(None, {'input': DATA['input']})[0]\n"
                  "    return float((s.argmax(1) == DATA['labels']).mean())\n")
    out = tmp_path / "o.onnx"
    code = cli.main(["optimize", str(MODEL), "--passes", "prune:sparsity=0.3", "--data", str(CALIB),
                     "--metric-fn", f"{fn}:top1", "-o", str(out), "--quiet", "--no-latency",
                     "--report", str(tmp_path / "r.json")])
    text = capsys.readouterr().out
    assert code == 0 and "task score" in text and "gate: task drop <= 0.01: PASSED" in text
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["metric"] == "task"
    assert report["passes"][-1]["metrics"]["task"] == pytest.approx(accuracy_of(out))


@pytest.mark.parametrize("argv,match", [
    (["--metric-fn", "no_such_module_xyz:f"], "cannot import no_such_module_xyz"),
    (["--metric-fn", "json:no_such_function"], "json has no function no_such_function"),
    (["--metric-fn", "missing.py:f"], "missing.py is not a file"),
    (["--metric-fn", "justtext"], "expected module:function"),
    (["--metric-fn", "json:dumps", "--metric", "accuracy"], "give one"),
    (["--metric", "task"], "invalid choice: 'task'"),
])
def test_cli_refuses_a_metric_fn_it_cannot_use(tmp_path, capsys, argv, match):
    code = cli.main(["optimize", str(MODEL), "--passes", "prune:sparsity=0.3", "--data", str(CALIB), "--quiet",
                     "-o", str(tmp_path / "o.onnx"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and match in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fn,match", [(lambda s: float("nan"), "returned nan"), (lambda s: "high", "returned str"),
                                      (lambda s: 1 / 0, "failed: ZeroDivisionError")])
def test_a_misbehaving_function_is_one_clear_error_and_nothing_is_written(tmp_path, fn, match):
    with pytest.raises(GraphoptError, match=match):
        optimize(str(MODEL), tmp_path / "o.onnx", passes="prune:sparsity=0.3", data=CALIB, run=QUIET, metric_fn=fn)
    assert list(tmp_path.iterdir()) == []


def test_the_api_refuses_what_the_cli_refuses(tmp_path):
    with pytest.raises(GraphoptError, match="--metric task needs --metric-fn"):
        optimize(str(MODEL), tmp_path / "o.onnx", passes="prune", data=CALIB, metric="task")
    with pytest.raises(GraphoptError, match="expected a function of an onnxruntime session"):
        auto(MODEL, tmp_path / "o.onnx", data=CALIB, metric_fn=3)
    assert list(tmp_path.iterdir()) == []


def test_a_metric_given_by_name_travels_by_name(tmp_path):
    fn = tmp_path / "scorer.py"
    fn.write_text("def score(session, holdout):\n    return 2.0 if holdout else 1.0\n")
    metric = load_metric_fn(f"{fn}:score")
    again = pickle.loads(pickle.dumps(metric.judging()))  # re-imported, as on a Dask worker
    assert again.spec == metric.spec and again.holdout and again.fn is not metric.fn
    assert again.score(None) == 2.0 and metric.score(None) == 1.0
    assert metric_for_gate(None, f"{fn}:score").spec == metric.spec
    assert metric_for_gate(None, None) is None


def test_auto_searches_on_the_users_number_and_judges_with_holdout_true(tmp_path):
    seen = []

    def scored(session, holdout=False):
        seen.append(holdout)
        return digits_accuracy(session)

    result = auto(MODEL, tmp_path / "p.onnx", data=CALIB, trials=2, metric_fn=scored, progress=False)
    assert result.metric == "task" and seen[-1] is True and seen.count(True) == 2  # the original and the pick
    assert not any(seen[:-2])  # the search scored every candidate with holdout=False
    pick = accuracy_of(result.output)
    assert result.holdout["task"] == pytest.approx(pick)
    assert result.passed == (accuracy_of(MODEL) - pick <= 0.01 + 1e-9)


def test_auto_never_returns_a_pick_that_fails_the_held_out_judgement(tmp_path):
    """The search sees no loss at all; the held-out judgement accepts only models (nearly) identical to the
    original. Every smaller candidate then fails there, and auto returns the original rather than one of them."""
    feeds = np.load(CALIB)["input"][:50]
    from graphopt.runtime import make_session

    reference = make_session(str(MODEL)).run(None, {"input": feeds})[0]

    def strict(session, holdout=False):
        if not holdout:
            return 1.0
        return -float(np.abs(session.run(None, {"input": feeds})[0] - reference).max())

    result = auto(MODEL, tmp_path / "p.onnx", data=CALIB, trials=4, metric_fn=strict, progress=False)
    smaller = [c for c in result.candidates
               if c.valid and c.same_as is None and c.lzma_bytes < result.candidates[0].lzma_bytes]
    assert smaller, "the search found no smaller candidate: nothing for the judgement to refuse"
    assert result.passed and result.chosen.number == 0  # the original (exact passes only)
    assert [f["number"] for f in result.failed_holdout] == \
        [c.number for c in sorted(smaller, key=lambda c: (c.lzma_bytes, c.number))][:3]
    assert result.holdout["task"] > -0.01
    assert all(f["why"] == "outside the budget on the held-out samples" for f in result.failed_holdout)
    assert any("passed over" in line and "held-out samples' help" in line
               for line in (tmp_path / "p.md").read_text().splitlines())


class ClaimsExact(GraphoptPass):
    """Says it is exact but scales the last Gemm's weights by 0.9 (a bug an exact pass could have): its outputs
    show the change, so its score is measured, not carried."""

    name = "claims_exact"
    exact = True
    Options = BaseOptions

    def call(self, model):
        gemm = [n for n in model.graph if n.op_type == "Gemm"][-1]
        replace_initializer(gemm.inputs[1], constant_array(gemm.inputs[1]) * 0.9)
        return self.result(model, [{"layer": gemm.name}])


def test_exact_steps_carry_the_score_of_the_model_they_rewrote_only_when_their_outputs_show_it(tmp_path,
                                                                                            register_passes):
    """The user's function is the slow part of a run (PP-OCRv4 rec: 300 lines a call). An exact pass whose outputs
    equal the original's up to float rounding (SNR >= 60 dB, no prediction changed) carries the original's score;
    fuse on digits then costs two calls (the original's score, the final stressed score). After a lossy step, an
    exact one (cleanup) whose outputs equal that step's carries that step's score. A pass that claims to be exact
    but changes the outputs is scored like any other."""
    register_passes(ClaimsExact)
    calls = []

    def counted(session) -> float:
        calls.append(session)
        return digits_accuracy(session)

    report = optimize(str(MODEL), tmp_path / "fused.onnx", passes="fold_batchnorm; fuse", data=CALIB, run=QUIET,
                      metric_fn=counted)
    assert len(calls) == 2 and report.final["task"] == report.final["reference_task"] == accuracy_of(MODEL)
    calls.clear()
    report = optimize(str(MODEL), tmp_path / "scaled.onnx", passes="claims_exact; claims_exact", data=CALIB,
                      run=QUIET, metric_fn=counted, max_drop=1.0)
    steps = [p.step.split(":")[0] for p in report.passes[-3:]]
    assert steps == ["claims_exact", "claims_exact", "cleanup"] and all(p.status == "kept" for p in report.passes[-3:])
    # the original, each claims_exact (their outputs are neither the original's nor the step before's), the stressed
    # score; not cleanup (its outputs are the second step's)
    assert len(calls) == 4
    assert report.passes[-1].metrics["worst_snr_db"] < 60.0
    scaled = accuracy_of(tmp_path / "scaled.onnx")
    assert report.final["task"] == pytest.approx(scaled) and report.passes[-1].metrics["task"] == pytest.approx(scaled)


def test_the_original_runs_once_per_feed_of_the_function_for_the_whole_run(tmp_path, monkeypatch):
    """Every stressed check runs the original beside the candidate. The evaluator's reference session is recorded
    and shared as the passes' teacher (canonicalize left its outputs unchanged), so over a budget search with many
    checks the original runs once on the function's one feed, and no pass records a second copy of it."""
    from graphopt import passbase
    from graphopt.metrics import evaluator as evaluator_module
    from graphopt.metrics.recorded import remember

    runs, own_teachers, calls = [], [], []

    def counted_then_recorded(session):
        inner = session.run

        def run(names, feed, options=None):
            runs.append(1)
            return inner(names, feed, options)

        session.run = run
        return remember(session)

    monkeypatch.setattr(evaluator_module, "remember", counted_then_recorded)
    monkeypatch.setattr(passbase, "remember", lambda s: own_teachers.append(s) or remember(s))

    def counted(session) -> float:
        calls.append(1)
        return digits_accuracy(session)

    report = optimize(str(MODEL), tmp_path / "k.onnx", passes="kmeans:bits=auto,max_samples=64", data=CALIB,
                      run=QUIET, metric_fn=counted, max_drop=0.01)
    assert report.passed and len(calls) >= 4  # the original, stressed checks in the pass, its gate, the final
    assert runs == [1] and own_teachers == []
