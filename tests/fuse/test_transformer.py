"""fuse's transformer families on BERT-like blocks spelled as torch exports them (tests/fuse/blocks.py):
attention → MultiHeadAttention, Add + LayerNormalization → SkipLayerNormalization, bias + GELU → BiasGelu/FastGelu,
each checked against the unfused block in onnxruntime, padded and fully masked rows included."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

from graphopt import modelio
from graphopt.graphs import infer_shapes
from graphopt.passes.canonicalize import Canonicalize
from graphopt.passes.fuse import Fuse
from tests.fuse.blocks import HEADS, SIZE, encoder_block
from tests.helpers import REPO, assert_same_outputs, clone, make_model, randn, run_model, tensor_info

TRANSFORMER = ["bias_gelu", "gelu", "skip_layernorm", "attention"]


def fuse_block(model, feeds, families=TRANSFORMER):
    """Fuse (``families`` None: the defaults), then compare with the unfused block. Outputs are LayerNorm'd
    (|y| ~ 3): fused kernels reorder float32 sums of 16-64 terms and LayerNorm divides by a deviation near 1, so
    differences stay near 1e-6; 1e-5 absolute and relative leaves margin and still catches a wrong scale, mask or
    head order (those move outputs by ~0.1)."""
    before = clone(model)
    result = Fuse(Fuse.Options(only=families or []))(model)
    assert_same_outputs(before, model, feeds, rtol=1e-5, atol=1e-5)
    assert all(np.isfinite(v).all() for v in run_model(model, feeds).values())
    return result


def ops(model) -> list[str]:
    return sorted(f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in model.graph)


@pytest.mark.parametrize("style,gelu", [("sdpa", "BiasGelu"), ("eager", "FastGelu"), ("prenorm", "BiasGelu"),
                                        ("dynamo", "BiasGelu")])
def test_encoder_block_fuses_every_family(style: str, gelu: str) -> None:
    model, feeds = encoder_block(style)
    result = fuse_block(model, feeds)
    families = sorted(r["family"] for r in result.rows)
    skips = 1 if style == "prenorm" else 2
    assert families == sorted(["attention", "bias_gelu"] + ["skip_layernorm"] * skips) and not result.notes
    fused = ops(model)
    assert fused.count("com.microsoft.MultiHeadAttention") == 1 and f"com.microsoft.{gelu}" in fused
    assert "Softmax" not in fused and "Transpose" not in fused and "Erf" not in fused and "Tanh" not in fused
    mha = next(n for n in model.graph if n.op_type == "MultiHeadAttention")
    assert mha.attributes["num_heads"].value == HEADS  # read from the head split's target
    assert mha.attributes["scale"].value == pytest.approx(1 / math.sqrt(SIZE), rel=1e-6)
    assert model.opset_imports["com.microsoft"] == 1


@pytest.mark.parametrize("known", [True, False])
def test_sdpa_mask_and_nan_guard(known: bool) -> None:
    """The SDPA export's -inf mask goes in as attention_bias: as it is when inference proved it [b, 1, s, s], else
    expanded to [.., .., s, t] (what a real torch export's Where gets: four unnamed dims). Its NaN guard is kept:
    the fully masked row (feeds row 2) is zero attention in both, not NaN."""
    model, feeds = encoder_block("sdpa")
    where = next(n for n in model.graph if n.op_type == "Where")
    if not known:
        where.outputs[0].shape = ir.Shape([None] * 4)
    fuse_block(model, feeds, ["attention"])
    mha = next(n for n in model.graph if n.op_type == "MultiHeadAttention")
    assert mha.inputs[5].producer().op_type == ("Where" if known else "Expand")
    assert [u.node.op_type for u in mha.outputs[0].uses()] == ["IsNaN", "Where"]
    assert mha.inputs[3] is not None and mha.inputs[3].const_value.shape == (3 * HEADS * SIZE,)  # q, k, v biases


def test_prenorm_sum_read_after_its_layernorm() -> None:
    """Pre-norm: the residual sum feeds the LayerNorm and the next residual; SkipLayerNormalization's fourth
    output replaces it."""
    model, feeds = encoder_block("prenorm")
    fuse_block(model, feeds, ["skip_layernorm"])
    skip = next(n for n in model.graph if n.op_type == "SkipLayerNormalization")
    assert len(skip.outputs) == 4 and skip.outputs[3].uses() and not skip.outputs[1].uses()


def test_scale_after_mask_is_a_near_miss() -> None:
    model, feeds = encoder_block("sdpa", scale_last=True)
    result = fuse_block(model, feeds, ["attention"])
    assert not result.rows
    assert result.notes == ["attention: 1 near-miss left unfused: 1 'the scores come from Add, not from Q·Kᵀ'"]


def test_skip_of_another_shape_is_a_near_miss() -> None:
    """word + position embeddings ([b, s, h] + [1, s, h]) broadcast: SkipLayerNormalization would not."""
    nodes = [helper.make_node("Add", ["x", "pos"], ["s"]),
             helper.make_node("LayerNormalization", ["s", "g", "b"], ["y"], axis=-1)]
    x, pos = tensor_info("x", np.float32, ["batch", 4, 8]), tensor_info("pos", np.float32, [1, 4, 8])
    model = make_model(nodes, [x, pos], ["y"], initializers={"g": randn([8], seed=1), "b": randn([8], seed=2)},
                       opset=17)
    infer_shapes(model)
    result = fuse_block(model, {"x": randn([2, 4, 8], seed=3), "pos": randn([1, 4, 8], seed=4)}, ["skip_layernorm"])
    assert not result.rows and result.notes == [
        "skip_layernorm: 1 near-miss left unfused: 1 'input and skip shapes are not provably equal: "
        "['batch', 4, 8] vs [1, 4, 8]'"]


def test_defaults_fuse_attention_and_bias_gelu_but_not_skip_layernorm() -> None:
    """The families measured faster on encoders run by default; SkipLayerNormalization (slower there) does not."""
    model, feeds = encoder_block("sdpa")
    result = fuse_block(model, feeds, None)
    assert sorted(r["family"] for r in result.rows) == ["attention", "bias_gelu"]
    assert "LayerNormalization" in ops(model) and "com.microsoft.SkipLayerNormalization" not in ops(model)


FIXTURES = sorted((REPO / "models" / "encoders").glob("*.onnx"))


@pytest.mark.skipif(not FIXTURES, reason="the encoder fixtures (models/encoders) are not exported")
@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_fixture_encoders_fuse_every_attention(path) -> None:
    """torch exports of BERT, DistilBERT, RoBERTa, ViT and a Whisper encoder: every Softmax is an attention that
    fuses, without a model-type or head-count hint, and the outputs stay within float tolerance."""
    model = modelio.load_model(path)
    Canonicalize()(model)
    softmaxes = sum(n.op_type == "Softmax" for n in model.graph)
    data = np.load(path.with_suffix(".npz"))
    feeds = {v.name: data[v.name][:4] for v in model.graph.inputs}
    result = fuse_block(model, feeds)
    assert softmaxes and sum(r["family"] == "attention" for r in result.rows) == softmaxes
    assert not [n for n in result.notes if n.startswith("attention")]
