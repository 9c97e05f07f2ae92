"""channel_prune: removing exactly-zero channels is exact on every coupling; shapes, round_to, repair."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from graphopt import data as datamod
from graphopt import modelio
from graphopt.costs import count_macs
from graphopt.errors import RecipeError
from graphopt.options import build_options
from graphopt.passbase import PassContext
from graphopt.passes.channels import ChannelPrune, legal_keep
from graphopt.weights import constant_array
from tests.helpers import (DIGITS, GROUPED_FEED, assert_same_outputs, clone, group_of, make_model, randn, run_model,
                           shufflenet_unit, tensor_info, unit_rows)

X = tensor_info("x", np.float32, [2, 3, 8, 8])
Y = tensor_info("y", np.float32, [None, None, None, None])
Y2 = tensor_info("y", np.float32, [None, None])
FEED = {"x": randn([2, 3, 8, 8], 42)}


def _prune(model, context: PassContext | None = None, **raw):
    opts = build_options(ChannelPrune.Options, {"importance": "l1", **raw}, "channel_prune")
    return ChannelPrune(opts, context)(model)


def _conv(name, x, out, cin, cout, inits, seed, zero=(), k=3, bias=True):
    w = randn([cout, cin, k, k], seed) * 0.3
    w[list(zero)] = 0.0
    inits[f"{name}_w"] = w
    ins = [x, f"{name}_w"]
    if bias:
        b = randn([cout], seed + 100) * 0.1
        b[list(zero)] = 0.0
        inits[f"{name}_b"] = b
        ins.append(f"{name}_b")
    return helper.make_node("Conv", ins, [out], name=name, pads=[k // 2] * 4)


def _bn(name, x, out, c, inits, seed, zero=()):
    gamma, beta = 1.0 + 0.1 * randn([c], seed), 0.1 * randn([c], seed + 1)
    mean, var = 0.1 * randn([c], seed + 2), 1.0 + np.abs(randn([c], seed + 3))
    beta[list(zero)], mean[list(zero)] = 0.0, 0.0  # a zero channel stays zero through the BN
    for key, arr in (("g", gamma), ("b", beta), ("m", mean), ("v", var)):
        inits[f"{name}_{key}"] = arr.astype(np.float32)
    return helper.make_node("BatchNormalization", [x, f"{name}_g", f"{name}_b", f"{name}_m", f"{name}_v"], [out],
                            name=name)


def _check_exact(model, removed: int, **raw):
    before = clone(model)
    result = _prune(model, **raw)
    assert sum(r["channels_before"] - r["channels_after"] for r in result.rows) == removed
    onnx.checker.check_model(modelio.to_proto(model))
    assert_same_outputs(before, model, FEED, rtol=1e-5, atol=1e-5)
    assert [(v.name, v.shape) for v in model.graph.inputs] == [(v.name, v.shape) for v in before.graph.inputs]
    assert count_macs(model) < count_macs(before)
    return result


@pytest.mark.parametrize("join", ["Add", "Sum"])
def test_residual_zero_channels_pruned_exactly(join: str) -> None:
    inits: dict = {}
    zero = (1, 5)
    nodes = [_conv("a", "x", "a", 3, 8, inits, 1, zero), _bn("bna", "a", "na", 8, inits, 10, zero),
             helper.make_node("Relu", ["na"], ["ra"]),
             _conv("b", "ra", "b", 8, 8, inits, 2, zero), _bn("bnb", "b", "nb", 8, inits, 20, zero),
             helper.make_node(join, ["ra", "nb"], ["s"]), helper.make_node("Relu", ["s"], ["rs"]),
             _conv("c", "rs", "y", 8, 4, inits, 3)]
    model = make_model(nodes, [X], [Y], inits)
    _check_exact(model, 2, ratio=0.25)
    assert model.graph.initializers["bna_g"].const_value.shape == (6,)
    assert constant_array(model.graph.initializers["b_w"]).shape == (6, 6, 3, 3)


def test_concat_zero_channels_pruned_exactly() -> None:
    inits: dict = {}
    nodes = [_conv("a", "x", "a", 3, 6, inits, 1, (2,)), _conv("b", "x", "b", 3, 4, inits, 2, (1,)),
             helper.make_node("Concat", ["a", "b"], ["cat"], axis=1), helper.make_node("Relu", ["cat"], ["r"]),
             _conv("c", "r", "y", 10, 3, inits, 3)]
    model = make_model(nodes, [X], [Y], inits)
    _check_exact(model, 2, ratio=0.25)
    assert constant_array(model.graph.initializers["c_w"]).shape == (3, 8, 3, 3)


def test_depthwise_zero_channels_pruned_exactly() -> None:
    inits: dict = {"dw_w": randn([8, 1, 3, 3], 7), "dw_b": randn([8], 8)}
    inits["dw_b"][[0, 6]] = 0.0
    nodes = [_conv("a", "x", "a", 3, 8, inits, 1, (0, 6)), helper.make_node("Relu", ["a"], ["ra"]),
             helper.make_node("Conv", ["ra", "dw_w", "dw_b"], ["d"], name="dw", group=8, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["d"], ["rd"]), _conv("c", "rd", "y", 8, 3, inits, 3)]
    model = make_model(nodes, [X], [Y], inits)
    _check_exact(model, 2, ratio=0.25)
    dw = next(n for n in model.graph if n.name == "dw")
    assert dw.attributes["group"].value == 6


def test_flatten_gemm_zero_channels_pruned_exactly() -> None:
    inits: dict = {"g_w": randn([5, 4 * 16], 6), "g_b": randn([5], 9)}
    nodes = [_conv("a", "x", "a", 3, 4, inits, 1, (1,)), helper.make_node("Relu", ["a"], ["ra"]),
             helper.make_node("MaxPool", ["ra"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "g_w", "g_b"], ["y"], name="g", transB=1)]
    model = make_model(nodes, [X], [Y2], inits)
    _check_exact(model, 1, ratio=0.25)
    assert constant_array(model.graph.initializers["g_w"]).shape == (5, 3 * 16)


def test_unsqueezed_per_channel_constants_shrink() -> None:
    zero = (3,)
    scale, shift = randn([8], 11), randn([8], 12)
    shift[list(zero)] = 0.0
    inits = {"scale": scale, "shift": shift, "axes": np.array([1, 2], np.int64)}
    nodes = [_conv("a", "x", "a", 3, 8, inits, 1, zero), _bn("bn", "a", "n", 8, inits, 10, zero),
             helper.make_node("Unsqueeze", ["scale", "axes"], ["us"]),
             helper.make_node("Unsqueeze", ["shift", "axes"], ["ut"]),
             helper.make_node("Mul", ["n", "us"], ["m"]), helper.make_node("Add", ["m", "ut"], ["t"]),
             helper.make_node("Relu", ["t"], ["r"]), _conv("c", "r", "y", 8, 2, inits, 3)]
    model = make_model(nodes, [X], [Y], inits)
    _check_exact(model, 1, ratio=0.125)
    assert "Unsqueeze" not in [n.op_type for n in model.graph]


def test_group_reaching_output_is_left_intact_and_round_to() -> None:
    inits: dict = {}
    nodes = [_conv("a", "x", "a", 3, 20, inits, 1), helper.make_node("Relu", ["a"], ["ra"]),
             _conv("c", "ra", "y", 20, 4, inits, 3)]
    model = make_model(nodes, [X], [Y], inits)
    result = _prune(model, ratio=0.3, round_to=8)
    assert constant_array(model.graph.initializers["a_w"]).shape[0] == 16  # 20 - 6 = 14 -> 16
    assert constant_array(model.graph.initializers["c_w"]).shape == (4, 16, 3, 3)  # outputs untouched
    assert any("left intact" in n and "graph output" in n for n in result.notes)
    assert run_model(model, FEED)["y"].shape == (2, 4, 8, 8)


def test_legal_keep() -> None:
    assert legal_keep(64, 40, 1, 16) == 48
    assert legal_keep(20, 14, 1, 8) == 16
    assert legal_keep(10, 2, 4, 1) == 4
    assert legal_keep(12, 11, 1, 8) == 12  # rounding past the width keeps it whole


@pytest.mark.parametrize("raw", [{"ratio": 1.0}, {"ratio": 1.5}, {"ratio": {"a": 1.0}},
                                 {"ratio": {"a": 0.5}, "scope": "global"}, {"importance": "taylor"}])
def test_bad_options_rejected_at_parse_time(raw: dict) -> None:
    with pytest.raises(RecipeError, match="channel_prune"):
        build_options(ChannelPrune.Options, raw, "channel_prune")


def test_activation_importance_finds_dead_channels() -> None:
    inits: dict = {}
    nodes = [_conv("a", "x", "a", 3, 8, inits, 1, (2, 4)), helper.make_node("Relu", ["a"], ["ra"]),
             _conv("c", "ra", "y", 8, 3, inits, 3)]
    model = make_model(nodes, [X], [Y], inits)
    specs = datamod.input_specs(model)
    calib = datamod.from_arrays({"x": randn([16, 3, 8, 8], 5)}, specs, batch_size=4)
    before = clone(model)
    result = _prune(model, PassContext(calib=calib), ratio=0.25, importance="activation", repair=False)
    assert result.rows[0]["importance"] == "activation"
    assert_same_outputs(before, model, FEED, rtol=1e-5, atol=1e-5)


def _digits():
    model = modelio.load_model(DIGITS / "digits.onnx")
    calib = datamod.load_npz(DIGITS / "calib.npz", datamod.input_specs(model))
    test = np.load(DIGITS / "test.npz")
    return model, calib, test


def test_repair_reduces_output_error_on_digits() -> None:
    model, calib, test = _digits()
    ref = run_model(model, {"input": test["input"]})["logits"]
    errors, accs = {}, {}
    for repair in (False, True):
        pruned = clone(model)
        result = _prune(pruned, PassContext(calib=calib, teacher=clone(model)), ratio=0.3, scope="global",
                        repair=repair, max_samples=128)
        out = run_model(pruned, {"input": test["input"]})["logits"]
        errors[repair] = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
        accs[repair] = float(np.mean(out.argmax(1) == test["labels"]))
        assert count_macs(pruned) < 0.6 * count_macs(model)
    assert errors[True] < 0.5 * errors[False]
    assert accs[True] >= float(np.mean(ref.argmax(1) == test["labels"])) - 0.02
    assert any("with repair" in n for n in result.notes)
    refit = [r for r in result.rows if r["refit_error_after"] is not None]  # starved layers are not refit
    assert refit and all(r["refit_error_after"] <= r["refit_error_before"] for r in refit)


def test_no_data_skips_repair_with_a_note() -> None:
    model, _, _ = _digits()
    result = _prune(model, ratio=0.2, repair=True)
    assert any("repair skipped" in n for n in result.notes)


def _light(name: str) -> None:
    from models.light import build_light

    model = modelio.load_model(build_light(name))
    before = clone(model)
    _prune(model, ratio=0.3, scope="global")
    onnx.checker.check_model(modelio.to_proto(model))
    feed = {before.graph.inputs[0].name: randn([1, 3, 224, 224], 1)}
    out_a, out_b = run_model(before, feed), run_model(model, feed)
    assert [v.shape for v in out_a.values()] == [v.shape for v in out_b.values()]
    assert [(v.name, v.shape) for v in model.graph.inputs] == [(v.name, v.shape) for v in before.graph.inputs]
    assert count_macs(model) <= count_macs(before)


@pytest.mark.parametrize("name", ["squeezenet", "shufflenet"])
def test_light_models_stay_consistent(name: str) -> None:
    _light(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "vgg19", "densenet121", "inception_v1", "inception_v2"])
def test_light_models_stay_consistent_slow(name: str) -> None:
    _light(name)


def _calib(model, shape, seed=5):
    return datamod.from_arrays({"x": randn(shape, seed)}, datamod.input_specs(model), batch_size=shape[0] // 4)


def _constant_channels_model():
    """PP-LCNet-like block where the pruned channels are zero at the conv but a non-zero CONSTANT after it:
    HardSwish, a learnable affine (x·1.3 + 0.7, scalars), an unpadded depthwise conv with a bias, and an SE
    block whose Mul rescales the trunk. Dropping such channels without compensation changes the output."""
    inits: dict = {"s1": np.array([1.3], np.float32), "b1": np.array([0.7], np.float32),
                   "dw_w": randn([8, 1, 3, 3], 7), "dw_b": randn([8], 8)}
    inits["dw_b"][[1, 5]] = 1.0
    nodes = [_conv("a", "x", "a", 3, 8, inits, 1, (1, 5)),
             helper.make_node("HardSigmoid", ["a"], ["hs"], alpha=1 / 6, beta=0.5),
             helper.make_node("Mul", ["a", "hs"], ["hw"]), helper.make_node("Mul", ["hw", "s1"], ["m1"]),
             helper.make_node("Add", ["m1", "b1"], ["lab"]),
             helper.make_node("Conv", ["lab", "dw_w", "dw_b"], ["d"], name="dw", group=8),
             helper.make_node("Relu", ["d"], ["rd"]), helper.make_node("GlobalAveragePool", ["rd"], ["g"]),
             _conv("se1", "g", "e1", 8, 4, inits, 11, k=1), helper.make_node("Relu", ["e1"], ["r1"]),
             _conv("se2", "r1", "e2", 4, 8, inits, 12, (1, 5), k=1),
             helper.make_node("HardSigmoid", ["e2"], ["s"], alpha=1 / 6, beta=0.5),
             helper.make_node("Mul", ["rd", "s"], ["t"]), _conv("c", "t", "y", 8, 3, inits, 3, k=1)]
    return make_model(nodes, [X], [Y], inits)


def test_constant_channels_mean_compensated_exactly() -> None:
    diffs = {}
    for compensate in (False, True):
        model = _constant_channels_model()
        before, calib = clone(model), _calib(model, [8, 3, 8, 8])
        result = _prune(model, PassContext(calib=calib), ratio={"a": 0.25}, repair=False, compensate=compensate)
        assert [(r["channels_before"], r["channels_after"]) for r in result.rows] == [(8, 6)]
        out_a, out_b = run_model(before, FEED)["y"], run_model(model, FEED)["y"]
        diffs[compensate] = float(np.abs(out_a - out_b).max())
    assert diffs[False] > 0.05  # the removed channels were constants, not zeros
    assert diffs[True] < 1e-4  # their mean (here: the constant) now sits in the consumers' biases
    assert any("mean compensation: 2 consumer" in n for n in result.notes)  # se1 (through the pool) and c


def test_matmul_consumer_without_bias_gets_an_add() -> None:
    w1, b1, w2 = randn([6, 8], 1), randn([8], 2), randn([8, 3], 3)
    w1[:, [2, 6]], b1[[2, 6]] = 0.0, 0.5  # channels 2 and 6: Relu(0.5), a constant
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["z"], name="fc2"),
             helper.make_node("Tanh", ["z"], ["y"])]
    model = make_model(nodes, [tensor_info("x", np.float32, [4, 6])], [Y2], {"w1": w1, "b1": b1, "w2": w2})
    before = clone(model)
    _prune(model, PassContext(calib=_calib(model, [16, 6])), ratio=0.25, repair=False)
    assert [n.op_type for n in model.graph][-3:] == ["MatMul", "Add", "Tanh"]
    assert_same_outputs(before, model, {"x": randn([4, 6], 9)}, rtol=1e-5, atol=1e-5)


def _hswish(x: str, out: str) -> list:
    """HardSwish (opset 14) as x·HardSigmoid(x), as exported by older converters."""
    return [helper.make_node("HardSigmoid", [x], [out + "_g"], alpha=1 / 6, beta=0.5),
            helper.make_node("Mul", [x, out + "_g"], [out])]


def _rec_like(blocks: int = 8, c: int = 16):
    """PP-LCNet/SVTR-shaped chain: conv → HardSwish → affine (Mul/Add), then `blocks` × (depthwise 3x3 →
    HardSwish → pointwise 1x1 → HardSwish → affine), a 1x1 head, Transpose to [N, H, W, C] and a MatMul MLP
    on those [B, T, C]-style activations. Every pointwise conv, the head, fc1 (the head's channels reach it
    through the Transpose) and fc2 are repair consumers, each fed by the one before it."""
    inits: dict = {}

    def affine(x, name):
        inits[f"{name}_s"] = 1.0 + 0.2 * randn([c, 1, 1], 7)
        inits[f"{name}_b"] = 0.3 * randn([c, 1, 1], 8)
        return [*_hswish(x, f"{name}_h"), helper.make_node("Mul", [f"{name}_h", f"{name}_s"], [f"{name}_m"]),
                helper.make_node("Add", [f"{name}_m", f"{name}_b"], [f"{name}_o"])]

    def conv(name, x, cin, cout, k, seed, group=1):
        inits[f"{name}_w"] = randn([cout, cin // group, k, k], seed) * (1.5 / np.sqrt(cin // group * k * k))
        inits[f"{name}_b"] = 0.2 * randn([cout], seed + 50)
        return helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [f"{name}_y"], name=name,
                                pads=[k // 2] * 4, group=group)

    nodes, x = [conv("c0", "x", 4, c, 3, 1), *affine("c0_y", "a0")], "a0_o"
    for i in range(blocks):
        nodes += [conv(f"dw{i}", x, c, c, 3, 10 + i, group=c), *_hswish(f"dw{i}_y", f"dh{i}"),
                  conv(f"pw{i}", f"dh{i}", c, c, 1, 20 + i), *affine(f"pw{i}_y", f"a{i + 1}")]
        x = f"a{i + 1}_o"
    inits.update(fc1_w=randn([12, 32], 41) / np.sqrt(12), fc1_b=0.2 * randn([32], 42),
                 fc2_w=randn([32, 12], 43) / np.sqrt(32), fc2_b=0.2 * randn([12], 44))
    nodes += [conv("head", x, c, 12, 1, 40), helper.make_node("Transpose", ["head_y"], ["t"], perm=[0, 2, 3, 1]),
              helper.make_node("MatMul", ["t", "fc1_w"], ["f1"], name="fc1"),
              helper.make_node("Add", ["f1", "fc1_b"], ["f1b"]), *_hswish("f1b", "f1h"),
              helper.make_node("MatMul", ["f1h", "fc2_w"], ["f2"], name="fc2"),
              helper.make_node("Add", ["f2", "fc2_b"], ["y"])]
    inits = {k: v.astype(np.float32) for k, v in inits.items()}
    return make_model(nodes, [tensor_info("x", np.float32, [None, 4, 4, 24])],
                      [tensor_info("y", np.float32, [None, 4, 24, 12])], inits)


def test_repair_of_a_chain_reduces_held_out_error() -> None:
    """Regression (PP-OCRv4 rec: line accuracy 0.79 without repair, 0.00 with it): consumers refit in one data
    pass were each fit to map their *unrepaired* input to the original output; once the layer before was
    repaired too, the correction was applied twice and the error compounded down the chain (here: 0.30 -> 9.4
    with repair_rounds=1, 0.36 with the old 8 rounds). Refit in dependency waves it must fall on held-out data."""
    model = _rec_like()
    calib = _calib(model, [32, 4, 4, 24])
    test = {"x": randn([16, 4, 4, 24], 6)}
    ref = run_model(model, test)["y"]
    errors, notes = {}, {}
    for key, raw in (("none", {"repair": False}), ("waves", {"repair": True}),
                     ("one pass", {"repair": True, "repair_rounds": 1})):
        pruned = clone(model)
        result = _prune(pruned, PassContext(calib=calib), ratio=0.25, **raw)
        out = run_model(pruned, test)["y"]
        errors[key] = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
        notes[key] = result.notes
    assert errors["none"] > 0.1
    assert errors["waves"] < 0.5 * errors["none"]
    # 11 waves: c0, dw/pw of each block, and fc1 (the head conv's channels reach it through the Transpose)
    assert any("11 dependency wave(s) of consumer layers, 11 data pass(es)" in n for n in notes["waves"])
    assert errors["one pass"] <= errors["none"] * 1.02  # only the first wave is refit; the rest stay as pruned
    assert any("10 layer(s) left as pruned (their wave is beyond repair_rounds=1" in n for n in notes["one pass"])


def test_refit_undone_when_held_out_error_rises() -> None:
    """The guard: a refit that lowers the calibration error but raises it on held-out rows is not written."""
    from graphopt.capture import Moments
    from graphopt.linear import as_linear
    from graphopt.refit import refit_layer

    w = randn([6, 3], 1)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
                       [tensor_info("x", np.float32, [None, 6])], [Y2], {"w": w})
    layer = as_linear(next(iter(model.graph)))
    fit, held = Moments(6, 3), Moments(6, 3)
    x_fit, x_held = randn([20, 6], 2), randn([200, 6], 3)
    fit.update(x_fit, x_fit @ w + 0.5 * randn([20, 3], 4))  # noisy calibration targets: the refit chases noise
    held.update(x_held, x_held @ w)  # the current weights are exact on the held-out rows
    result = refit_layer(layer, fit, lam=1e-6, holdout=held)
    assert result.error_after < result.error_before  # in-sample the refit looks better ...
    assert result.holdout_before == pytest.approx(0.0, abs=1e-10) and result.holdout_after > 1e-3  # ... it is not
    assert not result.changed and "held-out" in result.reason
    np.testing.assert_array_equal(layer.matrix(), w.astype(np.float64))
    assert refit_layer(layer, fit, lam=1e-6).changed  # without the guard the noisy fit is written


def test_mean_compensation_reaches_a_matmul_graph_output() -> None:
    """fc2's output is the graph output: the removed channels' mean goes into a new Add that takes the name."""
    w1, b1, w2 = randn([6, 8], 1), randn([8], 2), randn([8, 3], 3)
    w1[:, [2, 6]], b1[[2, 6]] = 0.0, 0.5  # channels 2 and 6: Relu(0.5), a constant
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    model = make_model(nodes, [tensor_info("x", np.float32, [4, 6])], [Y2], {"w1": w1, "b1": b1, "w2": w2})
    before = clone(model)
    result = _prune(model, PassContext(calib=_calib(model, [16, 6])), ratio=0.25, repair=False)
    assert any("1 through a new Add before a graph output" in n for n in result.notes)
    assert [v.name for v in model.graph.outputs] == ["y"]
    assert_same_outputs(before, model, {"x": randn([4, 6], 9)}, rtol=1e-5, atol=1e-5)


def test_repair_after_compensation_added_a_matmul_bias() -> None:
    """The compensation's new bias Add does not exist in the original model: the target is the MatMul output."""
    w1, b1, w2 = randn([6, 8], 1), randn([8], 2), randn([8, 3], 3)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["z"], name="fc2"),
             helper.make_node("Tanh", ["z"], ["y"])]
    model = make_model(nodes, [tensor_info("x", np.float32, [None, 6])], [Y2], {"w1": w1, "b1": b1, "w2": w2})
    result = _prune(model, PassContext(calib=_calib(model, [256, 6])), ratio=0.25, repair=True)
    assert [n.op_type for n in model.graph][-3:] == ["MatMul", "Add", "Tanh"]
    assert any("repair: 1 consumer layer(s) refit, 1 improved" in n for n in result.notes)


