"""graphopt.passes.quantize.bias on hand-built QDQ graphs: which weight ops are sites (and why the others are not),
the bias edit for each kind of bias (apply_shift) and its undo, and the float tensor a site is compared with."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

from graphopt.passes.quantize.bias import apply_shift, find_sites, float_reference
from graphopt.weights import constant_array
from tests.helpers import make_model, run_model, tensor_info

SX = 0.02  # every activation: uint8, zero point 128
CONV_Q = np.array([[[[10]], [[-20]]], [[[30]], [[5]]], [[[-7]], [[127]]]], np.int8)  # (3, 2, 1, 1)
CONV_SW = np.array([0.01, 0.02, 0.04], np.float32)
CONV_SB = (np.float32(SX) * CONV_SW).astype(np.float32)  # int32 bias scale = input scale x weight scale
CONV_BQ = np.array([100, -50, 7], np.int32)
FEEDS = {"x4": np.random.default_rng(0).uniform(-1, 1, (1, 2, 4, 4)).astype(np.float32),
         "x2": np.random.default_rng(1).uniform(-1, 1, (3, 6)).astype(np.float32)}


class Builder:
    """onnx.helper nodes and initializers of a QDQ graph."""

    def __init__(self):
        self.nodes, self.inits = [], {}

    def activation(self, x: str) -> str:
        self.inits[f"{x}_s"], self.inits[f"{x}_z"] = np.array(SX, np.float32), np.array(128, np.uint8)
        self.nodes += [helper.make_node("QuantizeLinear", [x, f"{x}_s", f"{x}_z"], [f"{x}_q"]),
                       helper.make_node("DequantizeLinear", [f"{x}_q", f"{x}_s", f"{x}_z"], [f"{x}_d"])]
        return f"{x}_d"

    def const_dq(self, name: str, q: np.ndarray, scale: np.ndarray, axis: int = 0) -> str:
        zero = np.zeros(scale.shape, q.dtype)
        self.inits.update({f"{name}_q": q, f"{name}_s": scale, f"{name}_z": zero})
        self.nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [name],
                                           axis=axis))
        return name


def _w8(shape, seed) -> np.ndarray:
    return np.random.default_rng(seed).integers(-127, 128, shape).astype(np.int8)


def _model(conv_bias: bool = True, opset: int = 13) -> ir.Model:
    """conv (int32 bias or none), gemm (transB, float bias), mm_add (MatMul + Add by a float constant): sites;
    mm_alone (MatMul into a graph output), gemm_alpha (alpha 0.5): skipped; float_mm (float weight): neither."""
    b = Builder()
    x4, x2 = b.activation("x4"), b.activation("x2")
    conv_in = [x4, b.const_dq("cw", CONV_Q, CONV_SW)]
    if conv_bias:
        conv_in.append(b.const_dq("cb", CONV_BQ, CONV_SB))
    b.inits.update({"gb": np.array([0.5, -1.0, 2.0, 0.25], np.float32), "add_c": np.arange(5, dtype=np.float32),
                    "float_w": np.ones((6, 2), np.float32)})
    b.nodes += [
        helper.make_node("Conv", conv_in, ["yc"], name="conv"),
        helper.make_node("Gemm", [x2, b.const_dq("gw", _w8((4, 6), 1), np.full(4, 0.01, np.float32)), "gb"], ["yg"],
                         transB=1, name="gemm"),
        helper.make_node("MatMul", [x2, b.const_dq("mw", _w8((6, 5), 2), np.full(5, 0.01, np.float32), 1)], ["mm"],
                         name="mm_add"),
        helper.make_node("Add", ["mm", "add_c"], ["ym"], name="add"),
        helper.make_node("MatMul", [x2, b.const_dq("aw", _w8((6, 3), 3), np.full(3, 0.01, np.float32), 1)], ["ya"],
                         name="mm_alone"),
        helper.make_node("Gemm", [x2, b.const_dq("hw", _w8((6, 2), 4), np.full(2, 0.01, np.float32), 1)], ["yh"],
                         alpha=0.5, name="gemm_alpha"),
        helper.make_node("MatMul", [x2, "float_w"], ["yf"], name="float_mm"),
    ]
    inputs = [tensor_info("x4", np.float32, [1, 2, 4, 4]), tensor_info("x2", np.float32, [3, 6])]
    return make_model(b.nodes, inputs, ["yc", "yg", "ym", "ya", "yh", "yf"], b.inits, opset=opset)


def _site(model: ir.Model, name: str):
    return next(s for s in find_sites(model)[0] if s.node.name == name)


def test_find_sites_takes_quantized_weight_ops_and_says_why_not():
    sites, skipped = find_sites(_model())
    assert [(s.node.name, s.output, s.axis, s.channels) for s in sites] == [
        ("conv", "yc", 1, 3), ("gemm", "yg", 1, 4), ("mm_add", "mm", -1, 5)]  # graph order
    assert skipped == {"mm_alone": "MatMul without a following Add by a float constant: no bias to correct",
                       "gemm_alpha": "Gemm with alpha/beta != 1"}  # float_mm: a float op, not a site at all


def test_int32_bias_shift_changes_the_integers_and_the_output_by_delta():
    model = _model()
    before = run_model(model, FEEDS)
    site = _site(model, "conv")
    delta = CONV_SB.astype(np.float64) * np.array([300, -200, 1000])  # whole bias steps
    done, undo = apply_shift(site, delta)
    assert done == {"bias": "int32"}
    dq = site.node.inputs[2].producer()
    np.testing.assert_array_equal(constant_array(dq.inputs[0]), CONV_BQ - [300, -200, 1000])  # [-200, 150, -993]
    np.testing.assert_array_equal(constant_array(dq.inputs[1]), CONV_SB)  # same scale: still fuses
    after = run_model(model, FEEDS)
    np.testing.assert_allclose(after["yc"] - before["yc"], np.broadcast_to(-delta.reshape(1, 3, 1, 1), (1, 3, 4, 4)),
                               atol=1e-5)
    for name in ("yg", "ym", "ya", "yh", "yf"):
        np.testing.assert_array_equal(after[name], before[name])
    undo()
    np.testing.assert_array_equal(constant_array(site.node.inputs[2].producer().inputs[0]), CONV_BQ)
    np.testing.assert_array_equal(run_model(model, FEEDS)["yc"], before["yc"])


def test_int32_bias_shift_rounds_to_the_nearest_step():
    model = _model()
    site = _site(model, "conv")
    apply_shift(site, CONV_SB.astype(np.float64) * np.array([0.4, -0.6, 2.5001]))
    q = constant_array(site.node.inputs[2].producer().inputs[0])
    np.testing.assert_array_equal(q, CONV_BQ - [0, -1, 3])


def test_float_bias_and_following_add_are_shifted_in_float():
    model = _model()
    delta = np.array([0.5, 0.25, -1.0, 2.0])
    done, undo = apply_shift(_site(model, "gemm"), delta)
    assert done == {"bias": "float"}
    gb = next(n for n in model.graph if n.name == "gemm").inputs[2]
    np.testing.assert_array_equal(constant_array(gb), np.array([0.0, -1.25, 3.0, -1.75], np.float32))
    undo()
    np.testing.assert_array_equal(constant_array(gb), np.array([0.5, -1.0, 2.0, 0.25], np.float32))

    before = run_model(model, FEEDS)["ym"]
    done, _ = apply_shift(_site(model, "mm_add"), np.full(5, 0.5))
    assert done == {"bias": "float (following Add)"}
    add_c = next(n for n in model.graph if n.name == "add").inputs[1]
    np.testing.assert_array_equal(constant_array(add_c), np.arange(5, dtype=np.float32) - 0.5)
    np.testing.assert_allclose(run_model(model, FEEDS)["ym"], before - 0.5, atol=1e-5)


def test_conv_without_bias_gets_a_new_int32_bias_and_undo_removes_it():
    model = _model(conv_bias=False)
    before = run_model(model, FEEDS)["yc"]
    initializers = set(model.graph.initializers)
    site = _site(model, "conv")
    delta = CONV_SB.astype(np.float64) * np.array([400, -800, 100])
    done, undo = apply_shift(site, delta)
    assert done == {"bias": "int32 (new)"}
    dq = site.node.inputs[2].producer()
    assert dq.op_type == "DequantizeLinear" and dq.attributes.get_int("axis") == 0
    np.testing.assert_array_equal(constant_array(dq.inputs[1]), CONV_SB)  # input scale x weight scale
    np.testing.assert_array_equal(constant_array(dq.inputs[0]), np.array([-400, 800, -100], np.int32))
    np.testing.assert_allclose(run_model(model, FEEDS)["yc"] - before,
                               np.broadcast_to(-delta.reshape(1, 3, 1, 1), (1, 3, 4, 4)), atol=1e-5)
    undo()
    assert len(site.node.inputs) == 2 and set(model.graph.initializers) == initializers
    assert dq not in list(model.graph)
    np.testing.assert_array_equal(run_model(model, FEEDS)["yc"], before)


def test_new_bias_below_opset_13_stays_float():
    # a per-axis DequantizeLinear needs opset 13: the new bias is a float initializer (-delta)
    model = _model(conv_bias=False, opset=12)
    site = _site(model, "conv")
    done, _ = apply_shift(site, np.array([0.5, -0.25, 1.0]))
    assert done == {"bias": "float (new)"}
    np.testing.assert_array_equal(constant_array(site.node.inputs[2]), np.array([-0.5, 0.25, -1.0], np.float32))


def _teacher(scale: np.ndarray | None) -> ir.Model:
    """The float conv the int8 one was made from; with ``scale``, fuse's conv_affine view: the teacher's Conv
    has weights and bias / scale and a Mul by ``scale`` follows it (the int8 Conv kept the name "yc")."""
    tw = CONV_Q.astype(np.float64) * CONV_SW.reshape(3, 1, 1, 1)
    tb = CONV_BQ * CONV_SB.astype(np.float64)
    nodes = [helper.make_node("Conv", ["x4", "tw", "tb"], ["yc"], name="conv")]
    inits = {"tw": tw.astype(np.float32), "tb": tb.astype(np.float32)}
    if scale is not None:
        inits.update({"tw": (tw / scale.reshape(3, 1, 1, 1)).astype(np.float32),
                      "tb": (tb / scale).astype(np.float32), "c": scale.reshape(1, 3, 1, 1).astype(np.float32)})
        nodes.append(helper.make_node("Mul", ["yc", "c"], ["z"]))
    return make_model(nodes, [tensor_info("x4", np.float32, [1, 2, 4, 4])], ["z" if scale is not None else "yc"],
                      inits)


@pytest.mark.parametrize("scale, expected", [
    (None, ("yc", None)),  # the same weights under the same name: that tensor
    (np.array([2.0, 1.0, 0.5]), ("z", None)),  # a Mul folded into the int8 Conv: the tensor after the Mul
])
def test_float_reference_follows_a_folded_per_channel_chain(scale, expected):
    assert float_reference(_site(_model(), "conv"), _teacher(scale)) == expected


def test_float_reference_refuses_other_weights_and_missing_names():
    site = _site(_model(), "conv")
    other = _teacher(None)
    other.graph.initializers["tw"].const_value = ir.tensor(np.full((3, 2, 1, 1), 9.0, np.float32), name="tw")
    assert float_reference(site, other) == (
        None, "float weight of the same-named output is not this layer's weight (a fused Mul/Div?)")
    site.output = "nowhere"
    assert float_reference(site, _teacher(None)) == (None, "output 'nowhere' has no counterpart in the float model")


def test_float_reference_accepts_pair_safe_weights_and_still_refuses_a_scaled_copy():
    # Pair-safe int8 (the default portable target) cuts kernel pairs whose same-sign sum could overflow a
    # saturating u8×s8 kernel: those weights lie steps away from the float ones, by design. The float model
    # quantize started from is still this layer's reference (the check used to refuse it: 53 of 54 ResNet-50
    # layers went uncorrected).
    from graphopt import saturation
    from graphopt.passes.quantize.intweights import quantize_weight_safe

    w = np.random.default_rng(0).normal(size=(8, 128, 3, 3)).astype(np.float32)
    q, sw, changed = quantize_weight_safe(w, 0, saturation.KernelOrder("Conv"))
    step = sw.reshape(-1, 1, 1, 1)
    assert changed and np.abs(w - q * step).max() > 1.0 * sw.max()  # some weights were cut, not just rounded
    b = Builder()
    x = b.activation("x")
    b.nodes.append(helper.make_node("Conv", [x, b.const_dq("qw", q, sw)], ["y"], name="conv"))
    inputs = [tensor_info("x", np.float32, [1, 128, 4, 4])]
    site = _site(make_model(b.nodes, inputs, ["y"], b.inits), "conv")
    teacher = make_model([helper.make_node("Conv", ["x", "tw"], ["y"], name="conv")], inputs, ["y"], {"tw": w})
    assert float_reference(site, teacher) == ("y", None)
    teacher.graph.initializers["tw"].const_value = ir.tensor(w * np.float32(0.9), name="tw")  # a folded Mul
    assert float_reference(site, teacher) == (
        None, "float weight of the same-named output is not this layer's weight (a fused Mul/Div?)")
