"""fuse on attention whose Q, K and V are columns of one packed projection (tests/channels/svtr_block.py: SVTR/ViT
exports, PP-OCRv4 rec's neck). Family ``packed_attention`` writes MultiHeadAttention over Slices of the projection,
checked against the unfused block in onnxruntime for every pick form, Reshape-target form (Paddle's leaves ONNX
without ranks) and Softmax spelling; the default families leave it (measured slower) and say why, per site."""

from __future__ import annotations

import itertools
import math

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt import modelio
from graphopt.options import build_options
from graphopt.passes.canonicalize import Canonicalize
from graphopt.passes.fuse import Fuse
from models.fetch import fetch_ocr_models
from tests.channels.svtr_block import H, HEAD, block_feeds, svtr_block
from tests.helpers import assert_same_outputs, clone, run_model

FORMS = list(itertools.product(["slice", "gather", "split"], ["constant", "paddle"], ["last", "flat"]))


def _ops(model: ir.Model) -> list[str]:
    return sorted(f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in model.graph)


@pytest.mark.parametrize("pick,target,softmax", FORMS)
def test_packed_attention_becomes_multiheadattention(pick: str, target: str, softmax: str) -> None:
    """Outputs are the block's (|y| ~ 1-3, sums of 6-40 float32 terms reordered by the fused kernel): 1e-5
    absolute and relative; a wrong part, head order or scale moves them by ~0.1."""
    model = ir.serde.deserialize_model(svtr_block(pick=pick, target=target, softmax=softmax))
    before = clone(model)
    result = Fuse(Fuse.Options(only=["packed_attention"]))(model)
    assert [r["family"] for r in result.rows] == ["packed_attention"] and not result.notes
    fused = _ops(model)
    assert fused.count("com.microsoft.MultiHeadAttention") == 1
    assert "Softmax" not in fused and "Squeeze" not in fused and "Gather" not in fused and "Split" not in fused
    mha = next(n for n in model.graph if n.op_type == "MultiHeadAttention")
    assert [v.producer().op_type for v in mha.inputs[:3]] == ["Slice"] * 3  # Q, K, V: columns of the projection
    assert mha.attributes["num_heads"].value == H
    assert mha.attributes["scale"].value == pytest.approx(1 / math.sqrt(HEAD), rel=1e-6)
    assert len(mha.inputs) == 4 and mha.inputs[3] is not None  # the projection's bias went into the op
    for batch, sequence in ((1, 9), (3, 4)):
        feeds = block_feeds(batch, sequence, seed=sequence)
        assert_same_outputs(before, model, feeds, rtol=1e-5, atol=1e-5)
        assert np.isfinite(run_model(model, feeds)["y"]).all()


@pytest.mark.parametrize("target", ["constant", "paddle"])
def test_default_families_leave_packed_attention_and_say_why(target: str) -> None:
    model = ir.serde.deserialize_model(svtr_block(target=target))
    unknown = {v.name for n in model.graph for v in n.outputs if v.shape is None}
    before = clone(model)
    result = Fuse(Fuse.Options())(model)
    assert not any(r["family"].endswith("attention") for r in result.rows)
    assert "com.microsoft.MultiHeadAttention" not in _ops(model)
    assert any(n.startswith("attention: 1 near-miss") and "packed projection" in n for n in result.notes), result.notes
    # the ranks given to the values ONNX left without a shape were for matching only
    assert {v.name for n in model.graph for v in n.outputs if v.shape is None} == unknown
    assert_same_outputs(before, model, block_feeds(2, 5), rtol=1e-5, atol=1e-5)


def test_a_part_read_twice_is_a_near_miss_with_its_reason() -> None:
    """Q picked twice (Q·Kᵀ and an extra output): the match would hide a value read outside it."""
    proto = svtr_block(pick="gather")
    proto.graph.output.append(helper.make_tensor_value_info("q4", TensorProto.FLOAT, [None, H, None, HEAD]))
    model = ir.serde.deserialize_model(proto)
    result = Fuse(Fuse.Options(only=["packed_attention"]))(model)
    assert not result.rows
    assert any(n.startswith("packed_attention: 1 near-miss") and "used outside" in n for n in result.notes), \
        result.notes


@pytest.mark.slow
def test_pp_ocrv4_rec_neck_is_fused_exactly_by_packed_attention_only() -> None:
    """The real neck (2 blocks, 8 heads of 15, opset 12 upgraded: the Flatten/Softmax/Reshape spelling, no ranks
    from ONNX): a near-miss with its reason for the defaults, two MultiHeadAttention for packed_attention, the
    output probabilities within 1e-5."""
    model = modelio.load_model(fetch_ocr_models()["rec"])
    Canonicalize(build_options(Canonicalize.Options, {}, "canonicalize"))(model)
    defaults = clone(model)
    result = Fuse(Fuse.Options())(defaults)
    assert any(n.startswith("attention: 2 near-misses") and "packed projection" in n for n in result.notes)
    before = clone(model)
    result = Fuse(Fuse.Options(only=["packed_attention"]))(model)
    assert [r["family"] for r in result.rows] == ["packed_attention"] * 2
    rng = np.random.default_rng(0)
    for width in (320, 640):
        assert_same_outputs(before, model, {"x": rng.random((1, 3, 48, width), dtype=np.float32)}, rtol=1e-5,
                            atol=1e-5)
