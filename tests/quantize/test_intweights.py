"""int8 weights: pair-safe quantization in blocks of rows gives the same integers and scales as in one go, and
inside one quantize run each weight is quantized once however many candidate models are built."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from graphopt import data as datamod
from graphopt import modelio, saturation
from graphopt.passbase import PassContext
from graphopt.passes.quantize import Quantize, QuantizeOptions, intweights
from tests.helpers import make_proto, randn, tensor_info


@pytest.mark.parametrize("shape,axis,order", [((64, 40), 0, saturation.KernelOrder("Gemm", trans_b=True)),
                                              ((40, 64), 1, saturation.KernelOrder("MatMul")),
                                              ((16, 6, 3, 3), 0, saturation.KernelOrder("Conv"))])
def test_blocks_of_rows_give_the_same_weights(shape, axis, order, monkeypatch):
    # Gaussian weights: most channels have a pair over the int16 limit, so the search runs on nearly every row.
    w = randn(shape, 5)
    whole = intweights.quantize_weight_safe(w, axis, order)
    assert whole[2] > shape[axis] // 2
    monkeypatch.setattr(intweights, "BLOCK_ELEMENTS", 7 * w.size // shape[axis])  # 7 rows a block, a short last one
    blocks = intweights.quantize_weight_safe(w, axis, order)
    np.testing.assert_array_equal(blocks[0], whole[0])
    np.testing.assert_array_equal(blocks[1], whole[1])
    assert blocks[2] == whole[2]
    assert not saturation.overflow_rows(order.rows(blocks[0])).any()


def test_each_weight_is_quantized_once_per_run(monkeypatch):
    """The accuracy budget, its sensitivity screen and the emitted model all quantize the same two weights."""
    calls = []
    real = saturation.safe_quantize
    monkeypatch.setattr(saturation, "safe_quantize", lambda rows, scale: calls.append(rows.shape) or real(rows, scale))
    inits = {"w0": randn((16, 16), 1) * 0.3, "b0": randn((16,), 2) * 0.1, "w1": randn((16, 16), 3) * 0.3}
    nodes = [helper.make_node("Gemm", ["x", "w0", "b0"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w1"], ["y"])]
    proto = make_proto(nodes, [tensor_info("x", np.float32, ["N", 16])], [tensor_info("y", np.float32, ["N", 16])],
                       inits)
    model = ir.serde.deserialize_model(proto)
    data = datamod.load_data([{"x": randn((8, 16), s)} for s in range(4)], datamod.input_specs(model))
    # max_drop 0 on the snr metric with a 60 dB floor: the budget fails, so single ops are measured too.
    context = PassContext(calib=data, teacher=model.clone(), metric="snr", max_drop=0.0)
    result = Quantize(QuantizeOptions(target="size", min_snr_db=60.0), context)(model)
    assert any(r.get("action") == "sensitivity" for r in result.rows)  # candidates were built and measured
    assert len(calls) == 2


def test_weights_in_an_external_file_are_unmapped_once_quantized(tmp_path):
    """A weight read from its model's data file is quantized as the same weight in memory is, and the file's map
    is closed afterwards (its pages would stay in the resident set: a 2.4 GB model's weights)."""
    inits = {"w": randn((32, 16), 1) * 0.3, "b": randn((32,), 2) * 0.1}
    proto = make_proto([helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)],
                       [tensor_info("x", np.float32, ["N", 16])], [tensor_info("y", np.float32, ["N", 32])], inits)
    external = onnx.ModelProto.FromString(proto.SerializeToString())  # saving converts the proto it is given
    onnx.save(external, tmp_path / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx.data", size_threshold=0)
    feeds = [{"x": randn((8, 16), s)} for s in range(2)]
    quantized = []
    for model in (modelio.load_model(tmp_path / "m.onnx"), ir.serde.deserialize_model(proto)):
        weight = model.graph.initializers["w"].const_value
        data = datamod.load_data(feeds, datamod.input_specs(model))
        Quantize(QuantizeOptions(target="size"), PassContext(calib=data))(model)
        quantized.append(model.graph.initializers["w_quantized"].const_value.numpy())
        if isinstance(weight, ir.ExternalTensor):
            assert weight.raw is None  # the map is closed; a later read maps the file again
            np.testing.assert_array_equal(weight.numpy(), inits["w"])
    np.testing.assert_array_equal(quantized[0], quantized[1])
