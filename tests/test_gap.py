"""gap: exact ReduceMean/AveragePool → GlobalAveragePool rewrites and the Flatten→Gemm head substitution."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

from graphopt.data import Dataset
from graphopt.errors import RecipeError
from graphopt.options import build_options
from graphopt.passbase import PassContext
from graphopt.passes.gap import Gap
from tests.helpers import assert_same_outputs, clone, make_model, op_types, randn, run_model, tensor_info

X4 = tensor_info("x", np.float32, [2, 3, 5, 4])


def _reduce_mean(axes: tuple[int, ...], keepdims: int, opset: int):
    inits = {}
    if opset >= 18:
        inits["axes"] = np.array(axes, np.int64)
        node = helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=keepdims)
    else:
        node = helper.make_node("ReduceMean", ["x"], ["y"], axes=list(axes), keepdims=keepdims)
    relu = helper.make_node("Relu", ["y"], ["out"])  # a consumer, so rewiring is checked too
    return make_model([node, relu], [X4], ["out", "y"], inits, opset=opset)


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("axes", [(2, 3), (3, 2), (-2, -1), (-1, 2)])
def test_reduce_mean_becomes_gap_exactly(axes, keepdims, opset):
    model = _reduce_mean(axes, keepdims, opset)
    before = clone(model)
    result = Gap()(model)
    assert result.modified and op_types(model).count("GlobalAveragePool") == 1
    assert "ReduceMean" not in op_types(model)
    assert ("Flatten" in op_types(model)) == (keepdims == 0)
    assert "axes" not in model.graph.initializers  # the axes constant went with the node
    x = randn([2, 3, 5, 4], seed=1) * 10 + 3
    assert_same_outputs(before, model, {"x": x}, rtol=1e-5, atol=1e-6)
    expected = x.mean(axis=(2, 3), keepdims=bool(keepdims))
    np.testing.assert_allclose(run_model(model, {"x": x})["y"], expected, rtol=1e-5)


@pytest.mark.parametrize("axes", [(1, 2, 3), (2,), (0, 2, 3)])
def test_reduce_mean_over_other_axes_is_left(axes):
    model = _reduce_mean(axes, 1, 13)
    assert not Gap()(model).modified
    assert "GlobalAveragePool" not in op_types(model)


def _avgpool(**attrs):
    node = helper.make_node("AveragePool", ["x"], ["y"], **attrs)
    return make_model([node], [X4], ["y"])


@pytest.mark.parametrize("attrs", [dict(kernel_shape=[5, 4]), dict(kernel_shape=[5, 4], strides=[2, 2]),
                                   dict(kernel_shape=[5, 4], pads=[0, 0, 0, 0], ceil_mode=1),
                                   # Caffe style (inception_v1): the window reaches into end padding that
                                   # count_include_pad=0 leaves out of the divisor.
                                   dict(kernel_shape=[6, 5], pads=[0, 0, 1, 1]),
                                   dict(kernel_shape=[6, 5], strides=[5, 4], auto_pad="SAME_UPPER")])
def test_full_window_average_pool_becomes_gap(attrs):
    model = _avgpool(**attrs)
    before = clone(model)
    assert Gap()(model).modified
    assert op_types(model) == ["GlobalAveragePool"]
    assert_same_outputs(before, model, {"x": randn([2, 3, 5, 4], seed=2)}, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attrs", [dict(kernel_shape=[5, 3]), dict(kernel_shape=[5, 4], pads=[1, 0, 0, 0]),
                                   dict(kernel_shape=[3, 2], dilations=[2, 3]),
                                   dict(kernel_shape=[6, 5], pads=[0, 0, 1, 1], count_include_pad=1),
                                   dict(kernel_shape=[5, 4], pads=[0, 0, 1, 1], ceil_mode=1),
                                   dict(kernel_shape=[5, 4], auto_pad="SAME_UPPER")])
def test_partial_or_padded_average_pool_is_left(attrs):
    model = _avgpool(**attrs)
    assert not Gap()(model).modified and op_types(model) == ["AveragePool"]


def _head_model(flatten: str = "Flatten", second: str = "Gemm", h: int = 6, w: int = 5):
    """x [N,3,h,w] → Conv1x1(3→4) → Relu → Flatten/Reshape → Gemm/MatMul(4hw→7) → Relu → Gemm(7→3)."""
    feats = 4 * h * w
    inits = {"cw": randn([4, 3, 1, 1], 10), "cb": randn([4], 11), "w1": randn([7, feats], 12) * 0.1,
             "b1": randn([7], 13), "w2": randn([3, 7], 14), "b2": randn([3], 15)}
    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu0")]
    if flatten == "Flatten":
        nodes.append(helper.make_node("Flatten", ["r"], ["f"], axis=1, name="flat"))
    else:
        inits["shape"] = np.array([0, -1], np.int64)
        nodes.append(helper.make_node("Reshape", ["r", "shape"], ["f"], name="flat"))
    if second == "Gemm":
        nodes.append(helper.make_node("Gemm", ["f", "w1", "b1"], ["g1"], transB=1, name="fc1"))
    else:
        inits["w1"] = np.ascontiguousarray(inits["w1"].T)
        nodes += [helper.make_node("MatMul", ["f", "w1"], ["m1"], name="fc1"),
                  helper.make_node("Add", ["m1", "b1"], ["g1"], name="fc1_bias")]
    nodes += [helper.make_node("Relu", ["g1"], ["a1"], name="relu1"),
              helper.make_node("Dropout", ["a1"], ["d1"], name="drop1"),
              helper.make_node("Gemm", ["d1", "w2", "b2"], ["out"], transB=1, name="fc2")]
    return make_model(nodes, [tensor_info("x", np.float32, ["N", 3, h, w])], ["out"], inits)


def _uniform(n: int, seed: int, h: int = 6, w: int = 5) -> np.ndarray:
    """Inputs constant across H, W: every conv feature is spatially uniform, so the head rewrite is exact."""
    return np.repeat(np.repeat(randn([n, 3, 1, 1], seed), h, axis=2), w, axis=3)


def _params(model) -> int:
    return sum(v.const_value.size for v in model.graph.initializers.values())


@pytest.mark.parametrize("flatten,second", [("Flatten", "Gemm"), ("Reshape", "Gemm"), ("Flatten", "MatMul")])
def test_head_is_exact_on_spatially_uniform_features(flatten, second):
    model = _head_model(flatten, second)
    before = clone(model)
    result = Gap(Gap.Options(head=True))(model)
    assert result.modified
    (row,) = [r for r in result.rows if r["rewrite"] == "head→GAP"]
    assert row["replaced"] == ["fc1"] and row["features"] == "4x6x5"
    assert row["params_before"] == 120 * 7 + 7 and row["params_after"] == 4 * 7 + 7
    assert {"Flatten", "Reshape"} & set(op_types(model)) == {"Flatten"}  # the new one, after the GAP
    assert op_types(model).count("GlobalAveragePool") == 1 and "MatMul" not in op_types(model)
    assert _params(before) - _params(model) == (120 - 4) * 7 + (2 if flatten == "Reshape" else 0)
    assert_same_outputs(before, model, {"x": _uniform(4, 1)}, rtol=1e-5, atol=1e-5)
    # Not exact when the features vary over positions: it is an approximation, the report says so.
    x = randn([4, 3, 6, 5], seed=2)
    assert not np.allclose(run_model(before, {"x": x})["out"], run_model(model, {"x": x})["out"], atol=1e-3)


def test_head_through_one_replaces_the_stack_and_refit_fits_the_teacher():
    model = _head_model()
    teacher = clone(model)
    calib = Dataset(feeds=[{"x": _uniform(8, s)} for s in range(6)])
    opts = build_options(Gap.Options, {"head": True, "through": 1, "ridge": 1e-8}, "gap")
    result = Gap(opts, PassContext(calib=calib, teacher=teacher))(model)
    (row,) = result.rows
    assert row["replaced"] == ["fc1", "fc2"] and row["params_after"] == 4 * 3 + 3
    assert row["refit"] and row["rel_error"] < row["rel_error_before"]
    assert op_types(model) == ["Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm"]
    assert any("vanish" in n and "Relu relu1" in n and "Dropout drop1" in n for n in result.notes)
    assert model.graph.outputs[0].name == "out"


def test_head_refit_recovers_exactly_when_a_linear_fit_exists():
    # through=0: the target (fc1's output) is linear in the GAP features on uniform inputs → exact fit,
    # starting from weights that are wrong on purpose (the averaged head is exact already, so spoil it).
    model = _head_model()
    teacher = clone(model)
    w1 = model.graph.initializers["w1"]
    w1.const_value = ir.tensor(w1.const_value.numpy() * 1.5, name="w1")
    calib = Dataset(feeds=[{"x": _uniform(8, s)} for s in range(6)])
    result = Gap(Gap.Options(head=True, ridge=1e-9), PassContext(calib=calib, teacher=teacher))(model)
    (row,) = result.rows
    assert row["refit"] and row["rel_error_before"] > 1e-3 and row["rel_error"] < 1e-8
    assert_same_outputs(teacher, model, {"x": _uniform(5, 99)}, rtol=1e-4, atol=1e-4)


def test_head_without_data_keeps_the_averaged_weights_and_says_so():
    model = _head_model()
    result = Gap(Gap.Options(head=True, through=1))(model)
    assert result.rows[0]["refit"] is False and result.rows[0]["rel_error"] is None
    assert any("no real calibration data" in n for n in result.notes)


def test_head_false_leaves_heads_alone():
    model = _head_model()
    assert not Gap()(model).modified
    assert "GlobalAveragePool" not in op_types(model)


@pytest.mark.parametrize("raw", [{"through": -1}, {"head": "maybe"}, {"through": 1.5}, {"ridge": -1.0},
                                 {"max_samples": 0}, {"heads": True}])
def test_bad_options_are_rejected_at_parse_time(raw):
    with pytest.raises(RecipeError, match="gap"):
        build_options(Gap.Options, raw, "gap")
