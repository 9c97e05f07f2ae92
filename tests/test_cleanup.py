"""cleanup: folding and pruning keep outputs, compressed forms survive, onnxsim failures are only notes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxsim
import pytest
from onnx import helper

from graphopt import modelio
from graphopt.modelio import SPARSE, STORAGE_KEY
from graphopt.passbase import PROVENANCE_KEY
from graphopt.passes.cleanup import Cleanup
from graphopt.passes.canonicalize import Canonicalize
from tests.helpers import (ONNXSIM_FEEDS, assert_same_outputs, clone, make_model, onnxsim_friendly_model, op_types,
                           randn, tensor_info)

X = ONNXSIM_FEEDS  # every model here takes x: (2, 8)


def _prepared(model: ir.Model) -> ir.Model:
    Canonicalize()(model)
    return model


def _check_valid(model: ir.Model) -> None:
    onnx.checker.check_model(modelio.to_proto(model))


def test_removes_identities_dead_nodes_and_folds_constants() -> None:
    nodes = [
        helper.make_node("Identity", ["x"], ["xi"]),
        helper.make_node("Add", ["c1", "c2"], ["c"]),  # constant expression → one initializer
        helper.make_node("Mul", ["xi", "c"], ["m"]),
        helper.make_node("Neg", ["x"], ["dead"]),  # nothing uses it
        helper.make_node("Identity", ["m"], ["y"]),
    ]
    inits = {"c1": randn((8,), 1), "c2": randn((8,), 2)}
    model = _prepared(make_model(nodes, [tensor_info("x", np.float32, [2, 8])], ["y"], inits))
    reference = clone(model)
    result = Cleanup(Cleanup.Options(onnxsim=False))(model)
    assert op_types(model) == ["Mul"]
    assert result.rows[0]["nodes_before"] == 5 and result.rows[0]["nodes_after"] == 1
    assert [v.name for v in model.graph.outputs] == ["y"]
    _check_valid(model)
    assert_same_outputs(reference, model, X, rtol=1e-6, atol=1e-6)


def test_codebook_form_survives() -> None:
    codebook = np.linspace(-1, 1, 16, dtype=np.float32)
    indices = np.random.default_rng(0).integers(0, 16, (8, 4)).astype(np.uint8)
    nodes = [
        helper.make_node("Cast", ["idx"], ["idx64"], to=onnx.TensorProto.INT64),
        helper.make_node("Gather", ["codebook", "idx64"], ["w"], axis=0),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    model = _prepared(make_model(nodes, [tensor_info("x", np.float32, [2, 8])], ["y"],
                                 {"codebook": codebook, "idx": indices}))
    reference = clone(model)
    result = Cleanup()(model)
    assert op_types(model) == ["Cast", "Gather", "MatMul"]
    assert model.graph.initializers["idx"].const_value.dtype == ir.DataType.UINT8
    assert "w" not in model.graph.initializers
    assert any("onnxsim skipped" in note and "codebook" in note for note in result.notes)
    assert_same_outputs(reference, model, X, rtol=0, atol=0)


def test_int8_dequantize_weight_survives() -> None:
    q = np.random.default_rng(1).integers(-127, 128, (8, 4)).astype(np.int8)
    nodes = [
        helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["w"]),
        helper.make_node("Identity", ["w"], ["wi"]),
        helper.make_node("MatMul", ["x", "wi"], ["y"]),
    ]
    inits = {"q": q, "scale": np.float32(0.01), "zp": np.int8(0)}
    model = _prepared(make_model(nodes, [tensor_info("x", np.float32, [2, 8])], ["y"], inits))
    reference = clone(model)
    Cleanup()(model)
    assert op_types(model) == ["DequantizeLinear", "MatMul"]
    assert model.graph.initializers["q"].const_value.dtype == ir.DataType.INT8
    assert_same_outputs(reference, model, X, rtol=0, atol=0)


def test_sparse_marked_initializer_keeps_its_mark_and_zeros() -> None:
    w = randn((4, 8), 3)
    w[:, ::2] = 0.0
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "wt"], ["y"])]
    model = _prepared(make_model(nodes, [tensor_info("x", np.float32, [2, 8])], ["y"], {"w": w}))
    tensor = model.graph.initializers["w"].const_value
    tensor.metadata_props[STORAGE_KEY] = SPARSE
    reference = clone(model)
    result = Cleanup()(model)
    assert op_types(model) == ["Transpose", "MatMul"]  # folding Transpose(w) would drop the mark
    assert model.graph.initializers["w"].const_value is tensor
    assert tensor.metadata_props[STORAGE_KEY] == SPARSE
    assert np.count_nonzero(tensor.numpy()) == w.size // 2
    assert any("sparse" in note for note in result.notes)
    assert_same_outputs(reference, model, X, rtol=0, atol=0)


def test_onnxsim_result_keeps_metadata_and_provenance() -> None:
    model = onnxsim_friendly_model()
    next(n for n in model.graph if n.name == "relu").metadata_props[PROVENANCE_KEY] = "somepass"
    reference = clone(model)
    result = Cleanup()(model)
    assert len(op_types(model)) < len(op_types(reference))
    assert any(row["step"] == "onnxsim" for row in result.rows)  # onnxsim's result was taken
    assert dict(model.metadata_props) == {"author": "tests"}
    relu = next(n for n in model.graph if n.op_type == "Relu")
    assert relu.metadata_props.get(PROVENANCE_KEY) == "somepass"
    assert result.modified
    _check_valid(model)
    assert_same_outputs(reference, model, X, rtol=0, atol=0)


def test_onnxsim_failure_is_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("simplifier exploded")

    monkeypatch.setattr(onnxsim, "simplify", boom)
    model = onnxsim_friendly_model()
    reference = clone(model)
    result = Cleanup(Cleanup.Options(onnxsim=True))(model)
    assert any("onnxsim failed" in note and "simplifier exploded" in note for note in result.notes)
    _check_valid(model)
    assert_same_outputs(reference, model, X, rtol=0, atol=0)


def test_onnxsim_skipped_above_size_limit() -> None:
    model = onnxsim_friendly_model()
    result = Cleanup(Cleanup.Options(onnxsim_max_mb=0.0))(model)
    assert any("onnxsim skipped" in note and "onnxsim_max_mb" in note for note in result.notes)


# Identities in subgraphs. A branch or body output must be made inside its graph: an Identity that returns an
# outer value is what makes it so, and stays; other identities still go.

F32 = onnx.TensorProto.FLOAT
X_INFO = tensor_info("x", np.float32, [2, 8])


def _graph(name: str, nodes: list, outputs: list[str], inputs: tuple = ()) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, list(inputs), [helper.make_tensor_value_info(o, F32, [2, 8])
                                                         for o in outputs])


def _identity_outputs(model: ir.Model) -> dict[str, list[str]]:
    """Per subgraph: the outputs an Identity makes."""
    return {g.name: [n.outputs[0].name for n in g if n.op_type == "Identity"] for g in model.graph.subgraphs()}


def _cleaned(model: ir.Model) -> ir.Model:
    reference = clone(_prepared(model))
    Cleanup(Cleanup.Options(onnxsim=False))(model)
    _check_valid(model)
    assert_same_outputs(reference, model, X, rtol=0, atol=0)
    return model


@pytest.mark.parametrize("taken", ["then", "else"])
def test_nested_branches_keep_identities_of_outer_values(taken: str) -> None:
    inner_then = _graph("inner_then", [helper.make_node("Identity", ["r"], ["ia"])], ["ia"])  # from the main graph
    inner_else = _graph("inner_else", [helper.make_node("Identity", ["mid"], ["ib"])], ["ib"])  # from the branch
    then = _graph("then", [helper.make_node("Neg", ["r"], ["mid"]), helper.make_node("Identity", ["mid"], ["unused"]),
                           helper.make_node("If", ["inner"], ["a"], then_branch=inner_then, else_branch=inner_else)],
                  ["a"])
    other = _graph("else", [helper.make_node("Identity", ["r"], ["b"])], ["b"])
    # Conditions computed from x, so that folding cannot take a branch: x is far inside ±100.
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("ReduceMax", ["x"], ["top"], keepdims=0),
             helper.make_node("Greater", ["top", "low"], ["cond"]), helper.make_node("Greater", ["top", "limit"], ["inner"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)]
    limits = {"low": np.array(-100, np.float32), "limit": np.array(-100 if taken == "then" else 100, np.float32)}
    # "y" and "r" both outputs: a branch output folded into r would make r an output of two graphs.
    model = _cleaned(make_model(nodes, [X_INFO], [tensor_info(o, np.float32, [2, 8]) for o in ("y", "r")], limits))
    assert _identity_outputs(model) == {"then": [], "inner_then": ["ia"], "inner_else": ["ib"], "else": ["b"]}


def test_loop_body_keeps_identities_of_outer_values() -> None:
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),  # a body input: stays, as onnx_ir keeps it
         helper.make_node("Identity", ["r"], ["r_copy"]),  # not an output: goes
         helper.make_node("Add", ["carried_in", "r_copy"], ["carried_out"]),
         helper.make_node("Identity", ["r"], ["scanned"])],  # the scan output, an outer value: stays
        "body", [helper.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", onnx.TensorProto.BOOL, []),
                 helper.make_tensor_value_info("carried_in", F32, [2, 8])],
        [helper.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, []),
         helper.make_tensor_value_info("carried_out", F32, [2, 8]), helper.make_tensor_value_info("scanned", F32, [2, 8])])
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Loop", ["trips", "", "x"], ["carried", "scans"], body=body)]
    outputs = [tensor_info("carried", np.float32, [2, 8]), tensor_info("scans", np.float32, [3, 2, 8])]
    model = _cleaned(make_model(nodes, [X_INFO], outputs, {"trips": np.array(3, np.int64)}))
    assert _identity_outputs(model) == {"body": ["cond_out", "scanned"]}


@pytest.mark.parametrize("outputs", [["r", "y"], ["y1", "y2"]], ids=["of_an_output", "twice"])
def test_identities_into_outputs_keep_every_output(outputs: list[str]) -> None:
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y1" if "y1" in outputs else "y"])]
    if "y2" in outputs:
        nodes.append(helper.make_node("Identity", ["r"], ["y2"]))
    model = _cleaned(make_model(nodes, [X_INFO], [tensor_info(o, np.float32, [2, 8]) for o in outputs]))
    assert [v.name for v in model.graph.outputs] == outputs
    assert op_types(model) == ["Relu", "Identity"]  # one Identity folded into r, the other kept
