"""Dependency groups of channel pruning: who is coupled with whom, and what blocks a group."""

from __future__ import annotations

import numpy as np
from onnx import helper

from graphopt.costs import value_dims
from graphopt.passes.channels import analyze
from tests.helpers import make_model, randn, tensor_info

X = tensor_info("x", np.float32, [1, 3, 8, 8])


def _conv(name: str, x: str, out: str, cin: int, cout: int, inits: dict, seed: int, k: int = 3) -> object:
    inits[f"{name}_w"] = randn([cout, cin, k, k], seed)
    return helper.make_node("Conv", [x, f"{name}_w"], [out], name=name, pads=[k // 2] * 4)


def _groups(model):
    _, groups = analyze(model, value_dims(model))
    return groups


def _by_producer(groups):
    return {tuple(sorted(p.name for p in g.producers)): g for g in groups}


def test_residual_add_joins_both_branches_in_one_group() -> None:
    inits: dict = {}
    nodes = [_conv("a", "x", "a", 3, 8, inits, 1), helper.make_node("Relu", ["a"], ["ra"]),
             _conv("b", "ra", "b", 8, 8, inits, 2), helper.make_node("Add", ["ra", "b"], ["s"]),
             _conv("c", "s", "y", 8, 4, inits, 3)]
    groups = _by_producer(_groups(make_model(nodes, [X], ["y"], inits)))
    joined = groups[("a", "b")]
    assert joined.prunable and joined.size == 8
    roles = sorted((k.slot.node.name, k.slot.role, k.slot.axis) for k in joined.links)
    # b reads the group (axis 1) and produces it (axis 0); c only reads it
    assert roles == [("a", "producer", 0), ("b", "consumer", 1), ("b", "producer", 0), ("c", "consumer", 1)]
    assert not groups[("c",)].prunable
    assert "graph output" in groups[("c",)].reasons[0]


def test_concat_gives_offsets_into_the_consumer() -> None:
    inits: dict = {}
    nodes = [_conv("a", "x", "a", 3, 6, inits, 1), _conv("b", "x", "b", 3, 4, inits, 2),
             helper.make_node("Concat", ["a", "b"], ["cat"], axis=1), _conv("c", "cat", "y", 10, 2, inits, 3)]
    groups = _by_producer(_groups(make_model(nodes, [X], ["y"], inits)))
    for key, offset in ((("a",), 0), (("b",), 6)):
        links = [k for k in groups[key].links if k.slot.node.name == "c"]
        assert [(k.offset, k.slot.channels) for k in links] == [(offset, 10)]


def _shuffle_model(perm: list[int]):
    inits: dict = {"shape5": np.array([1, 2, 2, 8, 8], np.int64), "shape4": np.array([1, 4, 8, 8], np.int64)}
    nodes = [_conv("a", "x", "a", 3, 4, inits, 1),
             helper.make_node("Reshape", ["a", "shape5"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=perm),
             helper.make_node("Reshape", ["t", "shape4"], ["u"]), _conv("c", "u", "y", 4, 2, inits, 3)]
    return _by_producer(_groups(make_model(nodes, [X], ["y"], inits)))


def test_channel_shuffle_ties_columns_and_other_transposes_are_blocked() -> None:
    group = _shuffle_model([0, 2, 1, 3, 4])[("a",)]
    # output channel j*2 + k is input channel k*2 + j; unit j = channel j of both halves: {0, 2} and {1, 3}
    assert group.prunable and group.unit_sizes == [2, 2]
    rows = {u: sorted(k.offset + u - k.start for k in group.links if k.slot.node.name == "a" and k.slot.index == 1
                      and k.start <= u < k.start + k.length) for u in range(2)}
    cols = {u: sorted(k.offset + u - k.start for k in group.links if k.slot.node.name == "c"
                      and k.start <= u < k.start + k.length) for u in range(2)}
    assert rows == {0: [0, 2], 1: [1, 3]} and cols == {0: [0, 1], 1: [2, 3]}
    blocked = _shuffle_model([0, 1, 2, 4, 3])[("a",)]
    assert not blocked.prunable and "Reshape" in blocked.reasons[0]


def test_flatten_gemm_block_and_depthwise_member() -> None:
    inits: dict = {"dw_w": randn([4, 1, 3, 3], 5), "g_w": randn([4 * 16, 5], 6)}
    nodes = [_conv("a", "x", "a", 3, 4, inits, 1),
             helper.make_node("Conv", ["a", "dw_w"], ["d"], name="dw", group=4, pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["d"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "g_w"], ["y"], name="g")]
    groups = _by_producer(_groups(make_model(nodes, [X], ["y"], inits)))
    group = groups[("a",)]
    assert group.prunable
    by_node = {k.slot.node.name: k.slot for k in group.links}
    assert by_node["dw"].role == "member" and by_node["g"].block == 16 and by_node["g"].axis == 0
