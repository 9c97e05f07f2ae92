"""distill: ridge refit of the student's last (or named) linear layers to the teacher's values."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

from graphopt.data import Dataset
from graphopt.errors import GraphoptError, RecipeError
from graphopt.options import build_options
from graphopt.passbase import PassContext
from graphopt.passes.distill import Distill, last_linear_nodes
from tests.helpers import assert_same_outputs, clone, make_model, randn, run_model, tensor_info


def _mlp(out_op: str = "Identity"):
    """x [N,8] → Gemm(8→6) → Relu → Gemm(6→4) named fc2 → (Identity) → out."""
    inits = {"w1": randn([6, 8], 1), "b1": randn([6], 2), "w2": randn([4, 6], 3), "b2": randn([4], 4)}
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1, name="fc1"),
             helper.make_node("Relu", ["h"], ["a"], name="relu"),
             helper.make_node("Gemm", ["a", "w2", "b2"], ["z"], transB=1, name="fc2"),
             helper.make_node(out_op, ["z"], ["out"], name="tail")]
    return make_model(nodes, [tensor_info("x", np.float32, ["N", 8])], ["out"], inits)


def _calib(shape=(16, 8), feeds=8, seed=100) -> Dataset:
    return Dataset(feeds=[{"x": randn(list(shape), seed + i)} for i in range(feeds)])


def _set(model: ir.Model, name: str, array: np.ndarray) -> None:
    value = model.graph.initializers[name]
    value.const_value = ir.tensor(array.astype(np.float32), name=name)


def _w(model: ir.Model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy()


def _distill(student, teacher, calib=None, **raw):
    opts = build_options(Distill.Options, raw, "distill")
    return Distill(opts, PassContext(calib=calib or _calib(), teacher=teacher))(student)


def test_last_layers_are_found_through_elementwise_and_shape_ops():
    model = _mlp("Softmax")
    assert [n.name for n in last_linear_nodes(model.graph)] == ["fc2"]


def test_recovers_the_teacher_exactly_on_a_linear_last_layer():
    teacher = _mlp()
    student = clone(teacher)
    _set(student, "w2", _w(student, "w2") + randn([4, 6], 7) * 0.5)
    _set(student, "b2", _w(student, "b2") - 1.0)
    result = _distill(student, teacher, ridge=1e-9)
    (row,) = result.rows
    assert result.modified and row["layer"] == "fc2" and row["changed"] and row["target"] == "z"
    assert row["rel_error_before"] > 1e-2 and row["rel_error"] < 1e-9
    assert_same_outputs(teacher, student, {"x": randn([32, 8], 999)}, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_w(student, "w2"), _w(teacher, "w2"), atol=1e-4)


def test_never_changes_a_layer_that_already_matches():
    teacher = _mlp()
    student = clone(teacher)
    result = _distill(student, teacher)
    assert not result.modified and result.rows[0]["changed"] is False
    assert np.array_equal(_w(student, "w2"), _w(teacher, "w2"))
    assert np.array_equal(_w(student, "b2"), _w(teacher, "b2"))


def test_pruned_zeros_stay_zero():
    teacher = _mlp()
    student = clone(teacher)
    w = _w(student, "w2").copy()
    w[np.abs(w) < np.median(np.abs(w))] = 0.0  # half pruned
    _set(student, "w2", w)
    zeros = w == 0
    result = _distill(student, teacher)
    (row,) = result.rows
    assert row["changed"] and row["kept_zeros"] == int(zeros.sum())
    assert row["rel_error"] < row["rel_error_before"]
    after = _w(student, "w2")
    assert np.all(after[zeros] == 0) and np.all(after[~zeros] != 0)
    x = randn([64, 8], 5)
    t, s1 = run_model(teacher, {"x": x})["out"], run_model(student, {"x": x})["out"]
    pruned_only = clone(teacher)
    _set(pruned_only, "w2", w)
    s0 = run_model(pruned_only, {"x": x})["out"]
    assert np.mean((s1 - t) ** 2) < np.mean((s0 - t) ** 2)  # better than pruning alone, on unseen data


def test_conv_output_map_is_distilled():
    """A segmentation-style output: 3×3 Conv → Relu → 1×1 Conv head → map; the 1×1 head is refit."""
    inits = {"w1": randn([5, 3, 3, 3], 1) * 0.3, "b1": randn([5], 2), "w2": randn([2, 5, 1, 1], 3), "b2": randn([2], 4)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="head"),
             helper.make_node("Sigmoid", ["c2"], ["map"], name="sig")]
    teacher = make_model(nodes, [tensor_info("x", np.float32, ["N", 3, 6, 6])], ["map"], inits)
    student = clone(teacher)
    _set(student, "w2", _w(student, "w2") * 0.5 + 0.1)
    calib = Dataset(feeds=[{"x": randn([2, 3, 6, 6], 50 + i)} for i in range(6)])
    result = _distill(student, teacher, calib, ridge=1e-9)
    assert [r["layer"] for r in result.rows] == ["head"] and result.rows[0]["changed"]
    assert_same_outputs(teacher, student, {"x": randn([2, 3, 6, 6], 7)}, rtol=1e-4, atol=1e-4)


def _seg_head(mid: int = 4, w1: np.ndarray | None = None, wt: np.ndarray | None = None):
    """x [N,3,8,8] → conv0 3×3 (3→6) → Relu → conv1 3×3 (6→mid) → Relu → ConvTranspose 2×2/2 (mid→1) → Add → Sigmoid,
    like the PP-OCR det head. Intermediate shapes are left to inference."""
    inits = {"w0": randn([6, 3, 3, 3], 1) * 0.3, "b0": randn([6], 2) * 0.1,
             "w1": randn([mid, 6, 3, 3], 3) * 0.3 if w1 is None else w1, "b1": randn([mid], 4) * 0.1,
             "wt": randn([mid, 1, 2, 2], 5) if wt is None else wt, "bt": np.array([0.1], np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1], name="conv0"),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
             helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("ConvTranspose", ["r1", "wt"], ["up"], strides=[2, 2], name="up"),
             helper.make_node("Add", ["up", "bt"], ["upb"], name="bias"),
             helper.make_node("Sigmoid", ["upb"], ["map"], name="sig")]
    return make_model(nodes, [tensor_info("x", np.float32, ["N", 3, 8, 8])], ["map"], inits)


def _seg_calib(feeds: int = 6, seed: int = 50) -> Dataset:
    return Dataset(feeds=[{"x": randn([2, 3, 8, 8], seed + i)} for i in range(feeds)])


def _map_mse(teacher, student, x) -> float:
    return float(np.mean((run_model(student, {"x": x})["map"] - run_model(teacher, {"x": x})["map"]) ** 2))


def test_last_finds_the_conv_before_conv_transpose_and_lowers_the_map_error():
    """Segmentation head ending in ConvTranspose → Add → Sigmoid: layers=last takes the 3×3 conv1 and its refit
    compensates an upstream perturbation (as lowrank would leave), on unseen inputs."""
    teacher = _seg_head()
    student = clone(teacher)
    _set(student, "w0", _w(student, "w0") + randn([6, 3, 3, 3], 9) * 0.1)
    assert [n.name for n in last_linear_nodes(student.graph)] == ["conv1"]
    x = randn([4, 3, 8, 8], 777)
    before = _map_mse(teacher, student, x)
    result = _distill(student, teacher, _seg_calib())
    (row,) = result.rows
    assert row["layer"] == "conv1" and row["target"] == "c1" and row["changed"]
    assert row["rel_error"] < row["rel_error_before"]
    after = _map_mse(teacher, student, x)
    assert before > 1e-5 and after < 0.8 * before
    assert np.array_equal(_w(student, "w0"), _w(teacher, "w0") + randn([6, 3, 3, 3], 9) * 0.1)  # conv0 untouched


def test_last_walks_past_a_layer_whose_output_was_pruned():
    """conv1 lost an output channel (as channel_prune leaves it): the teacher's c1 has 4 channels, the student's 3,
    so conv1 is walked past (with a note) and conv0, perturbed, is refit to the teacher's c0."""
    teacher = _seg_head()
    student = _seg_head(mid=3, w1=_w(teacher, "w1")[:3], wt=_w(teacher, "wt")[:3])
    _set(student, "b1", _w(teacher, "b1")[:3])
    _set(student, "w0", _w(teacher, "w0") * 1.3)
    x = randn([4, 3, 8, 8], 778)
    before = _map_mse(teacher, student, x)
    result = _distill(student, teacher, _seg_calib(), ridge=1e-9)
    assert [(r["layer"], r["target"], r["changed"]) for r in result.rows] == [("conv0", "c0", True)]
    assert any("conv1" in n and "4 channels" in n for n in result.notes)
    pruned_only = _seg_head(mid=3, w1=_w(teacher, "w1")[:3], wt=_w(teacher, "wt")[:3])
    _set(pruned_only, "b1", _w(teacher, "b1")[:3])
    np.testing.assert_allclose(_w(student, "w0"), _w(teacher, "w0"), atol=1e-3)  # the scale is undone
    assert _map_mse(teacher, student, x) == pytest.approx(_map_mse(teacher, pruned_only, x), abs=1e-7)
    assert _map_mse(teacher, student, x) < before


