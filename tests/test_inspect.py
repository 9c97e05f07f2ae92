"""`graphopt inspect` on a transformer encoder: MACs per block, and the input shapes it counted at, stated."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from graphopt import cli, costs
from graphopt.inspection import format_inspect, inspect_model
from tests.encoder_graphs import EncoderConfig, bert_encoder, encoder_feeds, encoder_macs
from tests.helpers import make_model

CFG = EncoderConfig(layers=3, max_positions=256)


def test_blocks_between_layer_norms_with_hand_counted_macs():
    report = inspect_model(ir.serde.deserialize_model(bert_encoder(CFG)), {"input_ids": (1, 10)})
    tokens = 10
    attention = 4 * tokens * CFG.hidden ** 2 + 2 * tokens * tokens * CFG.hidden  # projections, Q·Kᵀ, scores·V
    ffn = 2 * tokens * CFG.hidden * CFG.ffn
    # the embeddings' LayerNorm opens the first attention block; each layer has an attention and an FFN block
    assert [(b.label, b.layers, b.macs) for b in report.blocks] == [
        (f"/encoder/layer.{i}" + part, layers, macs)
        for i in range(CFG.layers) for part, layers, macs in (("/attention", 6, attention), ("", 2, ffn))]
    assert report.macs == encoder_macs(CFG, 1, tokens) and report.defaulted == {}
    assert report.shapes == {"input_ids": (1, 10), "attention_mask": (1, 10)}  # the mask's sequence bound too
    text = format_inspect(report)
    assert "blocks (the layers between two layer normalizations)" in text
    assert "MACs per inference at input_ids [1,10], attention_mask [1,10]" in text and "a default" not in text


def test_no_blocks_without_layer_norms():
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                       {"w": np.ones((4, 3), np.float32)})
    report = inspect_model(model)
    assert report.blocks == [] and report.macs == 12 and "blocks" not in format_inspect(report)


def test_cli_states_the_default_and_takes_shapes_or_data(tmp_path, capsys):
    path = tmp_path / "encoder.onnx"
    onnx.save(bert_encoder(CFG), str(path))
    assert cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    default = costs.DEFAULT_DIM
    assert f"sequence = {default}: a default for a dynamic dimension" in out
    assert f"({encoder_macs(CFG, 1, default)})" in out  # MACs at the default, in full
    # A position table shorter than the default: the largest power-of-two fraction of it that infers whole.
    short = EncoderConfig(layers=3, max_positions=default // 2 + 4)
    onnx.save(bert_encoder(short), str(tmp_path / "short.onnx"))
    assert cli.main(["inspect", str(tmp_path / "short.onnx")]) == 0
    out = capsys.readouterr().out
    assert f"sequence = {default // 2}: a default" in out and f"({encoder_macs(short, 1, default // 2)})" in out
    assert cli.main(["inspect", str(path), "--shape", "input_ids=1x20"]) == 0
    out = capsys.readouterr().out
    assert f"({encoder_macs(CFG, 1, 20)})" in out and "a default" not in out
    feed = encoder_feeds(CFG, batch=4, sequence=7, count=1)[0]
    np.savez(tmp_path / "data.npz", **feed)
    assert cli.main(["inspect", str(path), "--data", str(tmp_path / "data.npz")]) == 0
    out = capsys.readouterr().out
    assert f"({encoder_macs(CFG, 1, 7)})" in out and "input_ids [1,7]" in out  # one sample of the data's sequence
