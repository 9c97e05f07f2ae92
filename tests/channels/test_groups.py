"""channel_prune on grouped convs, channel shuffles, Slice and Squeeze: zero channels are removed exactly."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from graphopt import modelio
from graphopt.costs import count_macs, value_dims
from graphopt.options import build_options
from graphopt.passes.channels import ChannelPrune, analyze
from tests.helpers import (GROUPED_FEED, GROUPED_X, assert_same_outputs, channel_shuffle, clone, group_of, make_model,
                           randn, run_model, shufflenet_unit, tensor_info, unit_rows)

Y = tensor_info("y", np.float32, [None, None, None, None])
Z = tensor_info("z", np.float32, [None, None])
B = tensor_info("b", np.float32, [None, None, None, None])


def _prune(model, **raw):
    opts = build_options(ChannelPrune.Options, {"importance": "l1", "scope": "layer", **raw}, "channel_prune")
    return ChannelPrune(opts)(model)


def _zero_units_and_prune(model, inits, producer: str, units: list[int]):
    group = group_of(model, producer)
    assert group.prunable and group.unit_sizes is not None
    rows = unit_rows(group, producer, units)
    assert len(rows) == sum(group.unit_sizes[u] for u in units)
    w = inits[f"{producer}_w"].copy()
    w[rows] = 0.0
    model.graph.initializers[f"{producer}_w"].const_value = onnx_ir_tensor(w)
    if f"{producer}_b" in inits:
        b = inits[f"{producer}_b"].copy()
        b[rows] = 0.0
        model.graph.initializers[f"{producer}_b"].const_value = onnx_ir_tensor(b)
    before = clone(model)
    result = _prune(model, ratio={producer: len(rows) / group.channels})  # ratios count channels
    onnx.checker.check_model(modelio.to_proto(model))
    assert_same_outputs(before, model, GROUPED_FEED, rtol=1e-5, atol=1e-5)
    assert count_macs(model) < count_macs(before)
    return group, rows, result


def onnx_ir_tensor(array: np.ndarray):
    import onnx_ir as ir

    return ir.tensor(np.ascontiguousarray(array))


def test_shuffle_unit_groups_balance_both_grouped_convs() -> None:
    model, _ = shufflenet_unit()
    group = group_of(model, "g1")
    # shuffle columns are 4 channels (channel j of each of g1's 4 groups); g2's 4 input groups of 10 positions
    # hold 2.5 columns each: units are one pure column per g2 group (16 ch) or the two straddling columns (8)
    assert group.prunable and sorted(group.unit_sizes) == [8, 16, 16]
    g2 = next(k.slot for k in group.links if k.slot.node.name == "g2")
    assert g2.groups == 4 and g2.channels == 40 and g2.role == "member"
    for u in range(group.size):  # every unit: equal counts in each group of g1 (rows) and of g2 (inputs)
        rows = unit_rows(group, "g1", [u])
        assert np.bincount(np.array(rows) // 10, minlength=4).tolist() == [len(rows) // 4] * 4
        cols = sorted({k.offset + u - k.start for k in group.links if k.slot is g2 and k.start <= u < k.start + k.length})
        assert np.bincount(np.array(cols) // 10, minlength=4).tolist() == [len(cols) // 4] * 4


def _stream_model():
    """A two-block ShuffleNet stage (g=2): stem -> [concat block: gconv-shuffle-dw-gconv ‖ AveragePool] ->
    [residual block: gconv-shuffle-dw-gconv + Sum] -> head conv. The residual Sum joins a grouped conv's
    16 channels with the Concat's [8 | 8]: position-wise ties."""
    inits = {"stem_w": randn([8, 8, 3, 3], 1) * 0.3, "stem_b": randn([8], 2) * 0.1,
             "p1_w": randn([8, 4, 1, 1], 3), "dw1_w": randn([8, 1, 3, 3], 4), "q1_w": randn([8, 4, 1, 1], 5),
             "q1_b": randn([8], 6) * 0.1, "p2_w": randn([8, 8, 1, 1], 7), "dw2_w": randn([8, 1, 3, 3], 8),
             "q2_w": randn([16, 4, 1, 1], 9), "q2_b": randn([16], 10) * 0.1, "head_w": randn([4, 16, 1, 1], 11)}
    conv = helper.make_node
    nodes = [conv("Conv", ["x", "stem_w", "stem_b"], ["st"], name="stem", pads=[1, 1, 1, 1]),
             conv("Relu", ["st"], ["s0"]),
             conv("Conv", ["s0", "p1_w"], ["p1"], name="p1", group=2), conv("Relu", ["p1"], ["rp1"]),
             *channel_shuffle("rp1", "sh1", 2, 8, inits, "a"),
             conv("Conv", ["sh1", "dw1_w"], ["d1"], name="dw1", group=8, pads=[1, 1, 1, 1]),
             conv("Conv", ["d1", "q1_w", "q1_b"], ["q1"], name="q1", group=2),
             conv("AveragePool", ["s0"], ["ap"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             conv("Concat", ["q1", "ap"], ["cat"], axis=1), conv("Relu", ["cat"], ["s1"]),
             conv("Conv", ["s1", "p2_w"], ["p2"], name="p2", group=2), conv("Relu", ["p2"], ["rp2"]),
             *channel_shuffle("rp2", "sh2", 2, 8, inits, "b"),
             conv("Conv", ["sh2", "dw2_w"], ["d2"], name="dw2", group=8, pads=[1, 1, 1, 1]),
             conv("Conv", ["d2", "q2_w", "q2_b"], ["q2"], name="q2", group=2),
             conv("Sum", ["q2", "s1"], ["sum"]), conv("Relu", ["sum"], ["s2"]),
             conv("Conv", ["s2", "head_w"], ["y"], name="head")]
    return make_model(nodes, [GROUPED_X], [Y], inits)


@pytest.mark.parametrize("units", [[0], [1, 2]])
def test_residual_stream_of_concat_and_grouped_convs_pruned_exactly(units: list[int]) -> None:
    model = _stream_model()
    group = group_of(model, "stem")
    assert group.prunable and {"stem", "q1", "q2"} <= {p.name for p in group.producers}
    assert group.size >= 3
    for k in group.links:  # zero every producer row / bias entry of the chosen units
        slot = k.slot
        if slot.role == "producer":
            init = model.graph.initializers[slot.node.inputs[slot.index].name]
            array = init.const_value.numpy().copy()
            for u in units:
                if k.start <= u < k.start + k.length:
                    np.moveaxis(array, slot.axis, 0)[k.offset + u - k.start] = 0.0
            init.const_value = onnx_ir_tensor(array)
    before = clone(model)
    _prune(model, ratio={"stem": sum(group.unit_sizes[u] for u in units) / group.channels})
    onnx.checker.check_model(modelio.to_proto(model))
    assert_same_outputs(before, model, GROUPED_FEED, rtol=1e-5, atol=1e-5)
    assert count_macs(model) < count_macs(before)
    removed = sum(group.unit_sizes[u] for u in units)
    assert model.graph.initializers["head_w"].const_value.numpy().shape[1] < 16 and removed > 0


@pytest.mark.parametrize("units", [[0], [1, 2]])
def test_shuffle_unit_zero_channels_pruned_exactly(units: list[int]) -> None:
    model, inits = shufflenet_unit()
    group, rows, result = _zero_units_and_prune(model, inits, "g1", units)
    w1 = model.graph.initializers["g1_w"].const_value.numpy()
    assert w1.shape[0] == 40 - len(rows)
    g1 = next(n for n in model.graph if n.name == "g1")
    assert g1.attributes["group"].value == 4  # rectangular weight, group kept
    dw = next(n for n in model.graph if n.name == "dw")
    assert dw.attributes["group"].value == 40 - len(rows)
    assert model.graph.initializers["g2_w"].const_value.numpy().shape == (8, (40 - len(rows)) // 4, 1, 1)


def test_grouped_consumer_without_shuffle_loses_per_group_columns() -> None:
    # a (plain, 8 ch) -> gconv b (group 2, 8 -> 8) -> Relu -> c (plain) -> y: a's group is coloured by b's input
    # groups (units: one channel of each half), b's output by its own output groups.
    inits = {"a_w": randn([8, 8, 3, 3], 1), "b_w": randn([8, 4, 1, 1], 2), "c_w": randn([5, 8, 1, 1], 3)}
    nodes = [helper.make_node("Conv", ["x", "a_w"], ["a"], name="a", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "b_w"], ["b"], name="b", group=2),
             helper.make_node("Relu", ["b"], ["rb"]), helper.make_node("Conv", ["rb", "c_w"], ["y"], name="c")]
    model = make_model(nodes, [GROUPED_X], [Y], inits)
    for producer, units in (("a", [2]), ("b", [0, 3])):
        m = clone(model)
        _zero_units_and_prune(m, dict(inits), producer, units)
        group = group_of(model, producer)
        assert group.unit_sizes == [2] * 4


def test_shuffle_with_blocked_half_leaves_group_intact_with_reason() -> None:
    # the shuffle's columns pair a free channel with one of a group that reaches the graph output
    inits = {"a_w": randn([4, 8, 1, 1], 1), "b_w": randn([4, 8, 1, 1], 2), "c_w": randn([3, 8, 1, 1], 3)}
    nodes = [helper.make_node("Conv", ["x", "a_w"], ["a"], name="a"),
             helper.make_node("Conv", ["x", "b_w"], ["b"], name="b"),
             helper.make_node("Concat", ["a", "b"], ["cat"], axis=1), *channel_shuffle("cat", "s", 2, 8, inits, "sh"),
             helper.make_node("Conv", ["s", "c_w"], ["y"], name="c")]
    model = make_model(nodes, [GROUPED_X], [Y, B], inits)
    group = group_of(model, "a")
    assert not group.prunable and "grouped Conv / channel shuffle" in group.reasons[-1]


def test_slice_squeeze_unsqueeze_follow_the_channels() -> None:
    zero = [0, 3]
    w = randn([8, 8, 3, 3], 1)
    w[zero] = 0.0
    inits = {"a_w": w, "st": np.array([1], np.int64), "en": np.array([7], np.int64), "ax": np.array([1], np.int64),
             "sq": np.array([2, 3], np.int64), "g_w": randn([6, 4], 2), "c_w": randn([3, 6, 1, 1], 3)}
    nodes = [helper.make_node("Conv", ["x", "a_w"], ["a"], name="a", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["ra"]),
             helper.make_node("Slice", ["ra", "st", "en", "ax"], ["sl"], name="slice"),  # channels 1..6
             helper.make_node("Conv", ["sl", "c_w"], ["y"], name="c"),
             helper.make_node("GlobalAveragePool", ["sl"], ["gp"]),
             helper.make_node("Squeeze", ["gp", "sq"], ["q"], name="sq"),
             helper.make_node("Gemm", ["q", "g_w"], ["z"], name="g"),
             helper.make_node("Unsqueeze", ["q", "sq"], ["uq"], name="uq"),  # back to [N, 6, 1, 1]
             helper.make_node("Conv", ["uq", "u_w"], ["w"], name="u")]
    inits["u_w"] = randn([2, 6, 1, 1], 4)
    model = make_model(nodes, [GROUPED_X], [Y, Z, tensor_info("w", np.float32, [None, None, None, None])], inits)
    before = clone(model)
    _prune(model, ratio={"a": 0.25})  # channel 0 lies outside the slice, 3 inside
    onnx.checker.check_model(modelio.to_proto(model))
    assert_same_outputs(before, model, GROUPED_FEED, rtol=1e-5, atol=1e-5)
    assert model.graph.initializers["a_w"].const_value.numpy().shape[0] == 6
    assert model.graph.initializers["g_w"].const_value.numpy().shape == (5, 4)
    assert model.graph.initializers["u_w"].const_value.numpy().shape == (2, 5, 1, 1)


def test_shufflenet_light_prunes_with_macs_falling() -> None:
    from models.light import build_light

    model = modelio.load_model(build_light("shufflenet"))
    before = clone(model)
    _, groups = analyze(model, value_dims(model))
    assert sum(g.prunable and g.unit_sizes is not None for g in groups) >= 16
    _prune(model, ratio=0.3, scope="global")
    onnx.checker.check_model(modelio.to_proto(model))
    feed = {before.graph.inputs[0].name: randn([1, 3, 224, 224], 1)}
    out_a, out_b = run_model(before, feed), run_model(model, feed)  # onnxruntime loads and runs it
    assert [v.shape for v in out_a.values()] == [v.shape for v in out_b.values()]
    assert count_macs(model) < 0.8 * count_macs(before)