def test_sensitivity_scope_prunes_the_insensitive_group() -> None:
    """Two parallel branches joined at the output; branch a's consumer weights are 100x smaller, so removing
    a's channels barely moves the output: sensitivity allocation takes the whole cut from a, and nothing from
    b (ratio 0.25 of the model's MACs = half of group a's, the top level)."""
    inits: dict = {}
    nodes = [_conv("pa", "x", "ha", 3, 8, inits, 1, k=3), helper.make_node("Relu", ["ha"], ["ra"]),
             _conv("ca", "ra", "ya", 8, 4, inits, 2, k=1),
             _conv("pb", "x", "hb", 3, 8, inits, 3, k=3), helper.make_node("Relu", ["hb"], ["rb"]),
             _conv("cb", "rb", "yb", 8, 4, inits, 4, k=1), helper.make_node("Add", ["ya", "yb"], ["y"])]
    inits["ca_w"] = inits["ca_w"] * 0.01
    model = make_model(nodes, [X], [Y], inits)
    before = clone(model)
    calib = _calib(model, [8, 3, 8, 8])
    result = _prune(model, PassContext(calib=calib, teacher=clone(model)), ratio=0.25, scope="sensitivity",
                    repair=False, compensate=False)
    after = {r["producers"][0]: r["channels_after"] for r in result.rows}
    assert after == {"pa": 4}
    assert any(n.startswith("sensitivity: 8 measurement(s) (2 groups x 4 levels)") for n in result.notes)
    out_a, out_b = run_model(before, FEED)["y"], run_model(model, FEED)["y"]
    assert np.linalg.norm(out_a - out_b) < 0.02 * np.linalg.norm(out_a)


