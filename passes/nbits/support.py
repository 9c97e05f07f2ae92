"""Which code widths the installed onnxruntime's MatMulNBits and GatherBlockQuantized kernels run: 2-bit codes
came after 4 and 8 (onnxruntime 1.23 refuses them at session creation), so 2 bits is asked of the runtime once,
with a one-layer model, instead of being assumed."""

from __future__ import annotations

import functools

import numpy as np
from onnx import TensorProto, helper, numpy_helper


@functools.lru_cache(maxsize=None)
def runs_bits(bits: int) -> bool:
    """Whether onnxruntime creates a session for a 16×1 MatMulNBits and a 1×16 GatherBlockQuantized at ``bits``."""
    import onnxruntime as ort

    per_byte = 8 // bits
    codes = numpy_helper.from_array(np.zeros((1, 1, 16 // per_byte), np.uint8), "codes")
    table = numpy_helper.from_array(np.zeros((1, 16 // per_byte), np.uint8), "table")
    scales = numpy_helper.from_array(np.ones(1, np.float32), "scales")
    table_scales = numpy_helper.from_array(np.ones((1, 1), np.float32), "table_scales")
    nodes = [helper.make_node("MatMulNBits", ["x", "codes", "scales"], ["y"], domain="com.microsoft", K=16, N=1,
                              bits=bits, block_size=16),
             helper.make_node("GatherBlockQuantized", ["table", "ids", "table_scales"], ["rows"],
                              domain="com.microsoft", bits=bits, block_size=16, gather_axis=0, quantize_axis=1)]
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16]),
                                               helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1]),
                               helper.make_tensor_value_info("rows", TensorProto.FLOAT, [1, 16])],
                              [codes, table, scales, table_scales])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=8)
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        session.run(None, {"x": np.ones((1, 16), np.float32), "ids": np.zeros(1, np.int64)})
    except Exception:  # refused: the kernels do not run this width
        return False
    return True


def unsupported(*widths: int) -> int | None:
    """The first of ``widths`` (0: none asked) the installed onnxruntime does not run, else None."""
    return next((w for w in widths if w and w != 4 and w != 8 and not runs_bits(w)), None)
