"""canonicalize: Constant weights lifted (main graph and If bodies), inputs unlisted, opset upgraded, names."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from graphopt import modelio, proto_handoff
from graphopt.errors import GraphoptError
from graphopt.options import build_options
from graphopt.passes.canonicalize import Canonicalize
from graphopt.proto_handoff import ensure_opset
from tests.helpers import assert_same_outputs, make_model, make_proto, op_types, randn, run_model, tensor_info


def _const(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name))


def _if_model() -> onnx.ModelProto:
    """y = If(sum(x) > 0) then x @ Wa else x @ Wb, with every weight in a Constant node (Paddle style)."""
    wa, wb = randn((4, 3), 1), randn((4, 3), 2)
    then_g = helper.make_graph([_const("wa", wa), helper.make_node("MatMul", ["x", "wa"], ["ya"])], "then", [],
                               [helper.make_empty_tensor_value_info("ya")])
    else_g = helper.make_graph([_const("wb", wb), helper.make_node("MatMul", ["x", "wb"], ["yb"])], "else", [],
                               [helper.make_empty_tensor_value_info("yb")])
    nodes = [
        _const("w0", randn((4, 4), 3)),
        helper.make_node("MatMul", ["x0", "w0"], ["x"]),
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        _const("zero", np.array(0.0, np.float32)),
        helper.make_node("Greater", ["s", "zero"], ["c"]),
        helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g),
    ]
    return make_proto(nodes, [tensor_info("x0", np.float32, [2, 4])], [tensor_info("y", np.float32, [2, 3])])


def test_lifts_constants_in_main_graph_and_if_bodies() -> None:
    proto = _if_model()
    model = ir.serde.deserialize_model(proto)
    result = Canonicalize()(model)
    assert "Constant" not in op_types(model)
    assert {"w0", "zero"} <= set(model.graph.initializers)
    if_node = next(n for n in model.graph if n.op_type == "If")
    branch_inits = {name for attr in ("then_branch", "else_branch")
                    for name in if_node.attributes[attr].as_graph().initializers}
    assert branch_inits == {"wa", "wb"}
    assert {"change": "constants_lifted", "count": 4} in result.rows
    for seed in range(3):  # both branches get taken across seeds
        x0 = randn((2, 4), 10 + seed)
        assert_same_outputs(proto, model, {"x0": x0})
        assert_same_outputs(proto, model, {"x0": -x0})


def test_unlists_initializers_from_inputs() -> None:
    w = randn((4, 2))
    proto = make_proto([helper.make_node("MatMul", ["x", "w"], ["y"])],
                       [tensor_info("x", np.float32, [1, 4]), tensor_info("w", w)], ["y"], {"w": w})
    model = ir.serde.deserialize_model(proto)
    result = Canonicalize()(model)
    assert [v.name for v in model.graph.inputs] == ["x"]
    assert {"change": "inputs_unlisted", "count": 1} in result.rows
    assert_same_outputs(proto, model, {"x": randn((1, 4), 5)})


def test_upgrades_opset_11_to_13() -> None:
    # Squeeze/Unsqueeze take axes as an attribute before 13 and as an input from 13 on; Clip 11 is unchanged.
    nodes = [
        helper.make_node("Unsqueeze", ["x"], ["u"], axes=[0]),
        helper.make_node("Relu", ["u"], ["r"]),
        helper.make_node("Squeeze", ["r"], ["s"], axes=[0]),
        helper.make_node("ReduceSum", ["s"], ["y"], axes=[1], keepdims=1),
    ]
    proto = make_proto(nodes, [tensor_info("x", np.float32, [3, 5])], ["y"], opset=11, ir_version=6)
    model = ir.serde.deserialize_model(proto)
    result = Canonicalize()(model)
    assert model.opset_imports[""] == 13
    assert model.ir_version >= 7
    assert {"change": "opset", "from": 11, "to": 13} in result.rows
    squeeze = next(n for n in model.graph if n.op_type == "Squeeze")
    assert "axes" not in squeeze.attributes and len(squeeze.inputs) == 2
    onnx.checker.check_model(modelio.to_proto(model))
    assert_same_outputs(proto, model, {"x": randn((3, 5), 7)})


def test_upgrade_keeps_big_weights_as_the_same_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    # Big initializers travel to the converter as typed inputs only; they come back as the same objects.
    monkeypatch.setattr(proto_handoff, "_HOLD_BYTES", 16)
    w, small = randn((4, 3)), np.array([0.5], np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Mul", ["m", "small"], ["u"]),
             helper.make_node("Unsqueeze", ["u"], ["y"], axes=[0])]
    proto = make_proto(nodes, [tensor_info("x", np.float32, [2, 4])], ["y"], {"w": w, "small": small}, opset=11)
    model = ir.serde.deserialize_model(proto)
    w_tensor = model.graph.initializers["w"].const_value
    w_tensor.metadata_props["mark"] = "kept"
    Canonicalize()(model)
    assert model.opset_imports[""] == 13
    assert [v.name for v in model.graph.inputs] == ["x"]
    assert model.graph.initializers["w"].const_value is w_tensor and w_tensor.metadata_props["mark"] == "kept"
    assert_same_outputs(proto, model, {"x": randn((2, 4), 1)})


def test_old_ir3_model_with_initializer_inputs_is_upgraded() -> None:
    w = randn((4, 2))
    proto = make_proto([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
                       [tensor_info("x", np.float32, [1, 4]), tensor_info("w", w)], ["y"], {"w": w},
                       opset=8, ir_version=3)
    model = ir.serde.deserialize_model(proto)
    Canonicalize()(model)
    assert model.opset_imports[""] == 13 and model.ir_version >= 7
    assert [v.name for v in model.graph.inputs] == ["x"]
    x = randn((1, 4), 3)
    expected = np.maximum(x @ w, 0)
    np.testing.assert_allclose(run_model(model, {"x": x})["y"], expected, rtol=1e-6)


def test_never_downgrades_and_keeps_custom_domains() -> None:
    nodes = [helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft")]
    model = make_model(nodes, [tensor_info("x", np.float32, [2, 3])], [tensor_info("y", np.float32, [2, 3])],
                       opset=17, extra_opsets={"com.microsoft": 1})
    result = Canonicalize()(model)
    assert model.opset_imports == {"": 17, "com.microsoft": 1}
    assert not any(row.get("change") == "opset" for row in result.rows)
    # Upgrading a model with a custom-domain node leaves that node and its domain alone.
    model = make_model(nodes + [helper.make_node("Relu", ["y"], ["z"])], [tensor_info("x", np.float32, [2, 3])],
                       ["z"], opset=11, extra_opsets={"com.microsoft": 1})
    Canonicalize()(model)
    assert model.opset_imports == {"": 13, "com.microsoft": 1}
    assert [(n.domain, n.op_type) for n in model.graph] == [("com.microsoft", "Gelu"), ("", "Relu")]


def test_failed_conversion_is_one_line_graphopt_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(proto, target):
        raise RuntimeError("adapter missing\nfor op Foo")

    monkeypatch.setattr(onnx.version_converter, "convert_version", boom)
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [tensor_info("x", np.float32, [2])], ["y"], opset=11)
    with pytest.raises(GraphoptError) as info:
        Canonicalize()(model)
    message = str(info.value)
    assert "\n" not in message and "opset 11" in message and "adapter missing for op Foo" in message


def test_ensure_opset_raises_when_asked() -> None:
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [tensor_info("x", np.float32, [2])], ["y"])
    assert ensure_opset(model, 13) is None
    assert ensure_opset(model, 21) == (13, 21)
    assert model.opset_imports[""] == 21


def test_names_unnamed_and_duplicate_nodes_uniquely() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Neg", ["b"], ["c"], name="n"), helper.make_node("Neg", ["c"], ["y"], name="n")]
    model = make_model(nodes, [tensor_info("x", np.float32, [2])], ["y"])
    result = Canonicalize()(model)
    names = [n.name for n in model.graph]
    assert all(names) and len(set(names)) == 4 and names[2] == "n"
    assert {"change": "nodes_named", "count": 2, "duplicates_renamed": 1} in result.rows
    x = randn((2,), 1)  # onnxruntime refuses the original (duplicate names): compare with numpy
    np.testing.assert_array_equal(run_model(model, {"x": x})["y"], np.maximum(x, 0))


def test_shape_inference_fills_shapes_and_failure_is_a_note() -> None:
    model = make_model([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["y"])],
                       [tensor_info("x", np.float32, [2, 3])], ["y"])
    Canonicalize()(model)
    assert model.graph.outputs[0].shape == [2, 3]
    # A model onnx's strict inference rejects (float + int64): noted, never fatal.
    bad = make_model([helper.make_node("Add", ["x", "k"], ["y"])], [tensor_info("x", np.float32, [2])], ["y"],
                     {"k": np.array([1, 2], np.int64)})
    result = Canonicalize()(bad)
    assert any("shape inference" in note for note in result.notes)


def test_options_are_validated() -> None:
    assert build_options(Canonicalize.Options, {"opset": 15}, "canonicalize").opset == 15
    with pytest.raises(GraphoptError):
        build_options(Canonicalize.Options, {"opset": 3}, "canonicalize")
