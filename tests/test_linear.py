"""graphopt.linear: the matrix view of Gemm/MatMul/Conv checked against onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from graphopt.linear import as_linear, fold_output, linear_layers, num_rows, unfold
from tests.helpers import assert_same_outputs, clone, make_model, randn, run_model, tensor_info

F32 = np.float32


def _node(model, op):
    return next(n for n in model.graph if n.op_type == op)


def _check_rows(model, layer, x):
    """unfold(x) @ W + b equals the layer output onnxruntime computes."""
    y = run_model(model, {"x": x})[model.graph.outputs[0].name]
    got = unfold(x, layer) @ layer.matrix() + layer.bias_vector()
    np.testing.assert_allclose(got, fold_output(y, layer), rtol=1e-4, atol=1e-4)
    assert num_rows(x, layer) == got.shape[0]


def _conv_model(cin, cout, kernel, bias=True, **attrs):
    w = randn((cout, cin, *kernel), seed=1)
    inits = {"w": w}
    inputs = ["x", "w"]
    if bias:
        inits["b"] = randn((cout,), seed=2)
        inputs.append("b")
    nsp = len(kernel)
    node = helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)
    return make_model([node], [tensor_info("x", F32, ["N", cin] + [None] * nsp)], ["y"], inits)


CONV_CONFIGS = [
    dict(kernel=(3, 3)),
    dict(kernel=(3, 3), strides=[2, 2], pads=[1, 1, 1, 1]),
    dict(kernel=(3, 2), strides=[2, 1], pads=[0, 1, 2, 0], dilations=[2, 1]),  # asymmetric pads
    dict(kernel=(3, 3), strides=[2, 2], auto_pad="SAME_UPPER"),
    dict(kernel=(2, 2), strides=[1, 1], auto_pad="SAME_UPPER"),
    dict(kernel=(2, 4), strides=[2, 3], auto_pad="SAME_LOWER"),
    dict(kernel=(3, 3), dilations=[2, 2], auto_pad="VALID"),
    dict(kernel=(1, 1), strides=[2, 2]),
    dict(kernel=(3,), strides=[2], pads=[1, 2]),  # 1-D
]


@pytest.mark.parametrize("config", CONV_CONFIGS, ids=lambda c: str(sorted(c.items())))
def test_conv_im2col_matches_onnxruntime(config):
    config = dict(config)
    kernel = config.pop("kernel")
    model = _conv_model(3, 4, kernel, **config)
    layer = as_linear(_node(model, "Conv"))
    assert layer is not None and layer.kind == "conv" and layer.d_in == 3 * int(np.prod(kernel))
    spatial = (9, 7)[: len(kernel)]
    _check_rows(model, layer, randn((2, 3, *spatial), seed=3))


def test_conv_row_subset_and_no_bias():
    model = _conv_model(2, 5, (3, 3), bias=False, strides=[2, 1], pads=[1, 0, 1, 2])
    layer = as_linear(_node(model, "Conv"))
    assert layer.bias is None and np.all(layer.bias_vector() == 0)
    x = randn((3, 2, 8, 6), seed=4)
    _check_rows(model, layer, x)
    rows = np.array([0, 5, 7, num_rows(x, layer) - 1])
    np.testing.assert_array_equal(unfold(x, layer, rows), unfold(x, layer)[rows])
    y = run_model(model, {"x": x})["y"]
    np.testing.assert_array_equal(fold_output(y, layer, rows), fold_output(y, layer)[rows])


def test_input_columns_of_conv_are_its_channel_taps():
    layer = as_linear(_node(_conv_model(3, 4, (2, 2)), "Conv"))
    w = layer.matrix()
    raw = layer.weight.const_value.numpy()
    cols = layer.input_columns([2])
    np.testing.assert_array_equal(w[cols].T, raw[:, 2].reshape(4, -1))


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0)])
def test_gemm_matrix(trans_b, alpha, beta):
    w = randn((6, 5) if trans_b else (5, 6), seed=5)
    node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="fc", transB=trans_b, alpha=alpha, beta=beta)
    model = make_model([node], [tensor_info("x", F32, ["N", 5])], ["y"], {"w": w, "c": randn((6,), seed=6)})
    layer = as_linear(_node(model, "Gemm"))
    assert (layer.d_in, layer.d_out) == (5, 6)
    x = randn((4, 5), seed=7)
    _check_rows(model, layer, x)
    before = clone(model)
    layer.set_matrix(layer.matrix(), layer.bias_vector())  # alpha/beta folded in, reset to 1
    assert_same_outputs(before, model, {"x": x}, rtol=1e-5, atol=1e-5)


def test_matmul_rank3_with_and_without_bias():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "b"], ["y"])]
    model = make_model(nodes, [tensor_info("x", F32, ["N", 3, 4])], ["y"],
                       {"w": randn((4, 6), seed=8), "b": randn((6,), seed=9)})
    layer = as_linear(_node(model, "MatMul"))
    assert layer.kind == "matmul" and layer.bias is not None and layer.output.name == "y"
    _check_rows(model, layer, randn((2, 3, 4), seed=10))

    plain = make_model(nodes[:1], [tensor_info("x", F32, ["N", 3, 4])], ["m"], {"w": randn((4, 6), seed=8)})
    layer = as_linear(_node(plain, "MatMul"))
    assert layer.bias is None and layer.output.name == "m"
    x = randn((2, 3, 4), seed=10)
    _check_rows(plain, layer, x)
    # A bias on a MatMul that has none: an Add is inserted; the graph output keeps its name.
    b = np.arange(6, dtype=np.float64)
    layer.set_matrix(layer.matrix(), b)
    assert [n.op_type for n in plain.graph] == ["MatMul", "Add"] and plain.graph.outputs[0].name == "m"
    assert layer.output.name == "m" and np.allclose(layer.bias_vector(), b)
    _check_rows(plain, layer, x)
    assert as_linear(_node(plain, "MatMul")).bias is not None  # recognised again


def test_set_matrix_round_trip_and_new_bias():
    model = _conv_model(3, 4, (3, 3), bias=False, pads=[1, 1, 1, 1])
    x = randn((2, 3, 6, 5), seed=11)
    before = clone(model)
    layer = as_linear(_node(model, "Conv"))
    layer.set_matrix(layer.matrix(), None)
    assert_same_outputs(before, model, {"x": x}, rtol=0, atol=0)
    assert layer.weight.const_value.numpy().dtype == np.float32
    layer.set_matrix(layer.matrix() * 2, np.ones(4))  # creates the bias input
    assert len(layer.node.inputs) == 3 and layer.bias is not None
    out = run_model(model, {"x": x})["y"]
    np.testing.assert_allclose(out, 2 * run_model(before, {"x": x})["y"] + 1, rtol=1e-5, atol=1e-5)


def test_set_matrix_copies_a_shared_weight():
    w = randn((4, 4), seed=12)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="a"),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="b")]
    model = make_model(nodes, [tensor_info("x", F32, ["N", 4])], ["y"], {"w": w})
    first = as_linear(_node(model, "MatMul"))
    first.set_matrix(np.zeros((4, 4)))
    second = [n for n in model.graph][1]
    assert first.weight is not second.inputs[1]
    np.testing.assert_array_equal(second.inputs[1].const_value.numpy(), w)


def test_unsupported_layers_are_none():
    dw = helper.make_node("Conv", ["x", "w"], ["y"], group=2)
    model = make_model([dw], [tensor_info("x", F32, [1, 2, 5, 5])], ["y"], {"w": randn((2, 1, 3, 3))})
    assert as_linear(_node(model, "Conv")) is None
    ta = helper.make_node("Gemm", ["x", "w"], ["y"], transA=1)
    model = make_model([ta], [tensor_info("x", F32, [3, 2])], ["y"], {"w": randn((3, 4))})
    assert as_linear(_node(model, "Gemm")) is None
    full_c = helper.make_node("Gemm", ["x", "w", "c"], ["y"])
    model = make_model([full_c], [tensor_info("x", F32, [2, 3])], ["y"], {"w": randn((3, 4)), "c": randn((2, 4))})
    assert as_linear(_node(model, "Gemm")) is None
    dyn = helper.make_node("MatMul", ["x", "v"], ["y"])
    model = make_model([dyn], [tensor_info("x", F32, [2, 3]), tensor_info("v", F32, [3, 4])], ["y"])
    assert as_linear(_node(model, "MatMul")) is None and linear_layers(model.graph) == []