# --- removal units of different sizes (grouped convs + channel shuffle): widths and scores in channels ---------
def _shuffle_group(model):
    group = group_of(model, "g1")
    assert group.prunable and group.unit_sizes == [8, 16, 16] and group.channels == 40
    return group


def _g1_rows(model) -> int:
    return model.graph.initializers["g1_w"].const_value.numpy().shape[0]


def _run_pruned_unit(**raw):
    model, _ = shufflenet_unit()
    result = _prune(model, scope="layer", **raw)
    onnx.checker.check_model(modelio.to_proto(model))
    run_model(model, GROUPED_FEED)  # onnxruntime runs the pruned grouped convs
    return model, result


def test_unit_group_report_counts_channels() -> None:
    model, result = _run_pruned_unit(ratio={"g1": 0.2})  # 8 channels: exactly the 8-channel unit
    (row,) = result.rows
    assert (row["channels_before"], row["channels_after"]) == (40, 32) and _g1_rows(model) == 32
    assert any("8 channel(s) removed" in n for n in result.notes)


@pytest.mark.parametrize("raw, kept", [
    ({"ratio": 0.7}, 16),  # 28 asked; 24 (8 + 16) is the most the units allow without passing it
    ({"ratio": 0.7, "round_to": 16}, 16),  # in units (old): 3 units rounded up to 16 units = nothing removed
    ({"ratio": 0.5, "round_to": 12}, 24),  # 20 kept asked -> 24 (multiple of 12): 16 removed
    ({"ratio": 0.7, "min_channels": 17}, 24),  # at least 17 kept: 23 removable, units allow 16
    ({"ratio": 0.7, "min_channels": 16}, 16),
])
def test_unit_group_widths_respect_round_to_and_min_channels_in_channels(raw: dict, kept: int) -> None:
    model, result = _run_pruned_unit(ratio={"g1": raw.pop("ratio")}, **raw)
    assert _g1_rows(model) == kept
    assert result.rows[0]["channels_after"] == kept
    assert not any("not met" in n for n in result.notes)


