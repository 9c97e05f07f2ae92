"""Shared weight writes: in place when owned, a private copy that keeps storage marks when shared."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

import onnx_ir as ir

from graphopt.modelio import SPARSE, STORAGE_KEY
from graphopt.weights import write_input


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
