"""Shared test helpers: the one numerical check (both models in onnxruntime) and small graph builders."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

from graphopt import modelio
from graphopt.runtime import ModelLike, make_session


def _as_runnable(model: ModelLike) -> ModelLike:
    # An ir.Model is serialized at call time, so later in-place edits of it cannot leak into the check.
    return modelio.to_proto(model) if isinstance(model, ir.Model) else model


def run_model(model: ModelLike, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of one run in onnxruntime, by output name."""
    session = make_session(_as_runnable(model))
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, dict(feeds))))


def assert_same_outputs(model_a: ModelLike, model_b: ModelLike, feeds: Mapping[str, np.ndarray],
                        rtol: float = 1e-5, atol: float = 1e-6) -> float:
    """Both models give the same output names and values (|a-b| <= atol + rtol*|a|); returns the max abs diff."""
    out_a, out_b = run_model(model_a, feeds), run_model(model_b, feeds)
    assert list(out_a) == list(out_b), f"output names differ: {list(out_a)} vs {list(out_b)}"
    worst = 0.0
    for name, a in out_a.items():
        b = out_b[name]
        assert a.shape == b.shape, f"output {name!r}: shape {a.shape} vs {b.shape}"
        assert a.dtype == b.dtype, f"output {name!r}: dtype {a.dtype} vs {b.dtype}"
        if a.size:
            np.testing.assert_allclose(b, a, rtol=rtol, atol=atol, err_msg=f"output {name!r}")
            if np.issubdtype(a.dtype, np.number):
                worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))))
    return worst


def tensor_info(name: str, array_or_dtype: Any, shape: Sequence[Any] | None = None) -> onnx.ValueInfoProto:
    """A ValueInfoProto from a numpy dtype (or array) and a shape (None entries are dynamic)."""
    dtype = array_or_dtype.dtype if isinstance(array_or_dtype, np.ndarray) else np.dtype(array_or_dtype)
    if shape is None and isinstance(array_or_dtype, np.ndarray):
        shape = array_or_dtype.shape
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(dtype), shape)


def make_proto(nodes: Sequence[onnx.NodeProto], inputs: Sequence[onnx.ValueInfoProto],
               outputs: Sequence[onnx.ValueInfoProto | str], initializers: Mapping[str, np.ndarray] | None = None,
               opset: int = 13, ir_version: int | None = None,
               extra_opsets: Mapping[str, int] | None = None) -> onnx.ModelProto:
    """A ModelProto from onnx.helper nodes; outputs may be bare names (type left to inference)."""
    outs = [helper.make_empty_tensor_value_info(o) if isinstance(o, str) else o for o in outputs]
    inits = [numpy_helper.from_array(np.asarray(a), name) for name, a in (initializers or {}).items()]
    graph = helper.make_graph(list(nodes), "test", list(inputs), outs, inits)
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    proto = helper.make_model(graph, opset_imports=opsets)
    # Keep test models loadable by the installed onnxruntime whatever onnx's newest IR is.
    proto.ir_version = ir_version if ir_version is not None else min(proto.ir_version, 10)
    return proto


def make_model(nodes: Sequence[onnx.NodeProto], inputs: Sequence[onnx.ValueInfoProto],
               outputs: Sequence[onnx.ValueInfoProto | str], initializers: Mapping[str, np.ndarray] | None = None,
               opset: int = 13, **kwargs: Any) -> ir.Model:
    """An onnx_ir Model built with onnx.helper nodes (see :func:`make_proto`)."""
    return ir.serde.deserialize_model(make_proto(nodes, inputs, outputs, initializers, opset, **kwargs))


def clone(model: ir.Model) -> ir.Model:
    """An independent copy (for before/after comparisons of in-place passes)."""
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def op_types(model: ir.Model) -> list[str]:
    """Op types of every node, subgraphs included."""
    return [node.op_type for graph in [model.graph, *model.graph.subgraphs()] for node in graph]


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def randn(shape: Sequence[int], seed: int = 0, dtype: Any = np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


__all__ = ["assert_same_outputs", "clone", "make_model", "make_proto", "op_types", "randn", "rng",
           "run_model", "tensor_info"]
