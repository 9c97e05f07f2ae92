"""Load and save: external data, refused traversal, truncation, atomic writes, sparse initializers kept."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import modelio
from graphopt.errors import GraphoptError


def _matmul_model(weight: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, weight.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, weight.shape[1]])],
        [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _run(path_or_proto, x):
    src = path_or_proto.SerializeToString() if isinstance(path_or_proto, onnx.ModelProto) else str(path_or_proto)
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.fixture
def weight():
    return np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)


def test_round_trip_keeps_outputs(tmp_path, weight):
    src = tmp_path / "m.onnx"
    onnx.save(_matmul_model(weight), src)
    model = modelio.load_model(src)
    out = modelio.save_model(model, tmp_path / "out.onnx")
    x = np.ones((2, 64), np.float32)
    np.testing.assert_array_equal(_run(src, x), _run(out, x))


def test_external_data_load_and_save(tmp_path, weight):
    src = tmp_path / "ext.onnx"
    onnx.save(_matmul_model(weight), src, save_as_external_data=True, location="ext.bin", size_threshold=0)
    model = modelio.load_model(src)
    out = modelio.save_model(model, tmp_path / "sub_out.onnx", external=True)
    assert (tmp_path / "sub_out.onnx.data").exists()
    x = np.ones((2, 64), np.float32)
    np.testing.assert_array_equal(_run(src, x), _run(out, x))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".graphopt-")]  # temp folder gone


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd", "link.bin"])
def test_external_data_outside_folder_refused(tmp_path, weight, location):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (tmp_path / "outside.bin").write_bytes(weight.tobytes())
    if location == "link.bin":
        os.symlink(tmp_path / "outside.bin", model_dir / "link.bin")
    proto = _matmul_model(weight)
    tensor = proto.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(weight.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    path = model_dir / "m.onnx"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(GraphoptError, match="refused"):
        modelio.load_model(path)


def test_truncated_file_is_detected(tmp_path, weight):
    data = _matmul_model(weight).SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(GraphoptError, match="truncated|not an ONNX"):
        modelio.load_model(path)


@pytest.mark.parametrize("content,match", [(b"", "empty"), (b"hello, not a model\n" * 10, "not an ONNX")])
def test_not_onnx(tmp_path, content, match):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(GraphoptError, match=match):
        modelio.load_model(path)


def test_missing_file(tmp_path):
    with pytest.raises(GraphoptError, match="no such file"):
        modelio.load_model(tmp_path / "nope.onnx")


def test_failed_save_leaves_nothing(tmp_path, weight, monkeypatch):
    model = modelio.load_model(_save(tmp_path, weight))
    target = tmp_path / "out" / "o.onnx"
    target.parent.mkdir()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", boom)
    with pytest.raises(GraphoptError, match="could not write the model"):
        modelio.save_model(model, target)
    assert list(target.parent.iterdir()) == []


def _save(tmp_path: Path, weight: np.ndarray) -> Path:
    path = tmp_path / "in.onnx"
    onnx.save(_matmul_model(weight), path)
    return path


def test_output_equal_to_input_refused(tmp_path, weight):
    src = _save(tmp_path, weight)
    with pytest.raises(GraphoptError, match="overwrite the input"):
        modelio.check_output_path(src, tmp_path / "." / "in.onnx")


def test_sparse_initializer_survives_load_and_save(tmp_path, weight):
    sparse_weight = weight.copy()
    sparse_weight[np.abs(sparse_weight) < 1.5] = 0.0  # ~87% zeros: sparse storage is smaller
    proto = _matmul_model(sparse_weight)
    sparse = modelio.dense_to_sparse(proto.graph.initializer[0])
    assert sparse is not None
    del proto.graph.initializer[:]
    proto.graph.sparse_initializer.append(sparse)
    src = tmp_path / "sparse.onnx"
    onnx.save(proto, src)

    model = modelio.load_model(src)
    assert "w" in model.graph.initializers  # densified, not dropped
    out = modelio.save_model(model, tmp_path / "sparse_out.onnx")
    saved = onnx.load(out)
    onnx.checker.check_model(saved)  # full_check: onnx shape inference ignores sparse initializers
    assert [s.values.name for s in saved.graph.sparse_initializer] == ["w"]
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_allclose(_run(out, x), x @ sparse_weight, rtol=1e-5, atol=1e-5)


def test_dense_to_sparse_declines_when_not_smaller(weight):
    assert modelio.dense_to_sparse(numpy_helper.from_array(weight, "w")) is None


def test_default_output_in_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert modelio.default_output("/some/where/net.onnx") == tmp_path / "net.opt.onnx"


@pytest.mark.parametrize("external", [False, True])
def test_inferred_shapes_are_not_written(tmp_path, external):
    """The source declared the shape of `a`, not of `b`: after canonicalize infers both, only `a`'s is written."""
    from graphopt.passes.canonicalize import Canonicalize

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["b"]),
         helper.make_node("Abs", ["b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        value_info=[helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4])])
    src = tmp_path / "src.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    model = modelio.load_model(src)
    Canonicalize()(model)
    assert next(n for n in model.graph if n.op_type == "Neg").outputs[0].shape is not None  # inferred in memory
    out = modelio.save_model(model, tmp_path / "out.onnx", external=external)
    assert [v.name for v in onnx.load(str(out), load_external_data=False).graph.value_info] == ["a"]
    assert [v.name for v in modelio.to_proto(model).graph.value_info] == ["a"]
    x = np.arange(8, dtype=np.float32).reshape(2, 4) - 4
    assert np.array_equal(_run(out, x), np.abs(np.maximum(x, 0)))


def test_external_weights_a_pass_left_alone_stay_readable(tmp_path, weight):
    # A small model with external data: a pass rewrites one weight and leaves the other in the source's .data file.
    # The candidate, serialized in memory, must carry that weight (a proto has no folder to find the file in):
    # it was once rolled back by the checker ("should be stored in ..., but it is not regular file").
    import graphopt
    from graphopt.pipeline import RunOptions

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
         helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])],
        [numpy_helper.from_array(np.eye(64, dtype=np.float32) * 2, "w1"), numpy_helper.from_array(weight, "w2")])
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), src,
              save_as_external_data=True, location="m.bin", size_threshold=0)
    proto = modelio.to_proto(modelio.load_model(src))
    onnx.checker.check_model(proto)
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    np.testing.assert_array_equal(_run(proto, x), _run(src, x))
    np.savez(tmp_path / "c.npz", x=x)
    report = graphopt.optimize(str(src), tmp_path / "o.onnx", passes="prune:sparsity=0.3,skip_nodes=mm1",
                               calib=tmp_path / "c.npz", metric="snr", min_snr=1.0,
                               run=RunOptions(latency=False, progress=False))
    assert [r.status for r in report.passes if r.step.startswith("prune")] == ["kept"], report.passes[-2].reason


