"""channel_prune on attention whose Q, K and V come from one packed projection (SVTR/ViT exports; PP-OCRv4 rec's
neck): the heads are one group of units of 3·d channels, the FFN neurons another; dead heads and neurons (every
weight that makes them zero) are removed exactly, at other batch and sequence sizes too; the Reshape targets
follow the head count whether constants or Paddle's Concat of Cast pieces; a packed tensor read by anything but
a part pick blocks the group and says why. The real model's neck is checked behind ``slow``.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from graphopt import modelio
from graphopt.costs import value_dims
from graphopt.options import build_options
from graphopt.passes.canonicalize import Canonicalize
from graphopt.passes.channels import ChannelPrune, analyze
from graphopt.passes.channels.rewrite import removals
from graphopt.passes.channels.types import const_array
from graphopt.passes.fuse import Fuse
from graphopt.weights import write_input
from tests.channels.svtr_block import D, FC1, FC2, FFN, H, HEAD, PROJ, QKV, block_feeds, svtr_block
from models.fetch import fetch_ocr_models
from tests.helpers import assert_same_outputs, clone, run_model

# Removing units whose every weight is zero changes only the summation length of the MatMuls: float32 reorderings.
EXACT = {"rtol": 1e-4, "atol": 1e-5}
FORMS = list(itertools.product(["slice", "gather", "split"], ["constant", "paddle"], ["last", "flat"]))


def _model(**kwargs) -> ir.Model:
    return ir.serde.deserialize_model(svtr_block(**kwargs))


def _group(model: ir.Model, producer: str):
    _, groups = analyze(model, value_dims(model))
    return next(g for g in groups if producer in [p.name for p in g.producers])


def _kill(model: ir.Model, producer: str, units: list[int]) -> None:
    """Zero the producer columns and bias entries of ``units``: those heads' Q, K, V (or those neurons) are zero,
    so a dead head's context is zero and a dead neuron's swish is zero — their removal changes nothing."""
    group = _group(model, producer)
    slot_removed, _ = removals([group], {group.id: np.array(units)})
    for slot, idx in slot_removed.items():
        biases = ("Add", "MultiHeadAttention")  # MultiHeadAttention: the [Q | K | V] bias fuse moved into it
        if slot.role == "producer" or (slot.role == "member" and slot.node.op_type in biases):
            array = np.array(const_array(slot.node.inputs[slot.index]))
            where = [slice(None)] * array.ndim
            where[slot.axis] = idx
            array[tuple(where)] = 0.0
            write_input(slot.node, slot.index, array)


def _prune(model: ir.Model, **raw):
    return ChannelPrune(build_options(ChannelPrune.Options, {"importance": "l1", **raw}, "channel_prune"))(model)


def _weights(model: ir.Model) -> dict[str, tuple[int, ...]]:
    return {n.name: const_array(n.inputs[1]).shape for n in model.graph if n.op_type == "MatMul"
            and const_array(n.inputs[1]) is not None}


@pytest.mark.parametrize("pick,target,softmax", FORMS)
def test_heads_are_one_group_of_packed_units(pick: str, target: str, softmax: str) -> None:
    heads = _group(_model(pick=pick, target=target, softmax=softmax), QKV)
    assert heads.prunable, heads.reasons
    assert heads.unit_sizes == [3 * HEAD] * H  # head h: its d channels in each of Q, K, V
    assert {k.slot.node.name for k in heads.links if k.slot.role == "consumer"} == {PROJ}
    assert sorted(n.name for n in heads.followers) == ["context/MatMul", "scores/MatMul"]
    ffn = _group(_model(pick=pick, target=target, softmax=softmax), FC1)
    assert ffn.prunable and ffn.size == FFN and ffn.unit_sizes is None
    assert {k.slot.node.name for k in ffn.links if k.slot.role == "consumer"} == {FC2}


@pytest.mark.parametrize("pick,target,softmax", FORMS)
def test_dead_heads_and_neurons_are_removed_exactly(pick: str, target: str, softmax: str) -> None:
    model = _model(pick=pick, target=target, softmax=softmax)
    _kill(model, QKV, [0, 2])
    _kill(model, FC1, list(range(0, FFN, 4)))
    before = clone(model)
    result = _prune(model, ratio={QKV: 2 / H, FC1: 0.25, "*": 0.0})
    onnx.checker.check_model(modelio.to_proto(model))
    assert len(result.rows) == 2
    widths = _weights(model)
    assert widths[QKV] == (D, 3 * 2 * HEAD) and widths[PROJ] == (2 * HEAD, D)
    assert widths[FC1] == (D, FFN - FFN // 4) and widths[FC2] == (FFN - FFN // 4, D)
    for batch, sequence in ((1, 9), (3, 4)):  # other batch and sequence sizes than any analysis assumed
        assert_same_outputs(before, model, block_feeds(batch, sequence, seed=sequence), **EXACT)


def test_live_heads_are_pruned_by_importance_and_still_run() -> None:
    model = _model(target="paddle")
    before = clone(model)
    _prune(model, ratio={QKV: 0.25, "*": 0.0})
    assert _weights(model)[QKV] == (D, 3 * (H - 1) * HEAD)
    feed = block_feeds(2, 5)
    a, b = run_model(before, feed)["y"], run_model(model, feed)["y"]
    assert a.shape == b.shape and np.all(np.isfinite(b)) and not np.allclose(a, b)


def test_a_packed_tensor_read_elsewhere_blocks_the_heads_and_says_why() -> None:
    proto = svtr_block()
    proto.graph.node.append(helper.make_node("ReduceSum", ["packed"], ["packed_sum"], keepdims=0))
    proto.graph.output.append(helper.make_tensor_value_info("packed_sum", onnx.TensorProto.FLOAT, None))
    heads = _group(ir.serde.deserialize_model(proto), QKV)
    assert not heads.prunable
    assert any("packs Q/K/V" in r and "ReduceSum" in r for r in heads.reasons), heads.reasons
    assert _group(ir.serde.deserialize_model(proto), FC1).prunable  # the FFN is not affected


def test_a_split_of_the_heads_axis_is_not_a_part_pick() -> None:
    """[.., 3, H, d] picked on the head axis would mix Q, K and V heads: not the packed layout."""
    proto = svtr_block(pick="gather")
    for node in proto.graph.node:
        if node.op_type == "Gather":
            node.attribute[0].i = 2  # axis 2 of [3, B, H, T, d]: a head, not a part
    heads = _group(ir.serde.deserialize_model(proto), QKV)
    assert not heads.prunable


@pytest.mark.parametrize("pick,target", [("slice", "paddle"), ("gather", "constant")])
def test_heads_of_the_fused_multiheadattention_are_removed_exactly(pick: str, target: str) -> None:
    """After fuse's packed_attention: Q, K, V are Slices of the projection into com.microsoft MultiHeadAttention
    (bias inside); its heads are still one group, the Slices' bounds, the bias and num_heads follow."""
    model = _model(pick=pick, target=target)
    Fuse(Fuse.Options(only=["packed_attention"]))(model)
    mha = next(n for n in model.graph if n.op_type == "MultiHeadAttention")
    heads = _group(model, QKV)
    assert heads.prunable and heads.unit_sizes == [3 * HEAD] * H, heads.reasons
    assert mha in heads.followers and PROJ in heads.members()
    _kill(model, QKV, [1, 3])
    before = clone(model)
    _prune(model, ratio={QKV: 0.5, "*": 0.0})
    onnx.checker.check_model(modelio.to_proto(model))
    assert mha.attributes["num_heads"].value == H - 2 and _weights(model)[QKV] == (D, 3 * (H - 2) * HEAD)
    assert const_array(mha.inputs[3]).shape == (3 * (H - 2) * HEAD,)
    for batch, sequence in ((1, 9), (3, 4)):
        assert_same_outputs(before, model, block_feeds(batch, sequence, seed=sequence), **EXACT)


