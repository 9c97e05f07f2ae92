"""Recorded sessions: the user's metric function scores a candidate twice (as it is, and stressed) and the original
in every check; each model runs once per distinct feed, and the numbers are those of fresh runs."""

from __future__ import annotations

import numpy as np

from graphopt.metrics import task_metric
from graphopt.metrics.recorded import Recorder, recorded, remember
from graphopt.runtime import make_session
from tests.helpers import DIGITS

MODEL, TEST = DIGITS / "digits.onnx", DIGITS / "test.npz"


class Counted:
    """A run that counts its calls and returns fresh arrays computed from the feed."""

    def __init__(self):
        self.calls = 0

    def __call__(self, names, feed, options=None):
        self.calls += 1
        return [feed["x"] * 2.0, np.array([feed["x"].sum()])]


def test_a_recorder_runs_each_distinct_feed_once_and_hands_out_copies():
    run = Counted()
    rec = Recorder(run)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    first = rec(None, {"x": x})
    again = rec(None, {"x": x.copy()})  # the same content in another array: remembered
    assert run.calls == 1
    np.testing.assert_array_equal(again[0], first[0])
    again[0][:] = -1  # the caller writes into what it got ...
    np.testing.assert_array_equal(rec(None, {"x": x})[0], x * 2.0)  # ... the record is untouched
    rec(None, {"x": x + 1})  # other content, another dtype, other output names, run options: run again
    rec(None, {"x": x.astype(np.float64)})
    rec(["y"], {"x": x})
    rec(None, {"x": x}, object())
    assert run.calls == 5
    obj = {"x": np.array([[0.0, 1.0]], dtype=object)}  # not numeric: never recorded, run every time
    rec(None, obj), rec(None, obj)
    assert run.calls == 7


def test_a_recorder_keeps_at_most_its_byte_budget():
    run = Counted()
    x = np.zeros((4, 4), np.float32)  # outputs: 64 + 4 bytes
    rec = Recorder(run, max_bytes=100)
    rec(None, {"x": x}), rec(None, {"x": x + 1})  # the second does not fit beside the first
    rec(None, {"x": x}), rec(None, {"x": x + 1})
    assert run.calls == 3


def test_scores_runs_the_candidate_once_per_feed_and_equals_two_fresh_scores():
    """TaskMetric.scores on real sessions: the same two numbers as score and stressed_score on fresh sessions, the
    candidate run once per feed of the function (not twice), the reference remembered across candidates."""
    data = np.load(TEST)
    noisy = make_session(str(MODEL))
    clean = noisy.run
    noisy.run = lambda names, feed, options=None: [  # the same noise on every run, as a model's own error is
        o + np.random.default_rng(0).normal(0, 2.0, o.shape).astype(o.dtype) if i == 0 else o
        for i, o in enumerate(clean(names, feed, options))]
    metric = task_metric(lambda s: float((s.run(None, {"input": data["input"]})[0].argmax(1)
                                          == data["labels"]).mean()))
    counts = {"candidate": 0, "reference": 0}

    def counting(session, who):
        inner = session.run

        def run(names, feed, options=None):
            counts[who] += 1
            return inner(names, feed, options)
        session.run = run
        return session

    candidate = counting(noisy, "candidate")
    reference = remember(counting(make_session(str(MODEL)), "reference"))
    with recorded(candidate):  # the expected numbers from the same (noisy) outputs
        expected = metric.score(candidate), metric.stressed_score(candidate, reference)
    counts.update(candidate=0, reference=0)
    run_before = candidate.run
    got = metric.scores(candidate, reference)
    assert counts == {"candidate": 1, "reference": 0}  # the reference's run was remembered from the first pair
    assert got == expected and got[1] < got[0]  # noise doubled costs accuracy: the stressed score bites
    assert candidate.run is run_before  # its run is itself again afterwards
