"""Verification and checkpoints of large models: weights files unmapped between passes, checkpoints on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt import modelio, pipeline, verify
from graphopt.pipeline import RunOptions
from tests.helpers import assert_same_outputs, run_model

MAPS = Path("/proc/self/maps")


def _external_mlp(folder: Path, width: int = 64) -> Path:
    """x -> MatMul(w0) -> Relu -> MatMul(w1), both weights in one external-data file."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32),
                                       f"w{i}") for i in range(2)]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w0"], ["h"], name="mm0"), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w1"], ["y"], name="mm1")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])], weights)
    path = folder / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path,
              save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    np.savez(folder / "c.npz", x=rng.standard_normal((32, width)).astype(np.float32))
    return path


def _mapped(path: Path) -> bool:
    return str(path.resolve()) in MAPS.read_text()


def _any_weights_mapped() -> bool:
    """Any external-data file (the input's or a checkpoint's) mapped by this process."""
    return any(line.rstrip().endswith(".onnx.data") for line in MAPS.read_text().splitlines())


@pytest.mark.skipif(not MAPS.exists(), reason="needs /proc/self/maps")
def test_release_mapped_unmaps_weights_and_they_read_again(tmp_path):
    path = _external_mlp(tmp_path)
    data = tmp_path / "m.onnx.data"
    model = modelio.load_model(path)
    tensor = model.graph.initializers["w0"].const_value
    expected = np.array(tensor.numpy())
    assert _mapped(data)
    verify.release_mapped(model, None)
    assert not _mapped(data)
    np.testing.assert_array_equal(tensor.numpy(), expected)  # mapped again on demand

    alive = tensor.numpy()  # an array still in use keeps its mapping: no error, still readable
    verify.release_mapped(model)
    np.testing.assert_array_equal(alive, expected)


@pytest.mark.skipif(not MAPS.exists(), reason="needs /proc/self/maps")
def test_checkpoints_on_disk_give_the_same_model_and_unmap_weights_between_steps(tmp_path, monkeypatch):
    """A kept pass, then a rolled-back one, with checkpoints on disk (as for a large model): the written model is
    the one in-memory checkpoints give, saved straight from the checkpoint file, and no step leaves a weights file
    mapped."""
    src = _external_mlp(tmp_path)
    recipe, calib = "prune:sparsity=0.3; prune:sparsity=0.97", tmp_path / "c.npz"
    run = RunOptions(latency=False, progress=False)
    small = graphopt.optimize(str(src), tmp_path / "small.onnx", passes=recipe, calib=calib, data=calib,
                              metric="snr", min_snr=10.0, run=run)
    monkeypatch.setattr(pipeline, "LARGE_BYTES", 1000)
    monkeypatch.setattr(verify, "LARGE_BYTES", 1000)
    mapped_between = []  # before each step, and when the saved model is timed
    for name in ("_step", "record_final"):
        def watched(self, *args, _method=getattr(pipeline.Pipeline, name)):
            mapped_between.append(_any_weights_mapped())
            return _method(self, *args)
        monkeypatch.setattr(pipeline.Pipeline, name, watched)
    large = graphopt.optimize(str(src), tmp_path / "large.onnx", passes=recipe, calib=calib, data=calib,
                              metric="snr", min_snr=10.0, run=run)
    statuses = [[r.status for r in report.passes[2:4]] for report in (small, large)]
    assert statuses == [["kept", "rolled back"]] * 2, [r.reason for r in large.passes]
    feeds = {"x": np.load(calib)["x"]}
    # the same weights either way: exactly the same outputs
    assert_same_outputs(str(tmp_path / "small.onnx"), str(tmp_path / "large.onnx"), feeds, rtol=0, atol=0)
    assert not np.array_equal(run_model(str(tmp_path / "large.onnx"), feeds)["y"], run_model(str(src), feeds)["y"])
    # what a step read of a weights file (the teacher shares the tensors it read through the model) is unmapped
    assert mapped_between and not any(mapped_between)
