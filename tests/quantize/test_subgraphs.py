"""quantize next to If/Loop bodies: onnxruntime 1.32's QDQPropagationTransformer moves a DequantizeLinear forward
through MaxPool/Reshape/Transpose/Squeeze/Unsqueeze/Slice (and an Identity it removed first); where that walk reaches
a value read inside a subgraph it aborts the whole process (SIGABRT, an assertion about a NodeArg index). So no
float data-movement op whose output leads into a body may read a DQ. Each model here is loaded in a child process
first: a regression kills that child, not pytest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from graphopt import data as datamod
from graphopt import modelio
from graphopt.cpu import resolve_target
from graphopt.options import build_options
from graphopt.passbase import PassContext
from graphopt.passes.quantize import Quantize, QuantizeOptions
from tests.helpers import make_proto, randn, run_model, tensor_info

I64 = lambda *v: np.array(v, np.int64)  # noqa: E731
LOAD_AND_RUN = ("import sys, numpy as np, onnxruntime as ort\n"
                "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
                "s.run(None, {'x': np.ones((3, 6), np.float32)})\n")


def _body(name: str, reads: str, op: str, inits: tuple = ()) -> onnx.GraphProto:
    nodes = [helper.make_node("MatMul", [reads, f"{name}_w"], [f"{name}_o"]) if op == "MatMul"
             else helper.make_node(op, [reads], [f"{name}_o"])]
    return helper.make_graph(nodes, name, [], [tensor_info(f"{name}_o", np.float32, ["N", 4])], list(inits))


def _model(variant: str) -> onnx.ModelProto:
    """x [N, 6] -> MatMul -> h [N, 8] -> (variant) -> s [N, 4], read inside an If (both branches) or a Loop body."""
    inits = {"w": randn((6, 8), 1) * 0.4, "starts": I64(0), "ends": I64(4), "axes": I64(1), "zero": np.float32(0),
             "shape": I64(-1, 4), "trip": np.array(2, np.int64)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm")]
    outputs = [tensor_info("y", np.float32, ["N", 4])]
    if variant == "int8_reshape_then_float_slice":  # the Reshape is int8 (shared scale): its DQ feeds the Slice
        nodes += [helper.make_node("Reshape", ["h", "shape"], ["h2"], name="reshape"),
                  helper.make_node("Reshape", ["h2", "shape_back"], ["h3"], name="reshape_back")]
        inits["shape_back"] = I64(-1, 8)
        src = "h3"
    else:
        src = "h"
    nodes.append(helper.make_node("Slice", [src, "starts", "ends", "axes"], ["s"], name="slice"))
    if variant == "slice_reshape_chain":  # Slice -> Reshape, both float: the walk goes through both
        nodes[-1].output[0] = "s0"
        nodes.append(helper.make_node("Reshape", ["s0", "shape"], ["s"], name="reshape"))
    if variant == "h_read_twice":  # the DQ of h has another reader: onnxruntime gives each reader its own DQ
        nodes.append(helper.make_node("Sigmoid", ["h"], ["z"]))
        outputs.append(tensor_info("z", np.float32, ["N", 8]))
    if variant == "slice_is_an_output":
        outputs.append(tensor_info("s", np.float32, ["N", 4]))
    nodes += [helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0), helper.make_node("Greater", ["m", "zero"],
                                                                                         ["cond"])]
    then_w = onnx.numpy_helper.from_array(randn((4, 4), 2) * 0.5, "then_w")
    if variant == "loop_body":
        body = helper.make_graph(
            [helper.make_node("Relu", ["s"], ["r"]), helper.make_node("Add", ["acc", "r"], ["acc_out"]),
             helper.make_node("Identity", ["c"], ["c_out"])], "body",
            [tensor_info("i", np.int64, []), tensor_info("c", np.bool_, []), tensor_info("acc", np.float32, ["N", 4])],
            [tensor_info("c_out", np.bool_, []), tensor_info("acc_out", np.float32, ["N", 4])])
        nodes += [helper.make_node("Mul", ["s", "zero"], ["acc0"]),
                  helper.make_node("Loop", ["trip", "", "acc0"], ["y"], body=body)]
    else:
        nodes.append(helper.make_node("If", ["cond"], ["y"], then_branch=_body("then", "s", "MatMul", (then_w,)),
                                      else_branch=_body("else", "s", "Relu")))
    return make_proto(nodes, [tensor_info("x", np.float32, ["N", 6])], outputs, inits, opset=13)


VARIANTS = ["slice_into_if", "loop_body", "slice_reshape_chain", "h_read_twice", "slice_is_an_output",
            "int8_reshape_then_float_slice"]


def _quantize(proto: onnx.ModelProto, feeds: list[dict], **options) -> tuple[ir.Model, list[dict]]:
    model = ir.serde.deserialize_model(proto)
    data = datamod.load_data(feeds, datamod.input_specs(model))
    opts = build_options(QuantizeOptions, {"target": "size", "bias_correction": False, **options}, "quantize")
    result = Quantize(opts, PassContext(calib=data, target=resolve_target("portable")))(model)
    return model, result.rows


def _loads_in_a_child(model: ir.Model, path: Path) -> None:
    modelio.save_model(model, path)
    run = subprocess.run([sys.executable, "-c", LOAD_AND_RUN, str(path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"onnxruntime died (exit {run.returncode}): {run.stderr.strip()[-300:]}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_dequantize_propagates_into_a_body(variant: str, tmp_path: Path) -> None:
    proto = _model(variant)
    x = randn((16, 6), 3)
    x[8:] -= 2.0  # the last feeds take the other branch (mean(x) < 0)
    feeds = [{"x": x[:8]}, {"x": x[8:]}]
    model, rows = _quantize(proto, feeds, exclude_ops=["Slice"])
    _loads_in_a_child(model, tmp_path / "q.onnx")
    assert any(r["node"] == "mm" and r["action"] == "int8" for r in rows)  # the MatMul keeps its int8 weights
    for feed in feeds:
        ref, got = run_model(proto, feed), run_model(model, feed)
        for name, a in ref.items():
            # int8 x (1 step = range/255) and int8 weights (half a step per channel) over K=6 terms, then at most
            # one more int8 MatMul in the If: well under 5% of the output's largest magnitude.
            np.testing.assert_allclose(got[name], a, atol=0.05 * np.abs(a).max() + 1e-6, err_msg=name)


def test_a_dequantize_still_feeds_a_float_slice_without_bodies() -> None:
    """The guard is narrow: without a subgraph, a float Slice keeps reading the int8 MatMul's DQ (onnxruntime runs
    it on uint8 there)."""
    inits = {"w": randn((6, 8), 1) * 0.4, "starts": I64(0), "ends": I64(4), "axes": I64(1)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Slice", ["h", "starts", "ends", "axes"],
                                                                            ["s"], name="slice"),
             helper.make_node("Sigmoid", ["s"], ["y"])]
    proto = make_proto(nodes, [tensor_info("x", np.float32, ["N", 6])], [tensor_info("y", np.float32, ["N", 4])],
                       inits, opset=13)
    model, _ = _quantize(proto, [{"x": randn((8, 6), 3)}], exclude_ops=["Slice"])
    slice_node = next(n for n in model.graph if n.name == "slice")
    assert slice_node.inputs[0].producer().op_type == "DequantizeLinear"