def test_unit_group_round_to_unreachable_is_noted() -> None:
    # 40 channels, round_to 5, 30%: keep 28 -> 30 asked; units remove 8 at most within it -> 32 kept, not x5
    model, result = _run_pruned_unit(ratio={"g1": 0.3}, round_to=5)
    assert _g1_rows(model) == 32
    assert any("round_to=5 not met in 1 group(s)" in n and "g1" in n for n in result.notes)


def test_unit_scores_are_per_channel_over_whole_slots() -> None:
    from graphopt.passes.channels import group_scores

    model, inits = shufflenet_unit()
    group = _shuffle_group(model)
    row_l1 = np.abs(inits["g1_w"].astype(np.float64)).reshape(40, -1).sum(axis=1)  # only g1 has producer filters
    sums = np.array([row_l1[unit_rows(group, "g1", [u])].sum() for u in range(group.size)])
    expected = sums / sums.mean() / np.array(group.unit_sizes)
    np.testing.assert_allclose(group_scores(group, "l1")[0], expected, rtol=1e-9)


def test_global_scope_compares_units_by_score_per_channel() -> None:
    import onnx_ir as ir

    model, inits = shufflenet_unit()
    group = _shuffle_group(model)
    small, big_a, big_b = 0, *[u for u in range(3) if group.unit_sizes[u] == 16]
    assert group.unit_sizes[small] == 8
    w = np.sign(inits["g1_w"])
    # per channel |w| 1.5 / 1.0 / 3.0: unit sums 24 / 32 / 96 -- the small unit has the least total but
    # not the least per channel; removing 16 channels of big_a loses less than 8 of small per channel
    for u, scale in ((small, 1.5), (big_a, 1.0), (big_b, 3.0)):
        w[unit_rows(group, "g1", [u])] *= scale
    model.graph.initializers["g1_w"].const_value = ir.tensor(w.astype(np.float32))
    keep_rows = np.setdiff1d(np.arange(40), unit_rows(group, "g1", [big_a]))
    result = _prune(model, ratio=0.2, scope="global")
    np.testing.assert_array_equal(model.graph.initializers["g1_w"].const_value.numpy(), w[keep_rows])
    assert result.rows[0]["channels_after"] == 24