def _passthrough_model(input_dims: list, output_dims: list, opset: int = 13) -> onnx.ModelProto:
    """y = Relu(x), and x itself also an output, declared with other dims than the input (onnx_ir holds one Value)."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, input_dims),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, output_dims)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _declared(proto: onnx.ModelProto, infos: str) -> list:
    info = next(i for i in getattr(proto.graph, infos) if i.name == "x")
    return [d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in info.type.tensor_type.shape.dim]


DECLARATIONS = [([2, 3], [None, None]), (["N", 3], [2, 3])]  # (input dims, output dims) of x


@pytest.mark.parametrize("external", [False, True])
@pytest.mark.parametrize("input_dims, output_dims", DECLARATIONS, ids=["fixed_input", "fixed_output"])
def test_an_input_that_is_an_output_keeps_both_declarations(tmp_path, input_dims, output_dims, external):
    from graphopt.data import input_specs
    from graphopt.passes.canonicalize import Canonicalize

    onnx.save(_passthrough_model(input_dims, output_dims), tmp_path / "m.onnx")
    model = modelio.load_model(tmp_path / "m.onnx")
    expected = tuple(input_dims)
    assert input_specs(model)[0].shape == expected  # the input's declaration is what data must fit
    Canonicalize()(model)  # shape inference must not bring the output's dims back
    assert input_specs(model)[0].shape == expected
    for proto in (modelio.to_proto(model),
                  onnx.load(str(modelio.save_model(model, tmp_path / "out.onnx", external=external)))):
        assert (_declared(proto, "input"), _declared(proto, "output")) == (input_dims, output_dims)
    x = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    session = ort.InferenceSession(str(tmp_path / "out.onnx"), providers=["CPUExecutionProvider"])
    relu, same = session.run(["y", "x"], {"x": x})
    assert np.array_equal(relu, np.maximum(x, 0)) and np.array_equal(same, x)
    assert input_specs(modelio.load_model(tmp_path / "out.onnx"))[0].shape == expected  # checkpoints reload files


def test_an_input_that_is_an_output_keeps_both_declarations_through_a_run(tmp_path):
    # opset 11: canonicalize upgrades it through the version converter, whose result is read back into the model.
    import graphopt
    from graphopt.pipeline import RunOptions

    onnx.save(_passthrough_model([2, 3], [None, None], opset=11), tmp_path / "m.onnx")
    report = graphopt.optimize(tmp_path / "m.onnx", tmp_path / "out.onnx", run=RunOptions(latency=False, progress=False))
    assert report.passed and any(r.step.startswith("canonicalize") and r.status == "kept" for r in report.passes)
    written = onnx.load(str(tmp_path / "out.onnx"))
    assert (_declared(written, "input"), _declared(written, "output")) == ([2, 3], [None, None])
