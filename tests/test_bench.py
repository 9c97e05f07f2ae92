"""bench/inspection: MACs against hand-computed numbers, params, sizes, benchmark row bookkeeping."""

from __future__ import annotations

import lzma

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

from graphopt import bench, costs
from graphopt.errors import DataError, GraphoptError
from graphopt.inspection import format_inspect, inspect_model

RNG = np.random.default_rng(0)


def _init(name: str, shape: tuple[int, ...], dtype=np.float32) -> onnx.TensorProto:
    if np.issubdtype(dtype, np.integer):
        return numpy_helper.from_array(RNG.integers(0, 8, shape).astype(dtype), name)
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(dtype), name)


def _model(nodes, inputs, outputs, inits=(), opset: int = 17) -> ir.Model:
    graph = h.make_graph(nodes, "g", inputs, outputs, list(inits))
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    return ir.serde.deserialize_model(proto)


def _x(name, dims, dtype=T.FLOAT):
    return h.make_tensor_value_info(name, dtype, dims)


def _conv_model(x_dims=(1, 4, 10, 10)) -> ir.Model:
    # groups 2, stride 2, pad 1: out [1, 6, 5, 5]; each output element takes (4/2)*3*3 = 18 MACs.
    node = h.make_node("Conv", ["x", "w", "b"], ["y"], group=2, strides=[2, 2], pads=[1, 1, 1, 1])
    return _model([node], [_x("x", list(x_dims))], [_x("y", None)], [_init("w", (6, 2, 3, 3)), _init("b", (6,))])


def test_conv_groups_strides_pads():
    (cost,) = costs.layer_costs(_conv_model())
    assert cost.op == "Conv"
    assert cost.output_shape == (1, 6, 5, 5)
    assert cost.macs == 6 * 5 * 5 * 2 * 3 * 3 == 2700
    assert cost.params == 6 * 2 * 3 * 3 + 6


def test_conv_transpose_grouped():
    # x [1,4,5,5], group 2, W [4, 3, 2, 2] -> 6 output channels, stride 2 -> [1, 6, 10, 10].
    # Each input element scatters into (M/group) * k*k = 3*4 outputs: 100 * 12 MACs.
    node = h.make_node("ConvTranspose", ["x", "w"], ["y"], group=2, strides=[2, 2])
    model = _model([node], [_x("x", [1, 4, 5, 5])], [_x("y", None)], [_init("w", (4, 3, 2, 2))])
    (cost,) = costs.layer_costs(model)
    assert cost.output_shape == (1, 6, 10, 10)
    assert cost.macs == 1200
    # the same number counted from the output side: 600 outputs, each (C/group) * (k/s)^2 = 2 MACs
    assert cost.macs == 600 * 2


def test_gemm_trans_a_trans_b():
    # A is stored [K=7, M=3] (transA), B is [N=5, K=7] (transB): Y [3, 5], 7 MACs each.
    node = h.make_node("Gemm", ["a", "b", "c"], ["y"], transA=1, transB=1)
    model = _model([node], [_x("a", [7, 3])], [_x("y", None)], [_init("b", (5, 7)), _init("c", (5,))])
    (cost,) = costs.layer_costs(model)
    assert cost.output_shape == (3, 5)
    assert cost.macs == 3 * 5 * 7
    assert cost.params == 35 + 5


def test_matmul_batched_and_dynamic_batch():
    # [N, 3, 4, 6] @ [6, 5] and a batched activation x activation product [N, 4, 6] @ [N, 6, 5].
    nodes = [h.make_node("MatMul", ["a", "w"], ["y"]), h.make_node("MatMul", ["p", "q"], ["z"])]
    inputs = [_x("a", ["N", 3, 4, 6]), _x("p", ["N", 4, 6]), _x("q", ["N", 6, 5])]
    model = _model(nodes, inputs, [_x("y", None), _x("z", None)], [_init("w", (6, 5))])
    first, second = costs.layer_costs(model)  # batch N -> 1
    assert (first.macs, first.output_shape, first.params) == (3 * 4 * 5 * 6, (1, 3, 4, 5), 30)
    assert (second.macs, second.params) == (4 * 5 * 6, 0)
    shapes = {"a": (2, 3, 4, 6), "p": (3, 4, 6), "q": (3, 6, 5)}
    assert costs.count_macs(model, shapes) == 2 * 360 + 3 * 120


