"""compact: short internal names, no declared intermediate shapes, doc strings or node notes — outputs
bit-identical in onnxruntime (If/Loop bodies reading outer values, external data, compressed weights), the
interface and the model's own documentation kept, smaller after lzma on the digits pick."""

from __future__ import annotations

import lzma

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from graphopt import modelio
from graphopt.options import build_options
from graphopt.passes.cleanup import compressed_forms
from graphopt.passes.compact import Compact, short_names
from graphopt.passes.kmeans import KMeans
from graphopt.pipeline import RunOptions, optimize
from tests.helpers import DIGITS, clone, make_model, randn, run_model, tensor_info


def compact(model, **raw):
    return Compact(build_options(Compact.Options, raw, "compact"))(model)


def assert_identical(model_a, model_b, feeds):
    """Bit-identical outputs: renaming and dropping notes change nothing onnxruntime computes."""
    out_a, out_b = run_model(model_a, feeds), run_model(model_b, feeds)
    assert list(out_a) == list(out_b)
    for name in out_a:
        assert out_a[name].dtype == out_b[name].dtype and np.array_equal(out_a[name], out_b[name]), name


def branchy_model() -> ir.Model:
    """MatMul → If (both branches read the outer value and an outer initializer) → Loop (its body adds the
    outer value each turn) → y; long exporter-style names, a declared intermediate shape, doc strings, node
    notes and the model's own documentation."""
    then_g = helper.make_graph([helper.make_node("Add", ["/blk/MatMul_output_0", "blk.bias"], ["then_out"])],
                               "then", [], [tensor_info("then_out", np.float32, [2, 3])])
    else_g = helper.make_graph([helper.make_node("Mul", ["/blk/MatMul_output_0", "blk.scale"], ["else_out"])],
                               "else", [], [tensor_info("else_out", np.float32, [2, 3])])
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["v_in", "/blk/MatMul_output_0"], ["v_out"], name="/loop/body/Add")],
        "body", [tensor_info("i", np.int64, []), tensor_info("cond_in", np.bool_, []),
                 tensor_info("v_in", np.float32, [2, 3])],
        [tensor_info("cond_out", np.bool_, []), tensor_info("v_out", np.float32, [2, 3])])
    nodes = [helper.make_node("MatMul", ["x", "blk.weight"], ["/blk/MatMul_output_0"], name="/blk/MatMul",
                              doc_string="exported from blk.forward, line 12"),
             helper.make_node("If", ["flag"], ["/blk/If_output_0"], name="/blk/If", then_branch=then_g,
                              else_branch=else_g),
             helper.make_node("Loop", ["trips", "", "/blk/If_output_0"], ["y"], name="/blk/Loop", body=body)]
    inits = {"blk.weight": randn((3, 3), 1), "blk.bias": randn((3,), 2), "blk.scale": randn((3,), 3),
             "trips": np.array(3, np.int64)}
    model = make_model(nodes, [tensor_info("x", np.float32, [2, 3]), tensor_info("flag", np.bool_, [])],
                       [tensor_info("y", np.float32, [2, 3])],
                       inits, opset=17)
    model.graph.node(0).metadata_props["pkg.torch.onnx.stack_trace"] = "File model.py, line 12, in forward"
    model.graph.node(0).outputs[0].shape = ir.Shape([2, 3])  # a shape the source file declared
    model.graph.node(0).outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    modelio.record_written_shapes(model)
    model.doc_string = "blk: y = loop(if(flag, xW + b, xW * s))"
    model.metadata_props["normalization"] = "x / 255"
    return model


def names_of(model: ir.Model) -> list[str]:
    graphs = [model.graph, *model.graph.subgraphs()]
    return [v.name for g in graphs for v in [*g.inputs, *g.initializers.values(), *(o for n in g for o in n.outputs)]]


def test_short_names_skip_the_interface():
    names = short_names(frozenset({"b", "x"}))
    first = [next(names) for _ in range(26)]
    assert first[:3] == ["a", "c", "d"] and "x" not in first
    assert first[24:] == ["aa", "ab"]  # after z, two characters: a leading letter, never a number


