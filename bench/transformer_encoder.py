"""Build a reproducible transformer-encoder ONNX model and its input data for benchmarks.

What it builds: a BERT encoder with the MiniLM-L6 shape (hidden 384, 6 layers, 12 heads, intermediate 1536,
vocab 30522, max positions 512), made from a ``transformers.BertConfig`` alone (no hub download), ``BertModel``
in eval mode with transformers' default attention implementation (``sdpa``). Weights are seeded random
(``torch.manual_seed(0)``); biases and LayerNorm parameters get small random offsets too, because the init's
exact 0/1 values would let graph optimizers delete ops (bias Adds) that trained models keep.

Exported with the legacy TorchScript exporter (``torch.onnx.export(..., dynamo=False)``, the one most users
have) at opset 17, weights inside the file (~90 MB). Inputs ``input_ids``, ``attention_mask``,
``token_type_ids`` (int64, dynamic batch and sequence axes); outputs ``last_hidden_state`` and
``pooler_output``. Checked with torch 2.13.0 (CPU), transformers 5.25.0, onnxruntime 1.32.0: onnxruntime
matches torch within 3e-6 on the padded data.

The data file holds 64 samples of length 128, seeded: token ids uniform in [1000, 30000), attention masks with a
random number of trailing padding positions (padded ids set to 0), token_type_ids all zero.

Needs torch, transformers, onnx and numpy (in a venv of its own; torch is not a dependency of graphopt):

    python bench/transformer_encoder.py --out bench/cache/bert

writes bench/cache/bert/bert_l6.onnx and bert_l6_data.npz (what bench/default_recipe.py reads); does nothing
when both exist.
"""

import argparse
import os

import numpy as np

SEQ, N = 128, 64


def make_data(path):
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, size=(N, SEQ), dtype=np.int64)
    lengths = rng.integers(SEQ // 4, SEQ + 1, size=N)  # real tokens per row; the rest is padding
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)
    ids = ids * mask
    np.savez(path, input_ids=ids, attention_mask=mask, token_type_ids=np.zeros((N, SEQ), np.int64))


def make_model(path):
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                        vocab_size=30522, max_position_embeddings=512)

    class Encoder(torch.nn.Module):  # keyword call: BertModel.forward's positional order varies across versions
        def __init__(self):
            super().__init__()
            self.bert = BertModel(config)

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state, out.pooler_output

    model = Encoder().eval()
    with torch.no_grad():  # BERT's init leaves every bias at 0 and LayerNorm at 1/0, which optimizers can fold away
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.02 * torch.randn_like(param))
    ids = torch.randint(1000, 30000, (1, SEQ), dtype=torch.int64)
    args = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
    axes["pooler_output"] = {0: "batch"}
    with torch.no_grad():
        torch.onnx.export(model, args, path, input_names=names, output_names=["last_hidden_state", "pooler_output"],
                          dynamic_axes=axes, opset_version=17, do_constant_folding=True, dynamo=False)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    out = parser.parse_args().out
    os.makedirs(out, exist_ok=True)
    model, data = os.path.join(out, "bert_l6.onnx"), os.path.join(out, "bert_l6_data.npz")
    if os.path.exists(model) and os.path.exists(data):
        print(f"{model} and {data} exist; nothing to do")
        return
    make_model(model)
    make_data(data)
    print(f"wrote {model} ({os.path.getsize(model) / 1e6:.1f} MB) and {data}")


if __name__ == "__main__":
    main()