def test_dynamic_batch_and_unknown_spatial_dims():
    assert costs.count_macs(_conv_model(("N", 4, 10, 10))) == 2700
    assert costs.count_macs(_conv_model(("N", 4, 10, 10)), {"x": (2, 4, 10, 10)}) == 5400
    model = _conv_model((1, 4, "H", "W"))
    (cost,) = costs.layer_costs(model)
    assert cost.macs == 0 and cost.note  # unknown H, W: counted as 0 and said so
    assert costs.count_macs(model, {"x": (1, 4, 10, 10)}) == 2700
    with pytest.raises(GraphoptError, match="rank"):
        costs.count_macs(model, {"x": (1, 4, 10)})
    with pytest.raises(GraphoptError, match="nope"):
        costs.count_macs(model, {"nope": (1,)})


def test_reshape_data_prop_feeds_gemm():
    # Reshape(x, [0, -1]) needs data propagation to give Gemm a [1, 54] input.
    nodes = [h.make_node("Reshape", ["x", "s"], ["f"]), h.make_node("Gemm", ["f", "w"], ["y"])]
    inits = [numpy_helper.from_array(np.array([0, -1], np.int64), "s"), _init("w", (54, 10))]
    model = _model(nodes, [_x("x", ["N", 6, 3, 3])], [_x("y", None)], inits)
    assert costs.count_macs(model) == 540


def test_shape_computed_reshape_at_old_opset_and_constant_weights():
    # Reshape(x, Concat(Gather(Shape(x), [0]), [-1])) at opset 12, where ONNX propagates no shape values;
    # the Gemm weight is a Constant node (as un-canonicalized exports keep them).
    weight = _init("w", (54, 10))
    nodes = [
        h.make_node("Shape", ["x"], ["s"]),
        h.make_node("Gather", ["s", "i"], ["n"]),
        h.make_node("Concat", ["n", "m1"], ["shape"], axis=0),
        h.make_node("Reshape", ["x", "shape"], ["f"]),
        h.make_node("Constant", [], ["w"], value=weight),
        h.make_node("Gemm", ["f", "w"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in [("i", [0]), ("m1", [-1])]]
    model = _model(nodes, [_x("x", ["N", 6, 3, 3])], [_x("y", None)], inits, opset=12)
    (cost,) = costs.layer_costs(model, {"x": (2, 6, 3, 3)})
    assert (cost.output_shape, cost.macs, cost.params) == ((2, 10), 2 * 54 * 10, 540)
    assert costs.count_params(model) == 540 + 2
    assert model.opset_imports[""] == 12


def test_codebook_weights_and_integer_ops():
    # Conv weight = Gather(codebook, Cast(indices)): the logical [6,2,3,3] weight, its shape inferred.
    nodes = [
        h.make_node("Cast", ["idx"], ["idx64"], to=T.INT64),
        h.make_node("Gather", ["codebook", "idx64"], ["w"]),
        h.make_node("Conv", ["x", "w"], ["y"], group=2, strides=[2, 2], pads=[1, 1, 1, 1]),
        h.make_node("MatMulInteger", ["qa", "qb"], ["qy"]),
    ]
    inits = [_init("codebook", (16,)), _init("idx", (6, 2, 3, 3), np.uint8), _init("qb", (8, 4), np.int8)]
    inputs = [_x("x", [1, 4, 10, 10]), _x("qa", [1, 8], T.UINT8)]
    model = _model(nodes, inputs, [_x("y", None), _x("qy", None, T.INT32)], inits)
    conv, mmi = costs.layer_costs(model)
    assert (conv.macs, conv.params) == (2700, 108)
    assert (mmi.op, mmi.macs, mmi.params) == ("MatMulInteger", 32, 32)


def test_qlinear_conv():
    nodes = [
        h.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], pads=[1, 1, 1, 1]),
    ]
    scalars = [numpy_helper.from_array(np.array(v, dt), n) for n, v, dt in [
        ("xs", 0.1, np.float32), ("xz", 0, np.uint8), ("ws", 0.1, np.float32), ("wz", 0, np.int8),
        ("ys", 0.1, np.float32), ("yz", 0, np.uint8)]]
    model = _model(nodes, [_x("x", [1, 3, 8, 8], T.UINT8)], [_x("y", None, T.UINT8)], [_init("w", (4, 3, 3, 3), np.int8), *scalars])
    (cost,) = costs.layer_costs(model)
    assert (cost.output_shape, cost.macs, cost.params) == ((1, 4, 8, 8), 4 * 64 * 27, 108)


def _if_model() -> ir.Model:
    then_graph = h.make_graph(
        [h.make_node("MatMul", ["x", "w2"], ["t"])], "then", [], [_x("t", None)], [_init("w2", (4, 5))]
    )
    else_graph = h.make_graph(
        [h.make_node("MatMul", ["x", "w1"], ["e"])], "else", [], [_x("e", None)]
    )
    nodes = [h.make_node("If", ["c"], ["y"], then_branch=then_graph, else_branch=else_graph)]
    return _model(nodes, [_x("x", ["N", 4]), _x("c", [], T.BOOL)], [_x("y", None)], [_init("w1", (4, 5))])


