"""graphopt.refit: closed-form ridge against numpy's lstsq, and refit_layer on real layers."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from graphopt.capture import Moments, layer_moments
from graphopt.data import Dataset
from graphopt.linear import as_linear
from graphopt.refit import refit_layer, relative_error, ridge
from graphopt.weights import replace_initializer
from tests.helpers import clone, make_model, randn, run_model, tensor_info

F32 = np.float32


def _moments(x, y):
    m = Moments(x.shape[1])
    m.update(x, y)
    return m


def _lstsq(x, y, bias=True):
    xa = np.hstack([x, np.ones((len(x), 1))]) if bias else x
    sol = np.linalg.lstsq(xa, y, rcond=None)[0]
    return (sol[:-1], sol[-1]) if bias else (sol, np.zeros(y.shape[1]))


def test_ridge_recovers_a_known_map():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 6))
    w_true, b_true = rng.standard_normal((6, 3)), rng.standard_normal(3)
    m = _moments(x, x @ w_true + b_true)
    w, b = ridge(m.xtx, m.xty, lam=0.0)
    np.testing.assert_allclose(w, w_true, atol=1e-9)
    np.testing.assert_allclose(b, b_true, atol=1e-9)
    assert relative_error(m, w, b) < 1e-18
    w_no_bias, b0 = ridge(m.xtx, m.xty, lam=0.0, fit_bias=False)
    np.testing.assert_allclose(w_no_bias, _lstsq(x, x @ w_true + b_true, bias=False)[0], atol=1e-9)
    assert np.all(b0 == 0)
    # A large relative lambda shrinks W towards zero.
    w_big, _ = ridge(m.xtx, m.xty, lam=1e3)
    assert np.abs(w_big).max() < 0.05 * np.abs(w_true).max()


def test_ridge_with_removed_columns_matches_lstsq_on_the_rest():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((100, 8)), rng.standard_normal((100, 4))
    m = _moments(x, y)
    keep = np.array([0, 2, 3, 7])
    w, b = ridge(m.xtx, m.xty, lam=0.0, keep=keep)
    want_w, want_b = _lstsq(x[:, keep], y)
    np.testing.assert_allclose(w[keep], want_w, atol=1e-10)
    np.testing.assert_allclose(b, want_b, atol=1e-10)
    assert np.all(w[[1, 4, 5, 6]] == 0)
    bool_keep = np.zeros(8, dtype=bool)
    bool_keep[keep] = True
    np.testing.assert_array_equal(ridge(m.xtx, m.xty, lam=0.0, keep=bool_keep)[0], w)


def test_ridge_ill_conditioned_is_finite_and_still_fits():
    rng = np.random.default_rng(2)
    base = rng.standard_normal((50, 3))
    x = np.hstack([base, base[:, :1], np.zeros((50, 1))])  # a duplicate column and a dead one
    y = base @ np.array([[1.0], [2.0], [-1.0]])
    m = _moments(x, y)
    for lam in (0.0, 1e-12):
        w, b = ridge(m.xtx, m.xty, lam=lam)
        assert np.all(np.isfinite(w)) and np.all(np.isfinite(b))
        np.testing.assert_allclose(x @ w + b, y, atol=1e-6)
    zeros = Moments(2)
    zeros.update(np.zeros((4, 2)), np.ones((4, 1)))
    w, b = ridge(zeros.xtx, zeros.xty, lam=0.0)
    assert np.all(w == 0) and b == pytest.approx([1.0])


def _gemm_model(w, b):
    node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc")
    return make_model([node], [tensor_info("x", F32, ["N", w.shape[0]])], ["y"], {"w": w, "b": b})


def test_refit_layer_with_mask_keeps_pruned_zeros():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 5))
    y = rng.standard_normal((300, 3)) + x @ rng.standard_normal((5, 3))
    model = _gemm_model(randn((5, 3), seed=4), randn((3,), seed=5))
    layer = as_linear(next(iter(model.graph)))
    mask = np.array([[1, 1, 0], [0, 1, 1], [1, 1, 1], [0, 1, 0], [1, 1, 0]], dtype=bool)
    m = _moments(x, y)
    result = refit_layer(layer, m, lam=0.0, mask=mask)
    assert result.changed and result.error_after < result.error_before and result.rows == 300
    w, b = layer.matrix(), layer.bias_vector()
    assert np.all(w[~mask] == 0)
    for j in range(3):  # each output on its own allowed inputs
        want_w, want_b = _lstsq(x[:, mask[:, j]], y[:, j : j + 1])
        np.testing.assert_allclose(w[mask[:, j], j], want_w[:, 0], rtol=1e-5, atol=1e-5)
        assert b[j] == pytest.approx(want_b[0], abs=1e-5)
    assert result.error_after == pytest.approx(relative_error(m, w, b), rel=1e-4)


def _two_layer(seed):
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="head")]
    inits = {"w1": randn((4, 2, 3, 3), seed), "b1": randn((4,), seed + 1),
             "w2": randn((3, 4, 1, 1), seed + 2), "b2": randn((3,), seed + 3)}
    return make_model(nodes, [tensor_info("x", F32, ["N", 2, None, None])], ["y"], inits)


def test_refit_layer_recovers_the_teacher_and_refuses_to_make_it_worse():
    teacher = _two_layer(0)
    student = clone(teacher)
    w2 = student.graph.initializers["w2"]
    replace_initializer(w2, (w2.const_value.numpy() + randn((3, 4, 1, 1), seed=9) * 0.5).astype(F32))
    data = Dataset([{"x": randn((4, 2, 6, 6), seed=20)}, {"x": randn((2, 2, 5, 7), seed=21)}])
    head = as_linear(next(n for n in student.graph if n.name == "head"))
    moments = layer_moments(student, [head], data, targets={"head": "y"}, target_model=teacher)
    result = refit_layer(head, moments["head"], lam=1e-10)
    assert result.changed and result.error_before > 0.01 and result.error_after < 1e-8
    test = {"x": randn((1, 2, 5, 5), seed=30)}
    np.testing.assert_allclose(run_model(student, test)["y"], run_model(teacher, test)["y"], rtol=1e-3, atol=1e-3)

    # The layer already matches its targets: a heavily shrunk ridge solution would be worse, so nothing changes.
    before = head.matrix().copy()
    again = layer_moments(student, [head], data)["head"]
    result = refit_layer(head, again, lam=10.0)
    assert not result.changed and result.error_after > result.error_before
    np.testing.assert_array_equal(head.matrix(), before)


def test_refit_layer_with_removed_input_channels():
    teacher = _two_layer(1)
    head = as_linear(next(n for n in teacher.graph if n.name == "head"))
    data = Dataset([{"x": randn((3, 2, 6, 6), seed=40)}])
    moments = layer_moments(teacher, [head], data)["head"]
    keep = head.input_columns([0, 2])
    result = refit_layer(head, moments, lam=0.0, keep=keep)
    # The naive cut (zeroing channels 1 and 3) is worse than the refit on channels 0 and 2.
    assert result.changed and result.error_after < result.error_before
    assert np.all(head.matrix()[[1, 3]] == 0)


def test_refit_layer_refuses_fewer_rows_than_unknowns():
    """Underdetermined refits fit the calibration rows exactly and generalize worse: left alone, said why."""
    teacher = _two_layer(0)
    student = clone(teacher)
    w2 = student.graph.initializers["w2"]
    replace_initializer(w2, (w2.const_value.numpy() + randn((3, 4, 1, 1), seed=9) * 0.5).astype(F32))
    head = as_linear(next(n for n in student.graph if n.name == "head"))
    data = Dataset([{"x": randn((1, 2, 2, 1), seed=20)}])  # a handful of rows for 4 inputs + bias
    moments = layer_moments(student, [head], data, targets={"head": "y"}, target_model=teacher)
    assert moments["head"].rows < 2 * (head.d_in + 1)
    before = head.matrix().copy()
    result = refit_layer(head, moments["head"], lam=1e-10)
    assert not result.changed and "calibration rows" in result.reason
    np.testing.assert_array_equal(head.matrix(), before)