def test_sensitivity_measures_every_group_before_any_group_twice(monkeypatch) -> None:
    """A time budget stops the measurements partway: the order puts every group at the level nearest the target
    ratio first, so the allocation still sees all groups (on BERT-base, 33 of 96 in 240 s once covered 8 of 24
    groups, all in the first layers). Here only the first two candidates get measured, as a budget would."""
    from graphopt.passes.channels import plan as planmod

    seen: list[str] = []

    def first_two(context, model, candidates, **kw):
        seen.extend(c.key for c in candidates)
        return real(context, model, list(candidates)[:2], **kw)

    real = planmod.measure
    monkeypatch.setattr(planmod, "measure", first_two)
    inits: dict = {}
    nodes = [_conv("pa", "x", "ha", 3, 8, inits, 1, k=3), helper.make_node("Relu", ["ha"], ["ra"]),
             _conv("ca", "ra", "ya", 8, 4, inits, 2, k=1),
             _conv("pb", "x", "hb", 3, 8, inits, 3, k=3), helper.make_node("Relu", ["hb"], ["rb"]),
             _conv("cb", "rb", "yb", 8, 4, inits, 4, k=1), helper.make_node("Add", ["ya", "yb"], ["y"])]
    model = make_model(nodes, [X], [Y], inits)
    calib = _calib(model, [8, 3, 8, 8])
    result = _prune(model, PassContext(calib=calib, teacher=clone(model)), ratio=0.25, scope="sensitivity",
                    repair=False, compensate=False)
    assert seen[:4] == ["pa@0.25", "pb@0.25", "pa@0.1", "pb@0.1"]
    # both groups measured at 0.25 only: the allocation reaches 0.25 without the unmeasured 0.05 and 0.1 below it
    after = {r["producers"][0]: r["channels_after"] for r in result.rows}
    assert after == {"pa": 6, "pb": 6}