def test_if_bodies_and_params():
    model = _if_model()
    layers = costs.layer_costs(model)
    assert sorted(c.macs for c in layers) == [20, 20]
    assert sorted(c.params for c in layers) == [20, 20]  # the outer-scope w1 counts for the else branch
    assert costs.count_params(model) == 40
    assert costs.count_params(_conv_model()) == 6 * 2 * 9 + 6


def test_count_macs_does_not_modify_the_model():
    model = _conv_model(("N", 4, "H", "W"))
    before = ir.serde.serialize_model(model).SerializeToString()
    assert costs.count_macs(model, {"x": (2, 4, 10, 10)}) == 5400
    assert ir.serde.serialize_model(model).SerializeToString() == before
    assert model.graph.outputs[0].shape is None


def test_file_sizes_with_external_data(tmp_path):
    proto = ir.serde.serialize_model(_conv_model())
    # zeros compress to almost nothing: proof that the data file is read and compressed too
    proto.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.zeros((6, 2, 3, 3), np.float32), "w"))
    path = tmp_path / "m.onnx"
    onnx.save_model(proto, str(path), save_as_external_data=True, location="m.data", size_threshold=0)
    data = tmp_path / "m.data"
    assert data.stat().st_size >= (108 + 6) * 4
    total, packed = bench.file_sizes(path)
    assert total == path.stat().st_size + data.stat().st_size
    assert packed == len(lzma.compress(path.read_bytes() + data.read_bytes(), preset=bench.LZMA_PRESET))
    with pytest.raises(GraphoptError):
        bench.file_sizes(tmp_path / "missing.onnx")


def _relu_model(width: int) -> ir.Model:
    nodes = [h.make_node("MatMul", ["x", "w"], ["m"]), h.make_node("Relu", ["m"], ["y"])]
    return _model(nodes, [_x("x", ["N", 8])], [_x("y", None)], [_init("w", (8, width))])


def test_benchmark_rows(tmp_path):
    path = tmp_path / "a.onnx"
    onnx.save_model(ir.serde.serialize_model(_relu_model(4)), str(path))
    other = _relu_model(16)
    proto = ir.serde.serialize_model(_relu_model(2))
    feeds = [{"x": RNG.standard_normal((2, 8)).astype(np.float32)} for _ in range(3)]
    rows = bench.benchmark([path, other, proto], feeds, warmup=1, repeats=5, labels=["a", "b", "c"])
    assert [r.label for r in rows] == ["a", "b", "c"]
    assert [r.runs for r in rows] == [5, 5, 5]
    assert rows[0].ratio == 1.0
    assert rows[1].ratio == pytest.approx(rows[1].median_ms / rows[0].median_ms)
    assert all(r.p90_ms >= r.median_ms > 0 for r in rows)
    assert rows[0].file_bytes == path.stat().st_size and rows[0].lzma_bytes > 0
    assert rows[1].file_bytes is None and rows[1].lzma_bytes is None
    assert [r.params for r in rows] == [32, 128, 16]
    assert [r.macs for r in rows] == [2 * 32, 2 * 128, 2 * 16]  # at the feeds' batch of 2
    text = bench.format_bench(rows)
    lines = text.splitlines()
    assert len(lines) == 2 + 3 and "median ms" in lines[0] and lines[2].startswith("a ")
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule aligned
    with pytest.raises(GraphoptError, match="labels"):
        bench.benchmark([path], feeds, labels=["a", "b"])
    with pytest.raises(DataError, match="'x' missing"):
        bench.benchmark([path], [{"y": feeds[0]["x"]}])


def test_benchmark_min_time_extends_rounds():
    feeds = [{"x": np.ones((1, 8), np.float32)}]
    (row,) = bench.benchmark([_relu_model(4)], feeds, warmup=0, repeats=2, min_time_s=0.05)
    assert row.runs > 2 and row.label == "model0"


def test_inspect_report():
    model = _if_model()
    report = inspect_model(model, top=2)
    assert report.ops == {"MatMul": 2, "If": 1}
    assert (report.params, report.macs, report.opset) == (40, 40, 17)
    assert [entry[1:] for entry in report.largest] == [((4, 5), "FLOAT", 80), ((4, 5), "FLOAT", 80)]
    assert report.inputs == ["x: FLOAT[N,4]", "c: BOOL[]"]
    text = format_inspect(report)
    assert "MatMul" in text and "largest tensors" in text and "w1" in text
