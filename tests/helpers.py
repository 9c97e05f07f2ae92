"""Shared test helpers: the one numerical check (both models in onnxruntime), small graph builders, and the
models more than one test file builds. Every test imports them as ``from tests.helpers import ...``; pytest
fixtures shared by several files live in ``tests/conftest.py``."""

from __future__ import annotations

import collections
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

from graphopt import modelio
from graphopt import sensitivity as sens
from graphopt.costs import value_dims
from graphopt.passes.canonicalize import Canonicalize
from graphopt.passes.channels import analyze
from graphopt.runtime import ModelLike, make_session

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "models" / "digits"  # the bundled digits model: digits.onnx, calib.npz, test.npz


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


def optimized_ops(model: ir.Model) -> collections.Counter:
    """Op types in the graph onnxruntime actually runs (its optimized_model_filepath)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "opt.onnx")
        make_session(modelio.to_proto(model), optimized_path=path)
        return collections.Counter(n.op_type for n in onnx.load(path).graph.node)


# --- quantize: two convs, one int8 region or two ---------------------------------------------------------------


def two_convs(separated: bool, rng: np.random.Generator) -> tuple[onnx.ModelProto, list[dict]]:
    """x → conv1 → Relu → [Sigmoid] → conv2 → Relu → Sigmoid → y, and three calibration feeds (weights and feeds
    drawn from ``rng``); with ``separated`` the Sigmoid between them (a float op) makes two int8 regions."""
    def w(*shape: int) -> np.ndarray:
        return (rng.normal(size=shape) * 0.3).astype(np.float32)

    mid = [helper.make_node("Sigmoid", ["r1"], ["s1"], name="sig1")] if separated else []
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"), *mid,
             helper.make_node("Conv", ["s1" if separated else "r1", "W2", "B2"], ["c2"], name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"), helper.make_node("Sigmoid", ["r2"], ["y"])]
    inits = {"W1": w(8, 4, 3, 3), "B1": w(8), "W2": w(8, 8, 1, 1), "B2": w(8)}
    proto = make_proto(nodes, [tensor_info("x", np.float32, ["N", 4, 8, 8])], [tensor_info("y", np.float32, None)],
                       inits)
    feeds = [{"x": rng.normal(size=(2, 4, 8, 8)).astype(np.float32)} for _ in range(3)]
    return proto, feeds


def is_int8(model: ir.Model, name: str) -> bool:
    """Whether node ``name``'s weight is int8 (it sits behind a DequantizeLinear)."""
    node = next(n for n in model.graph if n.name == name)
    producer = node.inputs[1].producer()
    return producer is not None and producer.op_type == "DequantizeLinear"


class FakeAccuracy:
    """graphopt.sensitivity's measure / measure_combination, monkeypatched for quantize's accuracy budget: the drop
    is the sum of ``drops`` of the ops int8 in the clone (no data is run), plus ``emitted_penalty`` when the model
    handed in is already quantized (the pass checking the model it emitted, which can score worse than the
    budget's checks saw). ``stressed``: per op, the drop with the output error stressed (default: its drop),
    summed likewise. Records the int8 sets of each combination, single and emitted-model check."""

    def __init__(self, drops: dict[str, float], emitted_penalty: float = 0.0,
                 stressed: dict[str, float] | None = None):
        self.drops, self.emitted_penalty = drops, emitted_penalty
        self.stressed = {**drops, **(stressed or {})}
        self.combinations, self.singles, self.emitted_checks = [], [], []

    def _row(self, model: ir.Model, fns, key: str = "combination"):
        emitted = any(is_int8(model, n) for n in self.drops)
        clone = model.clone()
        for fn in fns:
            fn(clone)
        int8 = frozenset(n for n in self.drops if is_int8(clone, n))
        penalty = self.emitted_penalty if emitted else 0.0
        drop = sum(self.drops[n] for n in int8) + penalty
        stressed = sum(self.stressed[n] for n in int8) + penalty
        if emitted:
            self.emitted_checks.append(int8)
        return sens.SensitivityRow(key, key, "int8", drop, 40.0, 1.0 - drop, 0.0, stressed_drop=stressed), int8

    def measure(self, context, model, candidates, max_samples=64, time_budget_s=None):
        rows = []
        for c in candidates:
            row, int8 = self._row(model, [c.apply], c.key)
            self.singles.append(int8)
            rows.append(row)
        return sens.SensitivityTable(rows)

    def measure_combination(self, context, model, fns, max_samples=64):
        row, int8 = self._row(model, fns)
        self.combinations.append(int8)
        return row