def test_last_layer_that_matches_is_never_changed_in_a_segmentation_head():
    teacher = _seg_head()
    student = clone(teacher)
    result = _distill(student, teacher, _seg_calib())
    assert not result.modified and [r["layer"] for r in result.rows] == ["conv1"]
    assert np.array_equal(_w(student, "w1"), _w(teacher, "w1"))


def test_uses_the_graph_output_when_the_teacher_lacks_the_layer_value():
    teacher = _mlp()
    student = clone(teacher)
    z = [n for n in student.graph if n.name == "fc2"][0].outputs[0]
    z.name = "z_student"  # e.g. renamed by an earlier pass
    _set(student, "w2", _w(student, "w2") * 2.0)
    result = _distill(student, teacher, ridge=1e-9)
    assert result.rows[0]["target"] == "out" and result.rows[0]["changed"]
    assert_same_outputs(teacher, student, {"x": randn([8, 8], 3)}, rtol=1e-4, atol=1e-4)


def test_named_layers_are_refit_upstream_first():
    teacher = _mlp()
    student = clone(teacher)
    _set(student, "w1", _w(student, "w1") + 0.3)
    _set(student, "w2", _w(student, "w2") * 0.7)
    result = _distill(student, teacher, layers=["fc2", "fc1"], ridge=1e-9)
    assert [r["layer"] for r in result.rows] == ["fc1", "fc2"]
    assert all(r["changed"] for r in result.rows)
    assert_same_outputs(teacher, student, {"x": randn([16, 8], 3)}, rtol=1e-4, atol=1e-4)