def test_a_multiheadattention_reading_packed_qkv_blocks_its_channels() -> None:
    """MultiHeadAttention with no separate key and value (a packed query layout): the heads cannot be followed."""
    model = _model()
    Fuse(Fuse.Options(only=["packed_attention"]))(model)
    mha = next(n for n in model.graph if n.op_type == "MultiHeadAttention")
    mha.replace_input_with(1, None)
    mha.replace_input_with(2, None)
    heads = _group(model, QKV)
    assert not heads.prunable
    assert any("MultiHeadAttention" in r and "three tracked" in r for r in heads.reasons), heads.reasons


# --- the real model ----------------------------------------------------------------------------------------------


def _rec() -> ir.Model:
    model = modelio.load_model(fetch_ocr_models()["rec"])
    Canonicalize(build_options(Canonicalize.Options, {}, "canonicalize"))(model)
    return model


@pytest.mark.slow
def test_pp_ocrv4_rec_neck_heads_and_ffn_are_groups_and_dead_ones_go_exactly() -> None:
    """The SVTR neck of PP-OCRv4 rec (2 blocks: qkv 120 -> 360 as [0, T, 3, 8, 15], FFN 240): 8 heads of 3x15 channels
    and 240 neurons per block; dead heads and neurons are removed with the outputs unchanged."""
    model = _rec()
    neck = {"p2o.MatMul.0": ("heads", [1, 5]), "p2o.MatMul.12": ("heads", [0, 3, 7]),
            "p2o.MatMul.8": ("ffn", list(range(0, 240, 3))), "p2o.MatMul.20": ("ffn", list(range(10, 70)))}
    for producer, (kind, _) in neck.items():
        group = _group(model, producer)
        assert group.prunable, group.reasons
        assert group.unit_sizes == ([45] * 8 if kind == "heads" else None)
    for producer, (_, units) in neck.items():
        _kill(model, producer, units)
    before = clone(model)
    ratio = {p: len(u) / (8 if kind == "heads" else 240) for p, (kind, u) in neck.items()}
    _prune(model, ratio={**ratio, "*": 0.0})
    widths = _weights(model)
    assert widths["p2o.MatMul.0"] == (120, 270) and widths["p2o.MatMul.12"] == (120, 225)
    assert widths["p2o.MatMul.8"] == (120, 160) and widths["p2o.MatMul.20"] == (120, 180)
    rng = np.random.default_rng(0)
    for width in (320, 640):
        x = rng.random((1, 3, 48, width), dtype=np.float32)
        assert_same_outputs(before, model, {"x": x}, **EXACT)
