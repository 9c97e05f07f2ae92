"""Export a BERT-base-sized encoder for the transformer benchmarks (issue 16): ``BertModel`` with hidden 768, 12
layers, 12 heads, intermediate 3072, vocabulary 30522, 512 positions, seeded random weights, at opset 17 with
dynamic batch and sequence, the way models/encoders/export.py exports its tiny fixtures (torch's default dynamo
exporter, weights inside the file, checked against torch in onnxruntime), plus feeds at sequence 128.

Bench-only; runs in the torch venv (torch and transformers are never graphopt dependencies):

    /work/torchvenv/bin/python bench/encoder_models.py [--samples 64] [--folder bench/cache]

Writes bench/cache/bert_base.onnx (~440 MB) and bert_base.npz (``--samples`` rows of input_ids, attention_mask,
token_type_ids at sequence 128, every fourth row padded); does nothing when both exist (``--force`` remakes them).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from models.encoders import export as fixtures  # noqa: E402  (the repository root is not on the venv's path)

NAME = "bert_base"
SEQUENCE = 128


def bert_base() -> torch.nn.Module:
    config = transformers.BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                     intermediate_size=3072, max_position_embeddings=512)
    return transformers.BertModel(config)


def encoder(samples: int) -> fixtures.Encoder:
    def inputs(rng):
        return fixtures.text_inputs(rng, pad_id=0, first_id=1000, segments=True, samples=samples, sequence=SEQUENCE,
                                    vocab=30522)
    return fixtures.Encoder(bert_base, inputs, {**fixtures.HIDDEN_STATE, "pooler_output": {0: "batch"}}, text=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=ROOT / "bench" / "cache")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    model, data = args.folder / f"{NAME}.onnx", args.folder / f"{NAME}.npz"
    if model.exists() and data.exists() and not args.force:
        print(f"{model} and {data} exist; nothing to do (--force remakes them)")
        return
    args.folder.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    start = time.perf_counter()
    fixtures.export(NAME, encoder(args.samples), args.folder)
    print(f"wrote {model} ({model.stat().st_size:,} bytes) and {data} ({data.stat().st_size:,} bytes) "
          f"in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