# --- cleanup: a model onnxsim simplifies -------------------------------------------------------------------------

ONNXSIM_FEEDS = {"x": randn((2, 8), 42)}  # feeds of onnxsim_friendly_model (and of test_cleanup's models)


def onnxsim_friendly_model() -> ir.Model:
    """Shape → Gather → Unsqueeze → Concat → Reshape (onnxsim folds the shape arithmetic away), canonicalized;
    x: (2, 8), metadata ``author=tests``."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Shape", ["r"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["r", "shape"], ["y"], name="reshape"),
    ]
    inits = {"zero": np.array(0, np.int64), "axes": np.array([0], np.int64), "minus1": np.array([-1], np.int64)}
    model = make_model(nodes, [tensor_info("x", np.float32, [2, 8])], [tensor_info("y", np.float32, [2, 8])], inits)
    model.metadata_props["author"] = "tests"
    Canonicalize()(model)
    return model


# --- channel pruning: a ShuffleNet unit (grouped convs, channel shuffle) -------------------------------------------

GROUPED_X = tensor_info("x", np.float32, [2, 8, 6, 6])
GROUPED_FEED = {"x": randn([2, 8, 6, 6], 42)}


def channel_shuffle(x: str, out: str, g: int, c: int, inits: dict, tag: str) -> list[onnx.NodeProto]:
    """Reshape (N, g, c/g, 6, 6) → Transpose → Reshape (N, c, 6, 6); adds its shape constants to ``inits``."""
    inits[f"{tag}_s5"] = np.array([0, g, c // g, 6, 6], np.int64)  # 0: copy N
    inits[f"{tag}_s4"] = np.array([0, c, 6, 6], np.int64)
    return [helper.make_node("Reshape", [x, f"{tag}_s5"], [f"{tag}_r"], name=f"{tag}_r1"),
            helper.make_node("Transpose", [f"{tag}_r"], [f"{tag}_t"], perm=[0, 2, 1, 3, 4]),
            helper.make_node("Reshape", [f"{tag}_t", f"{tag}_s4"], [out], name=f"{tag}_r2")]


def shufflenet_unit(g: int = 4, mid: int = 40, bias: bool = True) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """gconv1 (8 -> mid, group g) -> Relu -> shuffle -> depthwise 3x3 -> gconv2 (mid -> 8, group g) -> y
    (input :data:`GROUPED_X`); returns the model and its initializers."""
    inits = {"g1_w": randn([mid, 8 // g, 1, 1], 1), "dw_w": randn([mid, 1, 3, 3], 2),
             "g2_w": randn([8, mid // g, 1, 1], 3)}
    if bias:
        inits["g1_b"] = randn([mid], 4)
    g1_in = ["x", "g1_w"] + (["g1_b"] if bias else [])
    nodes = [helper.make_node("Conv", g1_in, ["a"], name="g1", group=g),
             helper.make_node("Relu", ["a"], ["ra"]), *channel_shuffle("ra", "s", g, mid, inits, "sh"),
             helper.make_node("Conv", ["s", "dw_w"], ["d"], name="dw", group=mid, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["d", "g2_w"], ["y"], name="g2", group=g)]
    y = tensor_info("y", np.float32, [None, None, None, None])
    return make_model(nodes, [GROUPED_X], [y], inits), inits


def group_of(model: ir.Model, producer: str):
    """The channel-pruning dependency group whose producers include the node ``producer``."""
    _, groups = analyze(model, value_dims(model))
    return next(g for g in groups if producer in [p.name for p in g.producers])


def unit_rows(group, node: str, units: list[int]) -> list[int]:
    """Output channels of ``node`` (its producer weight rows) that belong to the given units."""
    rows = set()
    for k in group.links:
        if k.slot.node.name == node and k.slot.role == "producer" and k.slot.index == 1:
            rows.update(k.offset + u - k.start for u in units if k.start <= u < k.start + k.length)
    return sorted(rows)


__all__ = ["DIGITS", "GROUPED_FEED", "GROUPED_X", "ONNXSIM_FEEDS", "REPO", "assert_same_outputs",
           "channel_shuffle", "clone", "group_of", "is_int8", "make_model", "make_proto", "onnxsim_friendly_model",
           "op_types", "optimized_ops", "randn", "rng", "run_model", "shufflenet_unit", "tensor_info", "two_convs",
           "unit_rows"]