def test_unknown_layer_name_is_an_error():
    teacher = _mlp()
    with pytest.raises(GraphoptError, match="nope"):
        _distill(clone(teacher), teacher, layers=["nope"])


def test_codebook_encoded_layer_is_skipped_with_a_note():
    teacher = _mlp()
    student = clone(teacher)
    graph = student.graph
    fc2 = [n for n in graph if n.name == "fc2"][0]
    book = ir.Value(name="book", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([4]),
                    const_value=ir.tensor(np.array([-1, -0.3, 0.3, 1], np.float32), name="book"))
    idx = ir.Value(name="idx", type=ir.TensorType(ir.DataType.UINT8), shape=ir.Shape([4, 6]),
                   const_value=ir.tensor(np.random.default_rng(0).integers(0, 4, (4, 6)).astype(np.uint8), name="idx"))
    graph.register_initializer(book)
    graph.register_initializer(idx)
    cast = ir.Node("", "Cast", [idx], attributes=[ir.AttrInt64("to", ir.DataType.INT64.value)], name="cast")
    gather = ir.Node("", "Gather", [book, cast.outputs[0]], name="gather")
    graph.insert_before(fc2, [cast, gather])
    fc2.replace_input_with(1, gather.outputs[0])
    graph.initializers.pop("w2")
    result = _distill(student, teacher)
    # fc2 is walked past (noted); fc1 already matches the teacher, so nothing changes.
    assert not result.modified and [r["layer"] for r in result.rows] == ["fc1"]
    assert any("fc2" in n and "codebook" in n for n in result.notes)


def test_needs_teacher_and_real_data():
    teacher = _mlp()
    with pytest.raises(GraphoptError, match="teacher"):
        Distill(context=PassContext(calib=_calib()))(clone(teacher))
    with pytest.raises(GraphoptError, match="calibration"):
        Distill(context=PassContext(teacher=teacher))(clone(teacher))
    assert Distill.needs_data(Distill.Options()) == "it calibrates on data"


@pytest.mark.parametrize("raw", [{"ridge": -1}, {"max_samples": 0}, {"layers": []}, {"layer": "last"},
                                 {"ridge": "big"}])
def test_bad_options_are_rejected_at_parse_time(raw):
    with pytest.raises(RecipeError, match="distill"):
        build_options(Distill.Options, raw, "distill")


def test_layers_option_accepts_last_and_names():
    assert build_options(Distill.Options, {"layers": "last"}, "distill").layers == ["last"]
    assert build_options(Distill.Options, {"layers": ["fc1", "fc2"]}, "distill").layers == ["fc1", "fc2"]
