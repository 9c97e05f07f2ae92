"""channel_prune on the torch exports of models/encoders (BERT, DistilBERT, RoBERTa, ViT, Whisper encoder).

These are torch.onnx.export (dynamo) graphs: split targets [N, T, -1, d] built from Shape ops and shared by
every layer, constant targets [-1, T, H, d] (ViT, Whisper), Kᵀ folded through [N·H, T, d], SDPA's IsNaN/Where
after Softmax, biases deduplicated across layers. Heads and FFN neurons must be found in every one, dead units
removed exactly, and the MACs of every layer must fall by exactly its group's removed share.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from graphopt import modelio
from graphopt.costs import layer_costs, value_dims
from graphopt.options import build_options
from graphopt.passes.canonicalize import Canonicalize
from graphopt.passes.channels import ChannelPrune, analyze
from graphopt.passes.channels.types import const_array
from tests.channels.test_transformers import zero_units
from tests.helpers import REPO, assert_same_outputs, clone, run_model

ENCODERS = REPO / "models" / "encoders"
NAMES = ["bert", "distilbert", "roberta", "vit", "whisper_encoder"]
LAYERS, HEADS, HEAD, FFN = 2, 4, 16, 128  # models/encoders/export.py
EXACT = {"rtol": 1e-4, "atol": 2e-5}  # summation order of shorter MatMuls, through LayerNorm (outputs ~1)


def _load(name: str):
    path = ENCODERS / f"{name}.onnx"
    if not path.exists():
        pytest.skip(f"{path} not exported")
    model = modelio.load_model(path)
    Canonicalize()(model)
    arrays = dict(np.load(path.with_suffix(".npz")))
    feeds = {v.name: arrays[v.name][:4] for v in model.graph.inputs}
    return model, feeds


def _other_shape(name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """The same rows at a shorter sequence (text models: their sequence axis is dynamic)."""
    if name in ("vit", "whisper_encoder"):
        return None
    return {k: v[:3, :9] for k, v in feeds.items()}


def _groups(model):
    return analyze(model, value_dims(model))[1]


def _heads_and_ffn(model):
    groups = [g for g in _groups(model) if g.prunable]
    heads = [g for g in groups if g.unit_sizes == [HEAD] * HEADS]
    ffn = [g for g in groups if g.unit_sizes is None and g.size == FFN]
    return heads, ffn


@pytest.mark.parametrize("name", NAMES)
def test_every_layer_has_a_head_group_and_an_ffn_group(name: str) -> None:
    model, _ = _load(name)
    heads, ffn = _heads_and_ffn(model)
    assert len(heads) == LAYERS and len(ffn) == LAYERS
    for g in heads:
        assert len(g.producers) == 3 and len(g.followers) == 2  # Q, K, V; the two score MatMuls
        assert len({k.slot.node.name for k in g.links if k.slot.role == "consumer"}) == 1  # the output projection


@pytest.mark.parametrize("name", NAMES)
def test_dead_heads_and_neurons_are_removed_exactly(name: str) -> None:
    model, feeds = _load(name)
    heads, ffn = _heads_and_ffn(model)
    ratio = {}
    for i, g in enumerate(heads):
        zero_units(g, [i + 1])
        ratio[g.producers[0].name] = 1 / HEADS
    for g in ffn:
        zero_units(g, list(range(0, FFN, 4)))
        ratio[g.producers[0].name] = 0.25
    before = clone(model)
    shapes = {k: v.shape for k, v in feeds.items()}
    costs_before = {c.node: c.macs for c in layer_costs(before, shapes)}
    opts = build_options(ChannelPrune.Options, {"importance": "l1", "ratio": ratio}, "channel_prune")
    result = ChannelPrune(opts)(model)
    onnx.checker.check_model(modelio.to_proto(model))
    assert len(result.rows) == 2 * LAYERS
    for feed in filter(None, (feeds, _other_shape(name, feeds))):
        assert_same_outputs(before, model, feed, **EXACT)
    # every member's MACs (projections, score MatMuls, FFN MatMuls) shrink by exactly its group's share
    expected = dict(costs_before)
    for row in result.rows:
        keep = row["channels_after"] / row["channels_before"]
        for member in row["members"]:
            expected[member] = round(costs_before.get(member, 0) * keep)
    after = {c.node: c.macs for c in layer_costs(model, shapes)}
    assert sum(costs_before.values()) > 0
    assert {k: after.get(k, 0) for k in expected} == expected


@pytest.mark.parametrize("name", NAMES)
def test_half_the_heads_and_neurons_pruned_still_run(name: str) -> None:
    model, feeds = _load(name)
    before = clone(model)
    opts = build_options(ChannelPrune.Options, {"importance": "l2", "ratio": 0.5}, "channel_prune")
    ChannelPrune(opts)(model)
    heads = [n for n in model.graph if n.op_type == "MatMul" and const_array(n.inputs[1]) is not None]
    assert sum(const_array(n.inputs[1]).shape[1] == HEADS * HEAD // 2 for n in heads) >= 3 * LAYERS
    for feed in filter(None, (feeds, _other_shape(name, feeds))):
        ref, out = run_model(before, feed), run_model(model, feed)
        assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in ref.items()}
        assert all(np.all(np.isfinite(v)) for v in out.values())

