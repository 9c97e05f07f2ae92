"""fold_batchnorm: exact folds for Conv, depthwise Conv, ConvTranspose (groups), Gemm (transB), and skips."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from graphopt import modelio
from graphopt.passbase import PROVENANCE_KEY
from graphopt.passes.canonicalize import Canonicalize
from graphopt.passes.fold_batchnorm import FoldBatchNorm
from tests.helpers import DIGITS, assert_same_outputs, clone, make_model, op_types, randn, run_model, tensor_info


def _bn_params(channels: int, seed: int, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "gamma": rng.uniform(0.2, 2.0, channels).astype(dtype),
        "beta": rng.standard_normal(channels).astype(dtype),
        "mean": rng.standard_normal(channels).astype(dtype),
        "var": rng.uniform(0.05, 3.0, channels).astype(dtype),
    }


def _bn(inp: str, out: str = "y", eps: float = 1e-3) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [inp, "gamma", "beta", "mean", "var"], [out], epsilon=eps, name="bn")


def _check_fold(model, feeds: dict[str, np.ndarray]) -> float:
    """Fold, then require: no BN left, the layer marked, outputs equal within 1e-5 of the output scale."""
    Canonicalize()(model)  # as in a run: gives the outputs their types for the checker
    reference = clone(model)
    result = FoldBatchNorm()(model)
    assert "BatchNormalization" not in op_types(model), result.notes
    assert len(result.rows) == 1 and result.rows[0]["bn"] == "bn"
    layer = next(n for n in model.graph if n.name == result.rows[0]["layer"])
    assert layer.metadata_props[PROVENANCE_KEY] == "fold_batchnorm"
    assert [v.name for v in model.graph.outputs] == [v.name for v in reference.graph.outputs]
    onnx.checker.check_model(modelio.to_proto(model))
    scale = max(float(np.max(np.abs(next(iter(run_model(reference, feeds).values()))))), 1.0)
    return assert_same_outputs(reference, model, feeds, rtol=0.0, atol=1e-5 * scale)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("depthwise", [False, True])
def test_conv(bias: bool, depthwise: bool) -> None:
    cin, cout = (4, 4) if depthwise else (3, 5)
    group = cin if depthwise else 1
    inits = {"w": randn((cout, cin // group, 3, 3), 1), **_bn_params(cout, 2)}
    inputs = ["x", "w"]
    if bias:
        inits["b"] = randn((cout,), 3)
        inputs.append("b")
    nodes = [helper.make_node("Conv", inputs, ["c"], pads=[1, 1, 1, 1], group=group, name="conv"), _bn("c")]
    model = make_model(nodes, [tensor_info("x", np.float32, [2, cin, 6, 6])], ["y"], inits)
    _check_fold(model, {"x": randn((2, cin, 6, 6), 4)})
    conv = next(iter(model.graph))
    assert len(conv.inputs) == 3 and conv.inputs[2].const_value.dtype == ir.DataType.FLOAT


@pytest.mark.parametrize("group,bias", [(1, True), (1, False), (2, True), (2, False)])
def test_conv_transpose(group: int, bias: bool) -> None:
    cin, cout = 4, 6
    inits = {"w": randn((cin, cout // group, 3, 3), 5), **_bn_params(cout, 6)}
    inputs = ["x", "w"]
    if bias:
        inits["b"] = randn((cout,), 7)
        inputs.append("b")
    nodes = [helper.make_node("ConvTranspose", inputs, ["c"], strides=[2, 2], group=group, name="deconv"), _bn("c")]
    model = make_model(nodes, [tensor_info("x", np.float32, [1, cin, 4, 4])], ["y"], inits)
    _check_fold(model, {"x": randn((1, cin, 4, 4), 8)})


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias", ["none", "vector", "row"])
def test_gemm(trans_b: int, bias: str) -> None:
    k, f = 7, 5
    inits = {"w": randn((f, k) if trans_b else (k, f), 9), **_bn_params(f, 10)}
    inputs = ["x", "w"]
    if bias != "none":
        inits["c"] = randn((f,) if bias == "vector" else (1, f), 11)
        inputs.append("c")
    nodes = [helper.make_node("Gemm", inputs, ["g"], transB=trans_b, alpha=0.7, beta=1.3, name="fc"), _bn("g")]
    model = make_model(nodes, [tensor_info("x", np.float32, [3, k])], ["y"], inits)
    _check_fold(model, {"x": randn((3, k), 12)})


def test_float64_weights_stay_float64() -> None:
    inits = {"w": randn((4, 3), 1, np.float64), **_bn_params(3, 2, np.float64)}
    nodes = [helper.make_node("Gemm", ["x", "w"], ["g"], name="fc"), _bn("g")]
    model = make_model(nodes, [tensor_info("x", np.float64, [2, 4])], ["y"], inits)
    _check_fold(model, {"x": randn((2, 4), 3, np.float64)})
    assert model.graph.initializers["w"].const_value.numpy().dtype == np.float64


def test_skips_when_conv_output_has_a_second_consumer() -> None:
    inits = {"w": randn((3, 3, 1, 1), 1), **_bn_params(3, 2)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), _bn("c", "b"),
             helper.make_node("Add", ["b", "c"], ["y"])]
    model = make_model(nodes, [tensor_info("x", np.float32, [1, 3, 4, 4])], ["y"], inits)
    reference = clone(model)
    result = FoldBatchNorm()(model)
    assert not result.rows and not result.modified
    assert op_types(model) == ["Conv", "BatchNormalization", "Add"]
    assert any("other consumers" in note for note in result.notes)
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(), inits["w"])
    assert_same_outputs(reference, model, {"x": randn((1, 3, 4, 4), 3)}, rtol=0, atol=0)


def test_shared_weight_is_copied_not_rewritten_for_both() -> None:
    inits = {"w": randn((3, 3, 1, 1), 1), **_bn_params(3, 2)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), _bn("c", "y"),
             helper.make_node("Conv", ["x", "w"], ["z"], name="plain")]
    model = make_model(nodes, [tensor_info("x", np.float32, [1, 3, 4, 4])], ["y", "z"], inits)
    reference = clone(model)
    result = FoldBatchNorm()(model)
    assert len(result.rows) == 1
    plain = next(n for n in model.graph if n.name == "plain")
    np.testing.assert_array_equal(plain.inputs[1].const_value.numpy(), inits["w"])
    assert_same_outputs(reference, model, {"x": randn((1, 3, 4, 4), 3)}, rtol=1e-5, atol=1e-5)


def test_compressed_weight_is_skipped_with_a_note() -> None:
    q = np.random.default_rng(0).integers(-127, 128, (3, 3, 1, 1)).astype(np.int8)
    inits = {"q": q, "qs": np.float32(0.02), "qz": np.int8(0), **_bn_params(3, 2)}
    nodes = [helper.make_node("DequantizeLinear", ["q", "qs", "qz"], ["w"]),
             helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), _bn("c")]
    model = make_model(nodes, [tensor_info("x", np.float32, [1, 3, 4, 4])], ["y"], inits)
    result = FoldBatchNorm()(model)
    assert not result.rows and "BatchNormalization" in op_types(model)
    assert any("compressed" in note for note in result.notes)
    assert model.graph.initializers["q"].const_value.dtype.name == "INT8"


def test_bundled_digits_model() -> None:
    path = DIGITS / "digits.onnx"
    if not path.exists():
        pytest.skip("models/digits/digits.onnx is not built yet")
    model = modelio.load_model(path)
    assert "BatchNormalization" in op_types(model)
    Canonicalize()(model)
    reference = clone(model)
    result = FoldBatchNorm()(model)
    assert result.rows and "BatchNormalization" not in op_types(model)
    x = np.load(DIGITS / "test.npz")["input"][:64]
    worst = assert_same_outputs(reference, model, {model.graph.inputs[0].name: x}, rtol=0, atol=1e-4)
    assert worst <= 1e-5 * max(1.0, float(np.max(np.abs(next(iter(run_model(reference, {"input": x}).values()))))))


def test_folds_inside_if_bodies() -> None:
    consts = {"w": randn((3, 2, 1, 1), 1), **_bn_params(3, 2)}
    body_nodes = [helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(a, name))
                  for name, a in consts.items()]
    body_nodes += [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), _bn("c", "yb")]
    then_g = helper.make_graph(body_nodes, "then", [], [helper.make_tensor_value_info("yb", 1, [1, 3, 2, 2])])
    else_g = helper.make_graph([helper.make_node("Conv", ["x", "w0"], ["ye"])], "else", [],
                               [helper.make_tensor_value_info("ye", 1, [1, 3, 2, 2])])
    nodes = [helper.make_node("If", ["flag"], ["y"], then_branch=then_g, else_branch=else_g)]
    model = make_model(nodes, [tensor_info("x", np.float32, [1, 2, 2, 2]), tensor_info("flag", np.bool_, [])],
                       [tensor_info("y", np.float32, [1, 3, 2, 2])], {"w0": randn((3, 2, 1, 1), 5)})
    Canonicalize()(model)
    reference = clone(model)
    result = FoldBatchNorm()(model)
    assert [row["bn"] for row in result.rows] == ["bn"]
    assert "BatchNormalization" not in op_types(model)
    then_branch = next(iter(model.graph)).attributes["then_branch"].as_graph()
    assert set(then_branch.initializers) == {"w", "conv_bias"}  # BN parameters dropped with the BN
    feeds = {"x": randn((1, 2, 2, 2), 6), "flag": np.array(True)}
    assert_same_outputs(reference, model, feeds, rtol=1e-5, atol=1e-5)
