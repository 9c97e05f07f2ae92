"""quantize: QDQ structure per op, integer kernels in onnxruntime's optimized graph, per-channel axes, int32
bias, subgraphs, the digits model, already-quantized models and mixed-range Concats."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from graphopt import data as datamod
from graphopt import modelio, saturation
from graphopt.cpu import resolve_target
from graphopt.errors import GraphoptError
from graphopt.options import build_options
from graphopt.passbase import PassContext
from graphopt.passes.quantize import Quantize, QuantizeOptions
from graphopt.runtime import make_session
from tests.helpers import DIGITS, make_proto, optimized_ops, run_model, tensor_info

RNG = np.random.default_rng(0)


def _w(*shape: int, scale: float = 0.3) -> np.ndarray:
    return (RNG.normal(size=shape) * scale).astype(np.float32)


def _quantize(proto: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], target_cpu: str = "portable",
              **options):
    model = ir.serde.deserialize_model(proto)
    data = datamod.load_data(feeds, datamod.input_specs(model))
    options.setdefault("target", "size")  # structure tests: tiny graphs are never faster in int8
    options.setdefault("bias_correction", False)  # structure tests count Q/DQ; correction may add a bias DQ
    opts = build_options(QuantizeOptions, options, "quantize")
    result = Quantize(opts, PassContext(calib=data, target=resolve_target(target_cpu)))(model)
    return model, result


def _ops(model: ir.Model) -> collections.Counter:
    return collections.Counter(n.op_type for g in [model.graph, *model.graph.subgraphs()] for n in g)


def _conv_then(op_nodes: list, inits: dict | None = None, out: str = "y", shape=(2, 4, 8, 8)):
    """x -> Conv(3x3, bias) -> Relu -> r, then the given nodes, ending in Sigmoid -> y (float op)."""
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), *op_nodes, helper.make_node("Sigmoid", ["t"], [out])]
    init = {"W": _w(8, shape[1], 3, 3), "B": _w(8)}
    init.update(inits or {})
    proto = make_proto(nodes, [tensor_info("x", np.float32, ["N", *shape[1:]])], [tensor_info(out, np.float32, None)],
                       init)
    feeds = [{"x": RNG.normal(size=shape).astype(np.float32)} for _ in range(3)]
    return proto, feeds


I64 = lambda *v: np.array(v, np.int64)  # noqa: E731

# op -> (nodes after r producing t, extra initializers, kernel expected in onnxruntime's optimized graph or None,
#        float DequantizeLinear count expected there: 1 = only before the final Sigmoid)
CASES = {
    "Add": ([helper.make_node("Conv", ["r", "W2"], ["c2"]), helper.make_node("Add", ["r", "c2"], ["t"])],
            {"W2": _w(8, 8, 1, 1)}, "QLinearAdd", 1),
    "Mul": ([helper.make_node("Mul", ["r", "r"], ["t"])], {}, "QLinearMul", 1),
    "Concat": ([helper.make_node("Conv", ["r", "W2"], ["c2"]), helper.make_node("Concat", ["r", "c2"], ["t"], axis=1)],
               {"W2": _w(8, 8, 1, 1)}, "QLinearConcat", 1),
    "AveragePool": ([helper.make_node("AveragePool", ["r"], ["t"], kernel_shape=[2, 2], strides=[2, 2])], {},
                    "QLinearAveragePool", 1),
    "GlobalAveragePool": ([helper.make_node("GlobalAveragePool", ["r"], ["t"])], {}, "QLinearGlobalAveragePool", 1),
    "MaxPool": ([helper.make_node("MaxPool", ["r"], ["t"], kernel_shape=[2, 2], strides=[2, 2])], {}, None, 1),
    "Reshape": ([helper.make_node("Reshape", ["r", "shape"], ["t"])], {"shape": I64(0, 8, 64)}, None, 1),
    "Transpose": ([helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 3, 1])], {}, None, 1),
    "Flatten": ([helper.make_node("Flatten", ["r"], ["t"])], {}, None, 1),
    "Unsqueeze": ([helper.make_node("Unsqueeze", ["r", "ax"], ["t"])], {"ax": I64(1)}, None, 1),
    "Squeeze": ([helper.make_node("GlobalAveragePool", ["r"], ["g"]), helper.make_node("Squeeze", ["g", "ax"], ["t"])],
                {"ax": I64(2, 3)}, "QLinearGlobalAveragePool", 1),
    "Slice": ([helper.make_node("Slice", ["r", "st", "en", "ax"], ["t"])],
              {"st": I64(1), "en": I64(5), "ax": I64(1)}, None, 1),
    "Resize": ([helper.make_node("Resize", ["r", "", "sc"], ["t"], mode="nearest")],
               {"sc": np.array([1, 1, 2, 2], np.float32)}, None, 1),
    "ConvTranspose": ([helper.make_node("ConvTranspose", ["r", "Wt", "Bt"], ["t"], strides=[2, 2])],
                      {"Wt": _w(8, 4, 2, 2), "Bt": _w(4)}, None, 4),  # onnxruntime 1.32 CPU: no QDQ
    # ConvTranspose fusion, it runs float on the DQ outputs (input, weight, bias); the file still shrinks
    "Split": ([helper.make_node("Split", ["r"], ["s0", "s1"], axis=1), helper.make_node("Add", ["s0", "s1"], ["t"])],
              {}, "QLinearAdd", 1),
}


@pytest.mark.parametrize("op", sorted(CASES))
def test_qdq_structure_per_op(op):
    nodes, inits, kernel, float_dq = CASES[op]
    proto, feeds = _conv_then(nodes, inits)
    model, result = _quantize(proto, feeds)
    assert result.modified
    rows = {r["node"]: r for r in result.rows}
    quantized = {r["op"] for r in result.rows if r["action"] == "int8"}
    assert {"Conv", op} <= quantized, rows
    ops = _ops(model)
    # Every Q feeds exactly one DQ; weights and bias add DQs of their own.
    assert ops["DequantizeLinear"] == ops["QuantizeLinear"] + sum(
        1 + (r.get("bias") == "int32") for r in result.rows if "weight_scale" in r)
    opt = optimized_ops(model)
    assert opt["QLinearConv"] >= 1, opt
    if kernel:
        assert opt[kernel] >= 1, opt
    assert opt["DequantizeLinear"] == float_dq, opt  # the op itself ran on integers: no DQ before it
    assert not opt["Conv"], opt
    # Numbers: int8 stays close to float.
    ref, got = run_model(proto, feeds[0])["y"], run_model(model, feeds[0])["y"]
    assert np.max(np.abs(ref - got)) < 0.05


def test_relu_folds_into_conv_output_range():
    proto, feeds = _conv_then([helper.make_node("MaxPool", ["r"], ["t"], kernel_shape=[2, 2], strides=[2, 2])])
    model, result = _quantize(proto, feeds)
    conv = next(r for r in result.rows if r["op"] == "Conv")
    assert list(conv["activations"]) == ["x", "r"]  # Q after the Relu, none between Conv and Relu
    assert conv["activations"]["r"][0] == 0.0
    relu = next(n for n in model.graph if n.op_type == "Relu")
    assert relu.inputs[0].producer().op_type == "Conv"
    assert "Relu" not in optimized_ops(model)


def _linear_model(op: str, **attrs):
    k, n = 16, 6
    if op == "MatMul":
        w = _w(k, n)
        node = helper.make_node("MatMul", ["x", "W"], ["m"])
        inits = {"W": w}
    else:
        w = _w(n, k) if attrs.get("transB") else _w(k, n)
        node = helper.make_node("Gemm", ["x", "W", "B"], ["m"], **attrs)
        inits = {"W": w, "B": _w(n, scale=2.0)}
    # Channels with very different magnitudes, so one scale per tensor would be visibly worse.
    scale = np.geomspace(0.01, 10.0, n).astype(np.float32)
    inits["W"] = (inits["W"] * (scale if (op == "MatMul" or not attrs.get("transB")) else scale[:, None])).astype(
        np.float32)
    proto = make_proto([node, helper.make_node("Relu", ["m"], ["r"]), helper.make_node("Sigmoid", ["r"], ["y"])],
                       [tensor_info("x", np.float32, ["N", k])], [tensor_info("y", np.float32, None)], inits)
    feeds = [{"x": RNG.normal(size=(8, k)).astype(np.float32)} for _ in range(2)]
    return proto, feeds, inits


def _dq_of(model: ir.Model, node_op: str, index: int) -> ir.Node:
    node = next(n for n in model.graph if n.op_type == node_op)
    return node.inputs[index].producer()


@pytest.mark.parametrize("target_cpu", ["vnni", "portable"])
@pytest.mark.parametrize("op,attrs,axis,kernel", [("Gemm", {"transB": 1}, 0, "QGemm"), ("Gemm", {}, 1, "QGemm"),
                                                  ("MatMul", {}, 1, "QLinearMatMul")])
def test_per_channel_axis(op, attrs, axis, kernel, target_cpu):
    proto, feeds, inits = _linear_model(op, **attrs)
    model, result = _quantize(proto, feeds, target_cpu)
    dq = _dq_of(model, op, 1)
    assert dq.op_type == "DequantizeLinear" and dq.attributes["axis"].value == axis
    q, scale = (v.const_value.numpy() for v in dq.inputs[:2])
    assert q.dtype == np.int8 and scale.shape == (inits["W"].shape[axis],)
    w = inits["W"]
    shape = [1, 1]
    shape[axis] = -1
    plain = np.abs(w).max(axis=1 - axis) / 127
    order = saturation.kernel_order(next(n for n in model.graph if n.op_type == op), w.shape)
    if target_cpu == "vnni":  # int32 accumulation: full-range weights, within half a step per channel
        err = np.abs(q.astype(np.float32) * scale.reshape(shape) - w)
        assert np.all(err <= scale.reshape(shape) / 2 + 1e-7)
        np.testing.assert_allclose(scale, plain, rtol=1e-6)
    else:  # no pair can leave int16; a channel's scale only grows (Gaussian weights: most channels change)
        assert not saturation.overflow_rows(order.rows(q)).any()
        assert np.all(scale >= plain * (1 - 1e-6)) and np.all(scale <= plain * 255 / 127 * (1 + 1e-6))
    assert optimized_ops(model)[kernel] == 1
    if target_cpu == "portable" or not resolve_target("host").saturates:  # full-range weights clip on AVX2
        # Gaussian weights (the worst case for pair sums): measured 0.036 pair-safe, under 0.02 full range.
        atol = 0.02 if target_cpu == "vnni" else 0.05
        np.testing.assert_allclose(run_model(model, feeds[0])["y"], run_model(proto, feeds[0])["y"], atol=atol)


def test_per_tensor_option():
    proto, feeds, inits = _linear_model("Gemm", transB=1)
    model, _ = _quantize(proto, feeds, per_channel=False)
    dq = _dq_of(model, "Gemm", 1)
    assert dq.inputs[1].const_value.numpy().shape == ()
    assert "axis" not in dq.attributes


def test_int32_bias_is_exact():
    proto, feeds, inits = _linear_model("Gemm", transB=1)
    model, _ = _quantize(proto, feeds)
    gemm = next(n for n in model.graph if n.op_type == "Gemm")
    bias_dq, w_dq, x_dq = gemm.inputs[2].producer(), gemm.inputs[1].producer(), gemm.inputs[0].producer()
    sx = np.float32(x_dq.inputs[1].const_value.numpy())
    sw = w_dq.inputs[1].const_value.numpy()
    qb, sb = bias_dq.inputs[0].const_value.numpy(), bias_dq.inputs[1].const_value.numpy()
    assert qb.dtype == np.int32 and not bias_dq.inputs[2].const_value.numpy().any()
    np.testing.assert_array_equal(sb, (sx * sw).astype(np.float32))
    np.testing.assert_array_equal(qb, np.round(inits["B"].astype(np.float64) / sb.astype(np.float64)))
    assert np.all(np.abs(qb * sb - inits["B"]) <= sb / 2 + 1e-9)


def test_model_outputs_stay_float_unless_asked():
    proto, feeds, _ = _linear_model("MatMul")
    proto.graph.node.pop()  # drop the Sigmoid: Relu's output is the model output
    proto.graph.node[-1].output[0] = "y"
    model, _ = _quantize(proto, feeds)
    assert all(u.node.op_type != "QuantizeLinear" for u in model.graph.outputs[0].uses())
    relu = model.graph.outputs[0].producer()
    assert relu.op_type == "Relu" and relu.inputs[0].producer().op_type == "DequantizeLinear"  # Q before the Relu
    assert optimized_ops(model)["QLinearMatMul"] == 1
    model, _ = _quantize(proto, feeds, quantize_outputs=True)
    out = model.graph.outputs[0]
    assert out.name == "y" and out.producer().op_type == "DequantizeLinear"
    ref = run_model(proto, feeds[0])["y"]
    np.testing.assert_allclose(run_model(model, feeds[0])["y"], ref, atol=0.02 * np.abs(ref).max())


def test_exclusions_and_uncovered_ops_get_reasons():
    proto, feeds = _conv_then([helper.make_node("Conv", ["r", "W2"], ["t0"], name="keep_me"),
                               helper.make_node("Softmax", ["t0"], ["t"], axis=1, name="sm")], {"W2": _w(8, 8, 1, 1)})
    proto.graph.node[0].name = "first"
    model, result = _quantize(proto, feeds, exclude_nodes=["keep_me"])
    reasons = {r["node"]: r.get("reason") for r in result.rows if r["action"] == "float"}
    assert reasons["keep_me"] == "excluded by exclude_nodes"
    assert "not covered" in reasons["sm"]
    model, result = _quantize(proto, feeds, exclude_ops=["Conv"])
    assert not result.modified and "QuantizeLinear" not in _ops(model)


def test_concat_of_very_different_ranges_stays_float():
    # boxes (0-320) and scores (0-1) joined like a detector head; one scale would zero the scores.
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "Wb"], ["boxes"]), helper.make_node("Conv", ["r", "Ws"], ["logit"]),
             helper.make_node("Sigmoid", ["logit"], ["scores"]),
             helper.make_node("Concat", ["boxes", "scores"], ["cat"], axis=1),
             helper.make_node("Transpose", ["cat"], ["y"], perm=[0, 2, 3, 1])]
    inits = {"W": _w(8, 3, 3, 3), "B": _w(8), "Wb": np.abs(_w(4, 8, 1, 1, scale=60.0)), "Ws": _w(2, 8, 1, 1)}
    proto = make_proto(nodes, [tensor_info("x", np.float32, ["N", 3, 8, 8])], [tensor_info("y", np.float32, None)],
                       inits)
    feeds = [{"x": np.abs(RNG.normal(size=(2, 3, 8, 8))).astype(np.float32)} for _ in range(3)]
    model, result = _quantize(proto, feeds)
    concat = next(r for r in result.rows if r["op"] == "Concat")
    assert concat["action"] == "float" and "apart" in concat["reason"]
    assert all(u.node.op_type != "QuantizeLinear" for u in next(
        n for n in model.graph if n.op_type == "Concat").outputs[0].uses())
    ref, got = run_model(proto, feeds[0])["y"], run_model(model, feeds[0])["y"]
    assert ref[..., :4].max() > 100
    assert np.max(np.abs(ref[..., 4:] - got[..., 4:])) < 0.02  # the scores survive
    assert _ops(model)["QuantizeLinear"] >= 2  # the convs are still int8


def test_if_subgraph_weights_are_quantized_weight_only():
    def branch(name: str, w: np.ndarray) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node("MatMul", ["x", f"{name}_W"], [f"{name}_y"], name=f"{name}_mm")],
                                 name, [], [tensor_info(f"{name}_y", np.float32, None)],
                                 [numpy_helper.from_array(w, f"{name}_W")])
    w_then, w_else = _w(16, 4), _w(16, 4)
    node = helper.make_node("If", ["cond"], ["y"], then_branch=branch("then", w_then),
                            else_branch=branch("else", w_else))
    proto = make_proto([node], [tensor_info("x", np.float32, ["N", 16]), tensor_info("cond", np.bool_, [])],
                       [tensor_info("y", np.float32, None)])
    x = RNG.normal(size=(4, 16)).astype(np.float32)
    feeds = [{"x": x, "cond": np.array(True)}, {"x": x, "cond": np.array(False)}]
    model, result = _quantize(proto, feeds)
    assert result.modified
    assert {r["node"] for r in result.rows if "weights only" in r["action"]} == {"then_mm", "else_mm"}
    for graph in model.graph.subgraphs():
        dq = next(n for n in graph if n.op_type == "DequantizeLinear")
        assert dq.inputs[0].const_value.numpy().dtype == np.int8
        assert not any(v.const_value.numpy().dtype == np.float32 and v.const_value.numpy().size == 64
                       for v in graph.initializers.values())  # the float weight is gone
    for feed, w in zip(feeds, (w_then, w_else)):
        got = run_model(model, feed)["y"]
        np.testing.assert_allclose(got, x @ w, atol=np.abs(x).sum(axis=1).max() * np.abs(w).max() / 254 + 1e-5)


def test_already_quantized_model_is_left_alone():
    proto, feeds, _ = _linear_model("Gemm", transB=1)
    model, _ = _quantize(proto, feeds)
    again = Quantize(QuantizeOptions(), PassContext(calib=datamod.load_data(feeds, datamod.input_specs(model))))
    before = _ops(model)
    result = again(model)
    assert not result.modified and _ops(model) == before
    assert any("already quantized" in n for n in result.notes)


def test_needs_calibration_data_and_options_parse():
    assert Quantize.needs_data(QuantizeOptions()) == "it calibrates on data"
    proto, _, _ = _linear_model("MatMul")
    with pytest.raises(GraphoptError, match="calibration data"):
        Quantize()(ir.serde.deserialize_model(proto))
    opts = build_options(QuantizeOptions, {"calibration": "entropy", "max_drop": 0.01, "exclude_ops": "Add|Mul"},
                         "quantize")
    assert (opts.calibration, opts.max_drop, opts.target, opts.activation_type) == ("entropy", 0.01, "latency", "auto")


@pytest.mark.parametrize("activation_type", ["uint8", "int8"])
def test_digits_accuracy_within_one_point(activation_type):
    from graphopt.passes.canonicalize import Canonicalize

    model = modelio.load_model(DIGITS / "digits.onnx")
    Canonicalize()(model)
    float_proto = modelio.to_proto(model)
    calib = datamod.load_data(DIGITS / "calib.npz", datamod.input_specs(model))
    opts = QuantizeOptions(activation_type=activation_type, target="size")
    result = Quantize(opts, PassContext(calib=calib))(model)
    assert result.modified
    test = np.load(DIGITS / "test.npz")
    acc = {}
    for label, m in (("float", float_proto), ("int8", modelio.to_proto(model))):
        out = make_session(m).run(None, {"input": test["input"]})[0]
        acc[label] = float((out.argmax(axis=1) == test["labels"]).mean())
    assert acc["int8"] >= acc["float"] - 0.01, acc
    weights = lambda p: sum(t.ByteSize() for t in p.graph.initializer)  # noqa: E731
    assert weights(modelio.to_proto(model)) < 0.3 * weights(float_proto)
    assert optimized_ops(model)["QLinearConv"] >= 2
