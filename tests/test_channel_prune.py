"""channel_prune: removing exactly-zero channels is exact on every coupling; shapes, round_to, repair."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from graphopt import data as datamod
from graphopt import modelio
from graphopt.bench import count_macs
from graphopt.errors import RecipeError
from graphopt.options import build_options
from graphopt.passbase import PassContext
from graphopt.passes.channel_prune import ChannelPrune, legal_keep
from graphopt.weights import constant_array
from tests.helpers import assert_same_outputs, clone, make_model, randn, run_model, tensor_info

X = tensor_info("x", np.float32, [2, 3, 8, 8])
Y = tensor_info("y", np.float32, [None, None, None, None])
Y2 = tensor_info("y", np.float32, [None, None])
FEED = {"x": randn([2, 3, 8, 8], 42)}
DIGITS = Path(__file__).resolve().parent.parent / "models" / "digits"


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
