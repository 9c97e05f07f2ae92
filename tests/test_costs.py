"""MACs on transformer encoders: counted by hand, and against the shapes onnxruntime actually computes.

The encoders compute their shapes at run time (positions sliced by Shape(start, end), masks from Shape/Expand/Where,
head reshapes from Shape/Slice/Concat); graphopt.shapes folds that arithmetic so inference reaches every MatMul,
the attention products between two activations included.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt import costs, modelio
from graphopt.capture import Runner
from graphopt.data import Dataset
from graphopt.passbase import PassContext
from graphopt.recipe import registry
from tests.encoder_graphs import EncoderConfig, bert_encoder, encoder_feeds, encoder_macs
from tests.helpers import REPO, make_model

CFG = EncoderConfig()
FIXTURES = sorted((REPO / "models" / "encoders").glob("*.onnx"))


def encoder() -> ir.Model:
    return ir.serde.deserialize_model(bert_encoder(CFG))


@pytest.mark.parametrize("batch, sequence", [(1, 12), (2, 7), (1, 1)])
def test_encoder_macs_match_a_hand_count(batch, sequence):
    # Batch 1 is what the pipeline counts at, and where ONNX inference alone loses the batch dim (the position
    # Gather is [?, ?, D] until its Slice is folded): the count was 0 there.
    shapes = {"input_ids": (batch, sequence), "attention_mask": (batch, sequence)}
    layers = costs.layer_costs(encoder(), shapes)
    assert not [c.node for c in layers if c.note]
    assert sum(c.macs for c in layers) == encoder_macs(CFG, batch, sequence)
    scores = [c for c in layers if c.node.endswith("attention/self/MatMul")]  # Q·Kᵀ: activations on both sides
    assert len(scores) == CFG.layers and all(c.params == 0 for c in scores)
    assert all(c.macs == batch * sequence * sequence * CFG.hidden for c in scores)


def _runtime_macs(model: ir.Model, feed: dict[str, np.ndarray]) -> dict[str, int]:
    """MACs of every MatMul/Gemm/Conv from the shapes onnxruntime computes on ``feed`` (an independent count)."""
    nodes = [n for n in model.graph if n.op_type in ("MatMul", "Gemm", "Conv")]
    names = [v.name for n in nodes for v in (n.inputs[0], n.inputs[1], n.outputs[0])]
    got = Runner(model, names, threads=1)(feed)
    macs = {}
    for n in nodes:
        a, w, out = (got[v.name].shape for v in (n.inputs[0], n.inputs[1], n.outputs[0]))
        if n.op_type == "Conv":
            macs[n.name] = math.prod(out) * math.prod(w[1:])
        else:
            trans_a = n.attributes.get("transA")
            k = a[-2] if trans_a is not None and trans_a.as_int() else a[-1]
            macs[n.name] = math.prod(out) * k
    return macs


@pytest.mark.parametrize("path", [None, *FIXTURES], ids=lambda p: "builder" if p is None else Path(p).stem)
def test_macs_equal_those_at_onnxruntime_shapes(path):
    """Every layer's MACs from inferred shapes equal those from the shapes onnxruntime computes, on the helper's
    encoder and on the torch exports in models/encoders (when present)."""
    if path is None:
        model, feed = encoder(), encoder_feeds(CFG, batch=1, sequence=9)[0]
    else:
        model = modelio.load_model(path)
        data = np.load(path.with_suffix(".npz"))
        inputs = {v.name for v in model.graph.inputs}
        feed = {k: data[k][:1] for k in data.files if k in inputs}
    runtime = _runtime_macs(model, feed)
    counted = {c.node: c.macs for c in costs.layer_costs(model, {k: v.shape for k, v in feed.items()})}
    assert runtime and {k: counted.get(k) for k in runtime} == runtime


def test_input_shapes_resolved_from_given_shapes_data_or_a_stated_default():
    model = encoder()
    shapes, defaulted = costs.resolve_input_shapes(model)
    assert shapes == {"input_ids": (1, costs.DEFAULT_DIM), "attention_mask": (1, costs.DEFAULT_DIM)}
    assert defaulted == {"sequence": costs.DEFAULT_DIM}
    # One given shape binds the symbol for the other input; data gives the sequence, never the batch.
    shapes, defaulted = costs.resolve_input_shapes(model, {"input_ids": (1, 20)})
    assert shapes == {"input_ids": (1, 20), "attention_mask": (1, 20)} and defaulted == {}
    feed = encoder_feeds(CFG, batch=3, sequence=9)[0]
    shapes, defaulted = costs.resolve_input_shapes(model, feed=feed)
    assert shapes == {"input_ids": (1, 9), "attention_mask": (1, 9)} and defaulted == {}
    assert costs.count_macs(model, shapes) == encoder_macs(CFG, 1, 9)


def _single(op: str, inputs: list, output_dims: list, attrs: dict, inits: dict, domain: str = "",
            opset: int = 17) -> ir.Model:
    node = helper.make_node(op, [i[0] for i in inputs] + list(inits), ["y"], domain=domain, **attrs)
    extra = {"com.microsoft": 1} if domain else None
    return make_model([node], [helper.make_tensor_value_info(n, TensorProto.FLOAT, d) for n, d in inputs],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_dims)], inits, opset=opset,
                      extra_opsets=extra)


@pytest.mark.parametrize("equation, a, b, expected", [
    ("bhqd,bhkd->bhqk", [2, 3, 5, 4], [2, 3, 6, 4], 2 * 3 * 5 * 6 * 4),  # attention scores: d contracted
    ("...qd,...kd->...qk", [2, 3, 5, 4], [2, 3, 6, 4], 2 * 3 * 5 * 6 * 4),
    ("ij,jk", [5, 4], [4, 3], 5 * 3 * 4),  # implicit output ik
    ("bi,bi->b", [5, 4], [5, 4], 5 * 4),
])
def test_einsum_macs(equation, a, b, expected):
    model = _single("Einsum", [("a", a), ("b", b)], None, {"equation": equation}, {})
    (cost,) = costs.layer_costs(model)
    assert cost.macs == expected and cost.params == 0


def test_fused_attention_macs():
    # com.microsoft Attention: x [1, 5, 8] · W [8, 24] (Q, K, V of 8 each), then Q·Kᵀ and scores·V: 5·5·(8 + 8).
    rng = np.random.default_rng(0)
    weights = {"w": rng.standard_normal((8, 24)).astype(np.float32), "bias": np.zeros(24, np.float32)}
    model = _single("Attention", [("x", [1, 5, 8])], [1, 5, 8], {"num_heads": 2}, weights, domain="com.microsoft")
    (cost,) = costs.layer_costs(model)
    assert cost.macs == 5 * 8 * 24 + 5 * 5 * (8 + 8) and cost.params == 8 * 24 + 24
    # MultiHeadAttention of given Q [1, 5, 8], K and V [1, 7, 8]: 5·7·8 for the scores, as many for the context.
    model = _single("MultiHeadAttention", [("q", [1, 5, 8]), ("k", [1, 7, 8]), ("v", [1, 7, 8])], [1, 5, 8],
                    {"num_heads": 2}, {}, domain="com.microsoft")
    assert costs.count_macs(model) == 5 * 7 * (8 + 8)


def test_macs_budgets_see_the_encoder_matmuls():
    """lowrank's global MACs budget and channel_prune's MACs rows count the encoder's MatMuls at the calibration
    feed's batch × sequence (they counted nothing, or one row per layer, before)."""
    feeds = encoder_feeds(CFG, batch=2, sequence=10, count=2)
    rows_per_feed = 2 * 10
    lowrank = registry()["lowrank"]
    model = encoder()
    weights = {n.name: n.inputs[1].const_value.shape.numpy() for n in model.graph if n.op_type == "MatMul"
               and n.inputs[1].const_value is not None}
    result = lowrank(lowrank.Options(macs=0.5, min_size=0), PassContext(calib=Dataset(feeds=feeds)))(model)
    assert result.rows
    for row in result.rows:
        assert row["macs_before"] == rows_per_feed * math.prod(weights[row["layer"]])
    prune = registry()["channel_prune"]
    result = prune(prune.Options(ratio=0.25), PassContext(calib=Dataset(feeds=feeds)))(encoder())
    ffn = [row for row in result.rows if any("intermediate/dense/MatMul" in m for m in row["members"])]
    assert ffn, result.notes
    for row in ffn:  # the FFN group: its two MatMuls, hidden x ffn each, at 2 x 10 tokens
        assert row["macs_before"] == 2 * rows_per_feed * CFG.hidden * CFG.ffn
