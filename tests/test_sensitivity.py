"""Sensitivity tables on a two-branch toy model whose answers are computed by hand with numpy."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt import metrics, passbase, sensitivity
from graphopt.sensitivity import measurement as measure_module
from graphopt.data import Dataset
from graphopt.errors import GraphoptError
from graphopt.passbase import PassContext
from graphopt.sensitivity import Candidate, SensitivityRow, greedy_budget, measure
from graphopt.weights import replace_initializer
from tests.helpers import make_model

RNG = np.random.default_rng(0)
WA = (RNG.standard_normal((4, 3)) * 3.0).astype(np.float32)  # branch A: dominates the output
WB = (RNG.standard_normal((4, 3)) * 0.05).astype(np.float32)  # branch B: tiny
X = RNG.standard_normal((32, 4)).astype(np.float32)


def two_branch() -> ir.Model:
    """y = x @ WA + x @ WB, y is [N, 3] class scores."""
    nodes = [helper.make_node("MatMul", ["x", "WA"], ["a"], name="gemmA"),
             helper.make_node("MatMul", ["x", "WB"], ["b"], name="gemmB"),
             helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], {"WA": WA, "WB": WB})


def dataset(labels: np.ndarray | None = None) -> Dataset:
    return Dataset(feeds=[{"x": X[i:i + 4]} for i in range(0, len(X), 4)], labels=labels)


def context(metric: str = "agreement", labels: np.ndarray | None = None, teacher: bool = True) -> PassContext:
    return PassContext(calib=dataset(labels), teacher=two_branch() if teacher else None, metric=metric)


def zero(name: str) -> Candidate:
    def apply(model: ir.Model) -> None:
        value = model.graph.initializers[name]
        replace_initializer(value, np.zeros_like(value.const_value.numpy()))
    return Candidate(f"zero_{name}", name, 0.0, apply)


def snr(ref: np.ndarray, cand: np.ndarray) -> float:
    """Worst of whole-tensor and per-channel (axis 1) SNR, as metrics.py defines it."""
    def one(r, c):
        return 10 * math.log10(np.sum(r.astype(np.float64) ** 2) / np.sum((r - c).astype(np.float64) ** 2))
    return min([one(ref, cand)] + [one(ref[:, j], cand[:, j]) for j in range(ref.shape[1])])


REF = X @ WA + X @ WB


def test_dominant_branch_ranks_last_with_hand_computed_numbers():
    table = measure(context(), two_branch(), [zero("WA"), zero("WB")])
    assert [r.key for r in table] == ["zero_WB", "zero_WA"]
    row_b, row_a = table
    assert row_a.status == row_b.status == "ok" and row_a.metric == "agreement"
    for row, cand in ((row_b, X @ WA), (row_a, X @ WB)):
        agree = np.mean(REF.argmax(1) == cand.argmax(1))
        assert row.drop == pytest.approx(1 - agree, abs=1e-9)
        assert row.value == pytest.approx(agree, abs=1e-9)
        assert row.worst_snr_db == pytest.approx(snr(REF, cand), abs=1e-3)
        assert row.samples == 32
    assert row_a.drop > 0.3 and row_b.worst_snr_db > row_a.worst_snr_db + 20


def test_original_model_is_never_modified():
    model = two_branch()
    before = {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()}
    measure(context(teacher=False), model, [zero("WA"), zero("WB")])
    sensitivity.measure_combination(context(), model, [zero("WA"), zero("WB")])
    assert set(model.graph.initializers) == set(before)
    for name, array in before.items():
        np.testing.assert_array_equal(model.graph.initializers[name].const_value.numpy(), array)


def test_zero_time_budget_returns_all_rows_unmeasured():
    cands = [zero("WA"), zero("WB")]
    table = measure(context(), two_branch(), cands, time_budget_s=0)
    assert [r.key for r in table] == ["zero_WA", "zero_WB"]
    assert all(r.status == "skipped" and r.drop is None and r.worst_snr_db == -200.0 for r in table)
    assert any("time budget" in n for n in table.notes)
    assert greedy_budget(table, 1.0) == []


def test_time_budget_stops_after_the_first_candidate(monkeypatch):
    clock = iter(range(0, 1000, 10))  # every perf_counter() call advances 10 s
    monkeypatch.setattr(measure_module.time, "perf_counter", lambda: float(next(clock)))
    table = measure(context(), two_branch(), [zero("WA"), zero("WB"), zero("WA")], time_budget_s=45)
    assert [r.status for r in table] == ["ok", "skipped", "skipped"]


def test_failing_candidates_give_error_rows_and_the_rest_is_measured():
    def boom(model: ir.Model) -> None:
        raise ValueError("cannot edit this layer")

    def bad_shape(model: ir.Model) -> None:  # MatMul [N,4] x [5,3] fails when the session loads/runs
        replace_initializer(model.graph.initializers["WB"], np.ones((5, 3), np.float32))

    table = measure(context(), two_branch(), [Candidate("boom", "WA", 1, boom), zero("WB"),
                                              Candidate("bad", "WB", 2, bad_shape)])
    assert table[0].key == "zero_WB" and table[0].status == "ok"
    errors = {r.key: r for r in table[1:]}
    assert set(errors) == {"boom", "bad"}
    for row in errors.values():
        assert row.status == "error" and row.drop is None and row.worst_snr_db == -200.0 and row.error
    assert "cannot edit this layer" in errors["boom"].error
    assert greedy_budget(table, 1.0) == [table[0]]


def test_combination_and_baseline():
    ctx = context()
    both = sensitivity.measure_combination(ctx, two_branch(), [zero("WA"), zero("WB")])
    # Output all zeros: SNR exactly 0 dB; argmax of a zero row is class 0.
    assert both.key == "zero_WA+zero_WB" and both.worst_snr_db == pytest.approx(0.0, abs=1e-9)
    assert both.drop == pytest.approx(1 - np.mean(REF.argmax(1) == 0))
    assert sensitivity.baseline(ctx, two_branch()).worst_snr_db == metrics.SNR_CAP
    edited = two_branch()
    zero("WB").apply(edited)
    base = sensitivity.baseline(ctx, edited)
    assert base.key == "baseline" and base.worst_snr_db == pytest.approx(snr(REF, X @ WA), abs=1e-3)


def test_reference_is_computed_once_per_context(monkeypatch):
    made = []
    real = metrics.Evaluator

    def counting(*args, **kwargs):
        made.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(metrics, "Evaluator", counting)
    monkeypatch.setattr(passbase, "Evaluator", counting)  # the context builds the teacher's evaluators
    ctx = context()
    measure(ctx, two_branch(), [zero("WA"), zero("WB")])
    sensitivity.baseline(ctx, two_branch())
    sensitivity.measure_combination(ctx, two_branch(), [zero("WB")])
    assert len(made) == 1
    measure(ctx, two_branch(), [zero("WA")], max_samples=8)  # other data: a new reference
    assert len(made) == 2


def test_a_replaced_context_builds_its_own_evaluators():
    ctx = context()
    full = ctx.calib_evaluator()
    smaller = dataclasses.replace(ctx, calib=ctx.calib.head(8))
    assert sum(len(next(iter(f.values()))) for f in smaller.calib_evaluator().feeds) == 8
    assert ctx.calib_evaluator() is full  # the original context keeps its own


def test_max_samples_caps_the_data():
    row = measure(context(), two_branch(), [zero("WA")], max_samples=8)[0]
    assert row.samples == 8
    agree = np.mean(REF[:8].argmax(1) == (X[:8] @ WB).argmax(1))
    assert row.drop == pytest.approx(1 - agree)


def test_metrics_accuracy_fallback_and_snr():
    labels = (X @ WA).argmax(1)  # labels that branch A alone predicts perfectly
    table = measure(context("accuracy", labels), two_branch(), [zero("WA"), zero("WB")])
    row_a = next(r for r in table if r.key == "zero_WA")
    ref_acc, acc = np.mean(REF.argmax(1) == labels), np.mean((X @ WB).argmax(1) == labels)
    assert row_a.metric == "accuracy" and row_a.drop == pytest.approx(ref_acc - acc)
    assert row_a.value == pytest.approx(acc)

    table = measure(context("accuracy"), two_branch(), [zero("WA")])
    assert table[0].metric == "agreement" and any("needs labels" in n for n in table.notes)

    table = measure(context("snr"), two_branch(), [zero("WA"), zero("WB")])
    assert [r.key for r in table] == ["zero_WB", "zero_WA"] and all(r.drop is None for r in table)
    assert table[1].value == pytest.approx(snr(REF, X @ WB), abs=1e-3)

    with pytest.raises(GraphoptError, match="unknown metric"):
        measure(context("f1"), two_branch(), [zero("WA")])


def _row(key: str, drop: float | None, layer: str = "", snr_db: float = 40.0, status: str = "ok") -> SensitivityRow:
    return SensitivityRow(key, layer or key, None, drop, snr_db, None, 0.0, status)


def test_greedy_budget_picks_the_cheapest_prefix():
    rows = [_row("d", 0.05), _row("a", 0.0), _row("c", 0.02), _row("b", 0.01)]
    assert [r.key for r in greedy_budget(rows, 0.03)] == ["a", "b", "c"]  # 0 + .01 + .02 = .03
    assert [r.key for r in greedy_budget(rows, 0.025)] == ["a", "b"]
    assert [r.key for r in greedy_budget(rows, 0.03, additive=False)] == ["a", "b", "c"]
    assert [r.key for r in greedy_budget(rows, 0.05, additive=False)] == ["a", "b", "c", "d"]
    assert greedy_budget(rows, -1.0) == []
    # A negative drop buys no budget.
    assert [r.key for r in greedy_budget([_row("x", -0.5), _row("y", 0.1)], 0.05)] == ["x"]
    # One row per layer: the costlier setting of a layer replaces the cheaper one.
    per_layer = [_row("a@.3", 0.01, "a"), _row("b@.3", 0.01, "b"), _row("a@.5", 0.015, "a"), _row("b@.5", 0.03, "b")]
    assert [r.key for r in greedy_budget(per_layer, 0.03)] == ["a@.5", "b@.3"]
    # Unmeasured rows stop the selection.
    assert [r.key for r in greedy_budget([_row("a", 0.0), _row("e", None, status="error")], 1.0)] == ["a"]


def test_greedy_budget_on_snr_adds_noise_powers():
    rows = [_row("a", None, snr_db=30.0), _row("b", None, snr_db=30.0)]  # two equal noises: 30 - 3.01 dB
    assert sensitivity.combined_snr_db([30.0, 30.0]) == pytest.approx(30 - 10 * math.log10(2))
    assert [r.key for r in greedy_budget(rows, None, min_snr_db=27.0)] == ["a"]
    assert [r.key for r in greedy_budget(rows, None, min_snr_db=26.9)] == ["a", "b"]
    assert [r.key for r in greedy_budget(rows, None, additive=False, min_snr_db=30.0)] == ["a", "b"]


def test_rows_are_json_safe():
    table = measure(context(), two_branch(), [Candidate("k", "WB", (np.float32(0.5), "int8"), zero("WB").apply)])
    data = json.loads(json.dumps(table.to_rows()))
    assert data[0]["setting"] == [0.5, "int8"] and data[0]["status"] == "ok"
    assert data[0]["drop"] == pytest.approx(table[0].drop)


def _chain() -> ir.Model:
    """h = relu(x @ W1) (also a model output), y = (h @ W2) @ W3: edits of W2/W3 leave the first layer clean."""
    rng = np.random.default_rng(1)
    inits = {f"W{i}": rng.standard_normal((4, 4)).astype(np.float32) for i in (1, 2, 3)}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["m1"], name="mm1"), helper.make_node("Relu", ["m1"], ["h"]),
             helper.make_node("MatMul", ["h", "W2"], ["m2"], name="mm2"),
             helper.make_node("MatMul", ["m2", "W3"], ["y"], name="mm3")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
                       helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", 4])], inits)


def _noise(name: str, scale: float) -> Candidate:
    def apply(model: ir.Model) -> None:
        value = model.graph.initializers[name]
        w = value.const_value.numpy()
        replace_initializer(value, (w + scale * np.sign(w)).astype(np.float32))
    return Candidate(f"{name}+{scale}", name, scale, apply)


def test_suffix_runs_give_the_same_rows_as_whole_clones(monkeypatch):
    from graphopt.sensitivity import suffix as sensitivity_suffix

    cands = [_noise("W1", 0.3), _noise("W2", 0.3), _noise("W3", 0.05), _noise("W3", 0.5)]
    ctx = PassContext(calib=dataset(), teacher=_chain(), metric="agreement")
    whole = measure(ctx, _chain(), cands, reuse_prefix=False)
    sizes = []
    real = sensitivity_suffix.evaluate

    def spy(suffix, cache, evaluator):
        sizes.append((len(list(suffix.model.graph)), suffix.frontier, suffix.clean_outputs))
        return real(suffix, cache, evaluator)

    monkeypatch.setattr(sensitivity_suffix, "evaluate", spy)
    fast = measure(ctx, _chain(), cands)
    assert [r.key for r in fast] == [r.key for r in whole]
    for a, b in zip(fast, whole):
        assert a.drop == pytest.approx(b.drop, abs=1e-12) and a.worst_snr_db == pytest.approx(b.worst_snr_db, abs=1e-6)
    assert whole[-1].drop > 0  # the candidates do differ, so equal rows mean something
    # W2/W3 edits ran 2 and 1 nodes on captured values of the clean first layer; its output h came from the cache.
    assert sorted(s[0] for s in sizes) == [1, 1, 2, 4]
    assert (2, ["h"], ["h"]) in sizes and (1, ["m2"], ["h"]) in sizes


def test_allocate_steps_over_an_unmeasured_level_to_a_measured_one():
    from graphopt.sensitivity import allocate

    # group 0: 0.1 unmeasured, 0.5 measured and cheap; group 1: only 0.1 measured
    chosen = allocate([100, 100], [[0.1, 0.5], [0.1, 0.5]], [[np.inf, 0.01], [0.001, np.inf]], 0.3)
    assert chosen == [0.5, 0.1]
    # a measured loss below an earlier measured one still counts as the earlier (loss never falls with the ratio)
    chosen = allocate([100, 100], [[0.1, 0.5], [0.1, 0.5]], [[0.5, 0.0], [0.001, 0.002]], 0.3)
    assert chosen == [0.1, 0.5]
