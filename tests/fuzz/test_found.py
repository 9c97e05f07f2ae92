"""Regression tests for what the generated-graph run (test_generated_graphs.py) found: each a hand-built model
that reproduces one finding, asserting the correct behaviour. A finding whose fix has not landed is marked
``xfail(strict=True)`` and listed in known.py (so the fuzz run notes it instead of failing); when the fix
lands, delete both."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import graphopt
from graphopt import data as datamod, modelio
from graphopt.options import build_options
from graphopt.passbase import PassContext
from graphopt.passes.canonicalize import Canonicalize
from graphopt.passes.channels import ChannelPrune
from graphopt.passes.cleanup import Cleanup
from graphopt.pipeline import RunOptions
from graphopt.weights import constant_array
from tests.helpers import assert_same_outputs, clone, make_model, make_proto, randn, run_model, tensor_info

X = tensor_info("x", np.float32, ["N", 3])
FEEDS = {"x": randn((4, 3), 7)}


def _body(name: str, nodes: list, out: str, width: int, inits: tuple = ()) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT,
                                                                             ["N", width])], list(inits))


def _if_on_mean(then_nodes: list, then_out: str, else_nodes: list, else_out: str, inits: dict, width: int = 3,
                then_inits: tuple = ()) -> list:
    """cond = mean(x) > 0; y = If(cond) with the given branch bodies, each yielding a [N, width] float."""
    inits["zero"] = np.array(0.0, np.float32)
    return [helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0),
            helper.make_node("Greater", ["m", "zero"], ["cond"]),
            helper.make_node("If", ["cond"], ["y"], then_branch=_body("then", then_nodes, then_out, width, then_inits),
                             else_branch=_body("else", else_nodes, else_out, width))]


@pytest.mark.parametrize("outer_is_output", [False, True], ids=["rolled_back", "raises"])
def test_cleanup_keeps_branch_identity_of_an_outer_value(outer_is_output: bool) -> None:
    inits = {"w": randn((3, 3), 1)}
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             *_if_on_mean([helper.make_node("MatMul", ["r", "w"], ["a"])], "a",
                          [helper.make_node("Identity", ["r"], ["b"])], "b", inits)]
    outputs = [tensor_info(name, np.float32, ["N", 3]) for name in (["r", "y"] if outer_is_output else ["y"])]
    model = make_model(nodes, [X], outputs, inits, opset=13)
    Canonicalize()(model)
    reference = clone(model)
    Cleanup()(model)
    onnx.checker.check_model(modelio.to_proto(model))
    assert_same_outputs(reference, model, FEEDS)


def test_quantize_keeps_onnxruntime_alive_with_a_float_slice_into_an_if(tmp_path: Path) -> None:
    inits = {"w": randn((6, 8), 1) * 0.4, "starts": np.array([0], np.int64), "ends": np.array([4], np.int64),
             "axes": np.array([1], np.int64)}
    then_w = onnx.numpy_helper.from_array(randn((4, 4), 2) * 0.5, "then_w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Slice", ["h", "starts", "ends", "axes"], ["s"]),
             *_if_on_mean([helper.make_node("MatMul", ["s", "then_w"], ["a"])], "a",
                          [helper.make_node("Relu", ["s"], ["b"])], "b", inits, width=4, then_inits=(then_w,))]
    proto = make_proto(nodes, [tensor_info("x", np.float32, ["N", 6])], [tensor_info("y", np.float32, ["N", 4])],
                       inits, opset=13)
    onnx.save(proto, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=randn((8, 6), 3))
    # In a child process: the abort would take pytest down with it. Slice excluded: the float Slice quantize's
    # sensitivity candidates also produce, without needing a model whose budget fails.
    run = subprocess.run([sys.executable, "-c", "import sys; from graphopt.cli import main; sys.exit(main())",
                          "optimize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out.onnx"), "--calib",
                          str(tmp_path / "calib.npz"), "--passes", "quantize:target=size,exclude_ops=Slice",
                          "--no-latency", "--quiet"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"exit {run.returncode}: {run.stderr.strip()[-300:]}"


def test_a_passthrough_output_keeps_the_input_shape(tmp_path: Path) -> None:
    proto = make_proto([helper.make_node("Relu", ["x"], ["y"])], [tensor_info("x", np.float32, [2, 3])],
                       [tensor_info("y", np.float32, [2, 3]), tensor_info("x", np.float32, [None, None])])
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, tmp_path / "m.onnx")
    assert datamod.input_specs(modelio.load_model(tmp_path / "m.onnx"))[0].shape == (2, 3)
    np.savez(tmp_path / "data.npz", x=randn((8, 3), 4))
    report = graphopt.optimize(tmp_path / "m.onnx", tmp_path / "out.onnx", data=tmp_path / "data.npz",
                               run=RunOptions(latency=False, progress=False))
    assert report.passed


def test_channel_prune_leaves_a_batchnorm_across_a_matmul_s_rows_alone(tmp_path: Path) -> None:
    """MatMul [N, 2, 1] x [1, 10] -> BatchNormalization over axis 1 (2 channels) -> MatMul: the MatMul's channels
    are the last axis (10), the BatchNormalization's axis 1. The group is blocked with the reason, not the model
    refused ('axis 0 has 2 entries, the analysis expected 10x1')."""
    inits = {"w1": randn((1, 10), 1), "gamma": np.array([1.3, 0.5], np.float32),
             "beta": np.array([-1.1, -0.1], np.float32), "mean": np.array([-0.3, -0.2], np.float32),
             "var": np.array([1.8, 1.3], np.float32), "w2": randn((10, 1), 2)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["t1"]),
             helper.make_node("BatchNormalization", ["t1", "gamma", "beta", "mean", "var"], ["t2"], name="bn"),
             helper.make_node("MatMul", ["t2", "w2"], ["y"])]
    proto = make_proto(nodes, [tensor_info("x", np.float32, ["N", 2, 1])], [tensor_info("y", np.float32, ["N", 2, 1])],
                       inits, opset=11)
    onnx.save(proto, tmp_path / "m.onnx")
    np.savez(tmp_path / "data.npz", x=randn((8, 2, 1), 3))
    report = graphopt.optimize(tmp_path / "m.onnx", tmp_path / "out.onnx", data=tmp_path / "data.npz",
                               passes="channel_prune:ratio=0.1", run=RunOptions(latency=False, progress=False))
    assert report.passed
    step = next(r for r in report.passes if r.step.startswith("channel_prune"))
    assert step.status == "no change" and any("normalizes axis 1" in n for n in step.notes), step.notes


def test_channel_prune_keeps_a_layer_whose_whole_output_is_one_concat_input() -> None:
    """a = MatMul(x) [N, 4], b = MatMul(a) [N, 1], c = Concat(b, a), Add(MatMul(c), c): the residual ties b's
    one channel to the rest (a group of 2-channel units). The weakest unit is b's channel (its weights are
    small): removing it left b's MatMul with no outputs, and the repair raised 'cannot reshape array of size 0
    into shape (0)'. That unit stays, and the next weakest go."""
    inits = {"w1": randn((3, 4), 1), "w2": randn((4, 1), 2) * 0.01, "w3": randn((5, 5), 3) * 0.3,
             "w4": randn((5, 1), 4)}
    inits["w3"][:, 0] *= 0.01
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="a"),
             helper.make_node("MatMul", ["a", "w2"], ["b"], name="b"),
             helper.make_node("Concat", ["b", "a"], ["c"], axis=1),
             helper.make_node("MatMul", ["c", "w3"], ["d"], name="d"),
             helper.make_node("Add", ["d", "c"], ["e"]),
             helper.make_node("MatMul", ["e", "w4"], ["y"], name="y")]
    model = make_model(nodes, [X], [tensor_info("y", np.float32, ["N", 1])], inits, opset=11)
    reference = clone(model)
    calib = datamod.from_arrays({"x": randn((64, 3), 5)}, datamod.input_specs(model), batch_size=16)
    opts = build_options(ChannelPrune.Options, {"ratio": 0.5}, "channel_prune")
    result = ChannelPrune(opts, PassContext(calib=calib))(model)
    onnx.checker.check_model(modelio.to_proto(model))
    assert constant_array(model.graph.initializers["w2"]).shape == (2, 1)  # two of a's units went
    assert any("kept the last channel" in n for n in result.notes), result.notes
    assert run_model(model, FEEDS)["y"].shape == run_model(reference, FEEDS)["y"].shape