def test_subgraphs_reading_outer_values_keep_their_outputs():
    model = branchy_model()
    before = clone(model)
    result = compact(model)
    assert result.modified
    for flag in (True, False):
        assert_identical(before, model, {"x": randn((2, 3), 7), "flag": np.array(flag)})
    onnx.checker.check_model(modelio.to_proto(model), full_check=True)
    # the interface keeps its names; every other value has a short one, unique over the model and its bodies
    assert [v.name for v in model.graph.inputs] == ["x", "flag"] and model.graph.outputs[0].name == "y"
    inner = [n for n in names_of(model) if n not in ("x", "flag", "y")]
    assert len(set(inner)) == len(inner) and max(len(n) for n in inner) <= 2
    nodes = [n.name for g in [model.graph, *model.graph.subgraphs()] for n in g]
    assert len(set(nodes)) == len(nodes) and max(len(n) for n in nodes) <= 2
    # no declared intermediate shapes, doc strings or node notes in the file; the model's documentation stays
    proto = modelio.to_proto(model)
    assert not proto.graph.value_info and not any(n.doc_string or n.metadata_props for n in proto.graph.node)
    assert proto.doc_string == before.doc_string and {p.key for p in proto.metadata_props} == {"normalization"}
    assert len(proto.SerializeToString()) < len(modelio.to_proto(before).SerializeToString())
    # a compacted model has nothing left to trim
    assert not compact(model).modified


def test_options_choose_what_goes():
    model = branchy_model()
    compact(model, names=False, notes=False, model_notes=True)
    proto = modelio.to_proto(model)
    assert "/blk/MatMul_output_0" in {n.output[0] for n in proto.graph.node}  # names kept
    assert proto.graph.node[0].doc_string and not proto.graph.value_info
    assert not proto.doc_string and not proto.metadata_props
    model = branchy_model()
    compact(model, shapes=False)  # the declared shape follows its value's new name
    infos = modelio.to_proto(model).graph.value_info
    assert [i.name for i in infos] == [model.graph.node(0).outputs[0].name]


def test_optional_outputs_left_out_stay_out():
    # LSTM with its first output (Y) left out: naming it would ask onnxruntime to compute it
    hidden = 4
    nodes = [helper.make_node("LSTM", ["x", "lstm.W", "lstm.R"], ["", "/lstm/LSTM_output_1"], hidden_size=hidden,
                              name="/lstm/LSTM"),
             helper.make_node("Relu", ["/lstm/LSTM_output_1"], ["y"], name="/relu/Relu")]
    inits = {"lstm.W": randn((1, 4 * hidden, 3), 1), "lstm.R": randn((1, 4 * hidden, hidden), 2)}
    model = make_model(nodes, [tensor_info("x", np.float32, [5, 2, 3])], ["y"], inits)
    before = clone(model)
    compact(model)
    assert modelio.to_proto(model).graph.node[0].output[0] == ""
    assert_identical(before, model, {"x": randn((5, 2, 3), 3)})


def test_external_data_and_codebooks(tmp_path):
    # digits with 4-bit codebooks, saved with its tensors in an external data file, loaded back lazily
    model = modelio.load_model(DIGITS / "digits.onnx")
    KMeans(build_options(KMeans.Options, {"bits": 4}, "kmeans"))(model)
    source = tmp_path / "shared.onnx"
    modelio.save_model(model, source, external=True)
    model = modelio.load_model(source)
    forms = compressed_forms(model)
    compact(model)
    assert compressed_forms(model) == forms  # every Gather(codebook, Cast(indices)) is still there
    out = tmp_path / "out" / "compact.onnx"
    out.parent.mkdir()
    modelio.save_model(model, out, external=True)
    feeds = {"input": np.load(DIGITS / "test.npz")["input"][:16]}
    assert_identical(str(source), str(out), feeds)


def test_the_digits_pick_gets_smaller_with_the_same_outputs(tmp_path):
    # the shape of auto's digits pick (4-bit codebooks), written without and with compact by the pipeline
    calib = str(DIGITS / "calib.npz")
    run = RunOptions(latency=False, progress=False)
    plain, small = tmp_path / "plain.onnx", tmp_path / "small.onnx"
    optimize(str(DIGITS / "digits.onnx"), plain, passes="kmeans:bits=4", calib=calib, run=run)
    report = optimize(str(DIGITS / "digits.onnx"), small, passes="kmeans:bits=4; compact", calib=calib, run=run)
    assert [r.status for r in report.passes if r.step == "compact"] == ["kept"]
    feeds = {"input": np.load(DIGITS / "test.npz")["input"]}
    assert_identical(str(plain), str(small), feeds)

    def packed(path):
        return len(lzma.compress(path.read_bytes()))

    # names and provenance of 23 nodes and 30 weights: 468 bytes after lzma measured; half of it is asked for
    assert packed(plain) - packed(small) > 234
