"""graphopt.weights: the one constant rule, weight layouts, and shared weight writes (in place when owned, a
private copy that keeps storage marks when shared)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

import onnx_ir as ir
import pytest

from graphopt.modelio import SPARSE, STORAGE_KEY
from graphopt.passes.fuse import Fuse
from graphopt.passes.gap import Gap
from graphopt.passes.prune import Prune
from graphopt.weights import WeightLayout, constant_array, is_constant, weight_layout, write_input
from tests.helpers import assert_same_outputs, clone, make_model, op_types, randn, run_model, tensor_info


def _shared_weight_model() -> ir.Model:
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["a"], name="mm1"),
         helper.make_node("MatMul", ["a", "w"], ["y"], name="mm2")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    model.graph.initializers["w"].const_value.metadata_props[STORAGE_KEY] = SPARSE
    return model


def test_shared_weight_gets_a_private_copy_with_its_marks():
    model = _shared_weight_model()
    mm1, mm2 = list(model.graph)
    new = write_input(mm1, 1, np.zeros((4, 4), np.float32), "pruned")
    assert new.name == "w_pruned" and mm1.inputs[1] is new and mm2.inputs[1].name == "w"
    assert new.const_value.metadata_props[STORAGE_KEY] == SPARSE
    np.testing.assert_array_equal(mm2.inputs[1].const_value.numpy(), np.eye(4))  # the other user is untouched


def test_owned_weight_is_rewritten_in_place():
    model = _shared_weight_model()
    mm1, mm2 = list(model.graph)
    write_input(mm1, 1, np.ones((4, 4), np.float32))  # now mm1 owns a copy
    owned = write_input(mm1, 1, np.full((4, 4), 2.0, np.float32))
    assert owned is mm1.inputs[1] and owned.const_value.metadata_props[STORAGE_KEY] == SPARSE
    np.testing.assert_array_equal(owned.const_value.numpy(), np.full((4, 4), 2.0))


# --- the constant rule: an initializer that is also a graph input is a default the user may override ----------


def _overridable_model() -> ir.Model:
    """y = Relu(x @ w + b): w is an initializer AND a graph input (a default), b a plain initializer, c a Constant."""
    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.float32(2.0), "c")),
             helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "b"], ["a"]), helper.make_node("Mul", ["a", "c"], ["y"])]
    return make_model(nodes, [tensor_info("x", np.float32, [2, 4]), tensor_info("w", np.float32, [4, 3])],
                      ["y"], {"w": randn([4, 3], 1), "b": randn([3], 2)})


def test_initializer_listed_as_graph_input_is_not_constant():
    model = _overridable_model()
    values = {v.name: v for node in model.graph for v in node.inputs}
    w, b, c, x = values["w"], values["b"], values["c"], values["x"]
    assert w.is_initializer() and w.is_graph_input()
    assert constant_array(w) is None and constant_array(w, nodes=True) is None and not is_constant(w)
    np.testing.assert_array_equal(constant_array(b), randn([3], 2))
    assert constant_array(c) is None and float(constant_array(c, nodes=True)) == 2.0  # Constant node: on request
    assert is_constant(b) and is_constant(c) and not is_constant(x) and not is_constant(None)
    assert weight_layout(next(n for n in model.graph if n.op_type == "MatMul")) is None  # w is not a weight


def test_prune_leaves_an_overridable_weight_alone():
    model = _overridable_model()
    result = Prune(Prune.Options(sparsity=0.5, min_size=0))(model)
    assert result.rows == []
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(), randn([4, 3], 1))


def test_fuse_does_not_fold_into_an_overridable_conv_weight():
    """Conv(x, W) * k: folding k into W would be lost as soon as the user feeds their own W."""
    w = randn([4, 3, 3, 3], 5)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c", "k"], ["y"])]
    inputs = [tensor_info("x", np.float32, [1, 3, 5, 5]), tensor_info("W", w)]
    overridable = make_model(nodes, inputs, ["y"], {"W": w, "k": randn([4, 1, 1], 6)})
    plain = make_model(nodes, inputs[:1], ["y"], {"W": w, "k": randn([4, 1, 1], 6)})
    assert Fuse(Fuse.Options(only=["conv_affine"]))(plain).rows  # the same graph folds when W is a constant
    before = clone(overridable)
    assert not Fuse(Fuse.Options(only=["conv_affine"]))(overridable).rows
    assert op_types(overridable) == ["Conv", "Mul"]
    feeds = {"x": randn([1, 3, 5, 5], 7), "W": randn([4, 3, 3, 3], 8)}  # the user's own W
    assert_same_outputs(before, overridable, feeds, rtol=0, atol=0)


def test_gap_keeps_a_head_whose_weight_is_overridable():
    feats = 4 * 3 * 2
    nodes = [helper.make_node("Flatten", ["x"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "w1"], ["y"], transB=1, name="fc1")]
    inits = {"w1": randn([5, feats], 3)}
    x = tensor_info("x", np.float32, ["N", 4, 3, 2])
    plain = make_model(nodes, [x], ["y"], inits)
    assert Gap(Gap.Options(head=True))(plain).modified  # the same head is replaced when w1 is a constant
    overridable = make_model(nodes, [x, tensor_info("w1", inits["w1"])], ["y"], inits)
    assert not Gap(Gap.Options(head=True))(overridable).modified
    assert op_types(overridable) == ["Flatten", "Gemm"]
    feeds = {"x": randn([2, 4, 3, 2], 4), "w1": randn([5, feats], 5)}
    np.testing.assert_allclose(run_model(overridable, feeds)["y"], feeds["x"].reshape(2, -1) @ feeds["w1"].T,
                               rtol=1e-5, atol=1e-5)


# --- weight layouts ---------------------------------------------------------------------------------------------


def _layout(op: str, shapes: dict[str, tuple], inputs: list[str], **attrs) -> WeightLayout | None:
    nodes = [helper.make_node(op, inputs, ["y"], **attrs)]
    inits = {n: np.ones(s, np.float32) for n, s in shapes.items()}
    model = make_model(nodes, [tensor_info(n, np.float32, [2, 2]) for n in inputs if n not in inits], ["y"], inits)
    return weight_layout(next(iter(model.graph)), constant_a=True)


@pytest.mark.parametrize("op,shapes,inputs,attrs,expected", [
    ("Conv", {"w": (8, 4, 3, 3)}, ["x", "w"], {}, WeightLayout(1, 0, 1)),
    ("ConvTranspose", {"w": (4, 8, 3, 3)}, ["x", "w"], {}, WeightLayout(1, 1, 0)),
    ("Gemm", {"w": (5, 4)}, ["x", "w"], {"transB": 1}, WeightLayout(1, 0, 1)),
    ("Gemm", {"w": (4, 5)}, ["x", "w"], {}, WeightLayout(1, 1, 0)),
    ("MatMul", {"w": (4, 5)}, ["x", "w"], {}, WeightLayout(1, 1, 0)),
    ("MatMul", {"w": (3, 4, 5)}, ["x", "w"], {}, WeightLayout(1, 2, 1, batched=True)),
    ("MatMul", {"w": (5, 4)}, ["w", "x"], {}, WeightLayout(0, 0, 1)),  # Y = W @ X: rows of W are the outputs
    ("MatMul", {"w": (4,)}, ["x", "w"], {}, WeightLayout(1, None, None)),
    ("MatMul", {}, ["x", "z"], {}, None),
])
def test_weight_layout(op, shapes, inputs, attrs, expected):
    assert _layout(op, shapes, inputs, **attrs) == expected


def test_batched_matmul_weight_is_per_tensor_for_qdq_only():
    layout = _layout("MatMul", {"w": (3, 4, 5)}, ["x", "w"])
    assert layout.out_axis == 2 and layout.channel_axis is None  # prune/kmeans use axis 2; qdq one scale
    assert _layout("MatMul", {"w": (4, 5)}, ["x", "w"]).channel_axis == 1


@pytest.mark.parametrize("shape,axis", [((4, 5), 1), ((3, 4, 5), None)])
def test_qdq_weight_scales_follow_the_layout(shape, axis):
    """qdq: a 2-D MatMul B gets one scale per output column (DQ axis 1); a batched B one scale in all."""
    from graphopt.passes.quantize import emit_weights_only

    w = randn(shape, 9)
    x_shape = [3, 2, 4] if len(shape) == 3 else [2, 4]
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                       [tensor_info("x", np.float32, x_shape)], ["y"], {"w": w})
    before = clone(model)
    (row,) = emit_weights_only(list(model.graph))
    dq = next(n for n in model.graph if n.op_type == "DequantizeLinear")
    scale = dq.inputs[1].const_value.numpy()
    assert (dq.attributes["axis"].value if "axis" in dq.attributes else None) == axis
    expected = np.abs(w).max(axis=tuple(range(len(shape) - 1))) / 127 if axis is not None else np.abs(w).max() / 127
    np.testing.assert_allclose(scale, expected, rtol=1e-6)
    x = randn(x_shape, 10)
    err = np.abs(run_model(model, {"x": x})["y"] - run_model(before, {"x": x})["y"]).max()
    assert 0 < err <= np.abs(x).sum(axis=-1).max() * expected.max() / 2 + 1e-5  # int8 rounding, no more
