"""Export the tiny transformer encoder fixtures: BERT, DistilBERT, RoBERTa, ViT and a Whisper encoder, built from
``transformers`` configs with seeded random weights, each with an .npz of seeded inputs.

Run with the separate torch venv (torch and transformers are never graphopt run-time or test dependencies):

    python3.11 -m venv /work/torchvenv
    /work/torchvenv/bin/pip install torch==2.13.0 transformers onnx onnxscript onnxruntime numpy
    /work/torchvenv/bin/python models/encoders/export.py

Writes, next to this file, ``<name>.onnx`` and ``<name>.npz`` for each name in ENCODERS. The export is what a
user gets from ``torch.onnx.export(model, args, f, opset_version=17, dynamic_axes=...)`` with torch's default
(dynamo) exporter; only ``external_data=False`` is added so each file is self-contained. When onnxruntime is
installed, each file is checked against torch on its inputs (and on a shorter sequence, for the dynamic axis).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
import transformers

HERE = Path(__file__).resolve().parent
SEED = 0
OPSET = 17
SAMPLES = 32  # rows of each .npz: graphopt splits them into calibration and evaluation halves
SEQUENCE = 16  # text length of the .npz rows (the exported sequence axis is dynamic)
HIDDEN, HEADS, LAYERS, FFN = 64, 4, 2, 128
VOCAB, MAX_POSITIONS = 1000, 64
IMAGE, PATCH = 32, 8
MELS, AUDIO_POSITIONS = 16, 32  # Whisper: 16 mel bins, 64 frames in (two convs, stride 2 once) -> 32 positions
TOLERANCE = 1e-4  # onnxruntime vs torch, absolute: float32 reorderings over two layers stay near 1e-6
BATCH_SEQUENCE = {0: "batch", 1: "sequence"}


@dataclasses.dataclass(frozen=True)
class Encoder:
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[np.random.Generator], dict[str, np.ndarray]]  # SAMPLES rows of every input
    outputs: dict[str, dict[int, str]]  # output name -> its dynamic axes
    text: bool  # inputs [batch, sequence] with a dynamic sequence axis
    dynamo: bool = True  # torch's default exporter; False: the TorchScript one (Optimum's, older torch's default)


def text_inputs(rng: np.random.Generator, pad_id: int, first_id: int, segments: bool, samples: int = SAMPLES,
                sequence: int = SEQUENCE, vocab: int = VOCAB) -> dict[str, np.ndarray]:
    """Token ids with a start token and padded rows: every fourth row (3, 7, ...) ends early, its tail masked and
    set to ``pad_id``; ``segments`` adds token_type_ids with a second segment in the latter part of each row."""
    ids = rng.integers(first_id, vocab, size=(samples, sequence), dtype=np.int64)
    ids[:, 0] = first_id - 1  # a start token ([CLS] / <s>) below the drawn range
    lengths = np.full(samples, sequence)
    short = np.arange(3, samples, 4)  # fixed rows, so any leading slice of the file holds padded rows
    lengths[short] = rng.integers(sequence // 4, sequence - 1, size=len(short))
    mask = (np.arange(sequence)[None, :] < lengths[:, None]).astype(np.int64)
    ids[mask == 0] = pad_id
    feeds = {"input_ids": ids, "attention_mask": mask}
    if segments:
        split = rng.integers(2, sequence - 2, size=samples)
        feeds["token_type_ids"] = ((np.arange(sequence)[None, :] >= split[:, None]) & (mask == 1)).astype(np.int64)
    return feeds


def _bert() -> torch.nn.Module:
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                     num_attention_heads=HEADS, intermediate_size=FFN,
                                     max_position_embeddings=MAX_POSITIONS)
    return transformers.BertModel(config)


def _distilbert() -> torch.nn.Module:
    config = transformers.DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS,
                                           hidden_dim=FFN, max_position_embeddings=MAX_POSITIONS)
    return transformers.DistilBertModel(config)


def _roberta() -> torch.nn.Module:
    # Token classification (NER-style logits per token). RoBERTa numbers positions from padding_idx + 1, so it
    # needs two more position rows than the longest sequence (514 for 512 in the real model).
    config = transformers.RobertaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                        num_attention_heads=HEADS, intermediate_size=FFN,
                                        max_position_embeddings=MAX_POSITIONS + 2, num_labels=5)
    return transformers.RobertaForTokenClassification(config)


def _vit() -> torch.nn.Module:
    config = transformers.ViTConfig(image_size=IMAGE, patch_size=PATCH, num_channels=3, hidden_size=HIDDEN,
                                    num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
                                    num_labels=10)
    return transformers.ViTForImageClassification(config)


def _whisper() -> torch.nn.Module:
    # The encoder alone (what speech embedders export); the decoder's token ids only need to fit the vocabulary.
    config = transformers.WhisperConfig(vocab_size=VOCAB, num_mel_bins=MELS, d_model=HIDDEN,
                                        encoder_layers=LAYERS, encoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
                                        max_source_positions=AUDIO_POSITIONS, pad_token_id=0, bos_token_id=1,
                                        eos_token_id=2, decoder_start_token_id=3)
    return transformers.models.whisper.modeling_whisper.WhisperEncoder(config)


def _pixels(rng: np.random.Generator) -> dict[str, np.ndarray]:
    # Normalized images: a smooth per-image ramp plus noise, so patches are not white noise alone.
    ramp = np.linspace(-1, 1, IMAGE, dtype=np.float32)
    base = rng.uniform(0.2, 1.0, size=(SAMPLES, 3, 1, 1)).astype(np.float32) * (ramp[None, None, :, None]
                                                                                + ramp[None, None, None, :])
    return {"pixel_values": (base + 0.5 * rng.standard_normal((SAMPLES, 3, IMAGE, IMAGE))).astype(np.float32)}


def _mels(rng: np.random.Generator) -> dict[str, np.ndarray]:
    # Log-mel-like features: Whisper's extractor scales them to about [-1, 1].
    frames = 2 * AUDIO_POSITIONS
    return {"input_features": np.tanh(rng.standard_normal((SAMPLES, MELS, frames))).astype(np.float32)}


HIDDEN_STATE = {"last_hidden_state": BATCH_SEQUENCE}
ENCODERS = {
    "bert": Encoder(_bert, lambda rng: text_inputs(rng, pad_id=0, first_id=2, segments=True),
                    {**HIDDEN_STATE, "pooler_output": {0: "batch"}}, text=True),
    "bert_torchscript": Encoder(_bert, lambda rng: text_inputs(rng, pad_id=0, first_id=2, segments=True),
                                {**HIDDEN_STATE, "pooler_output": {0: "batch"}}, text=True, dynamo=False),
    "distilbert": Encoder(_distilbert, lambda rng: text_inputs(rng, pad_id=0, first_id=2, segments=False),
                          HIDDEN_STATE, text=True),
    "roberta": Encoder(_roberta, lambda rng: text_inputs(rng, pad_id=1, first_id=3, segments=False),
                       {"logits": BATCH_SEQUENCE}, text=True),
    "vit": Encoder(_vit, _pixels, {"logits": {0: "batch"}}, text=False),
    "whisper_encoder": Encoder(_whisper, _mels, {"last_hidden_state": {0: "batch"}}, text=False),
}


class Positional(torch.nn.Module):
    """``model`` called with keyword inputs, returning the named outputs as a tuple: what the TorchScript exporter
    needs (it fails on transformers 5's forward() with positional inputs: "multiple values for 'use_cache'")."""

    def __init__(self, model: torch.nn.Module, inputs: list[str], outputs: list[str]) -> None:
        super().__init__()
        self.model, self.inputs, self.outputs = model, inputs, outputs

    def forward(self, *arrays: torch.Tensor) -> tuple[torch.Tensor, ...]:
        result = self.model(**dict(zip(self.inputs, arrays)))
        return tuple(result[name] for name in self.outputs)


def seeded(encoder: Encoder) -> torch.nn.Module:
    """The model with transformers' seeded init, and small random offsets on biases and LayerNorm parameters: the
    init leaves them exactly 0 and 1, which optimizers could fold away where a trained model keeps them."""
    torch.manual_seed(SEED)
    model = encoder.build().eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.02 * torch.randn_like(param))
    return model


def export(name: str, encoder: Encoder, folder: Path) -> Path:
    """Build ``name`` with seeded weights, export it to ``folder/name.onnx`` and its inputs to ``name.npz``."""
    feeds = encoder.inputs(np.random.default_rng(SEED))
    model = seeded(encoder)
    # Positional inputs, as a user exports: the .npz keys must be forward()'s leading parameters, in order.
    params = list(inspect.signature(model.forward).parameters)
    if params[:len(feeds)] != list(feeds):
        raise SystemExit(f"{name}: forward{tuple(params)} does not start with the inputs {list(feeds)}")
    np.savez(folder / f"{name}.npz", **feeds)
    example = tuple(torch.from_numpy(value[:2]) for value in feeds.values())
    in_axes = BATCH_SEQUENCE if encoder.text else {0: "batch"}
    path = folder / f"{name}.onnx"
    # eval(): the exporter restores the wrapper's mode afterwards, and a new module is in training mode (dropout).
    exported = model if encoder.dynamo else Positional(model, list(feeds), list(encoder.outputs)).eval()
    torch.onnx.export(exported, example, str(path), input_names=list(feeds), output_names=list(encoder.outputs),
                      opset_version=OPSET, dynamic_axes={**{k: in_axes for k in feeds}, **encoder.outputs},
                      external_data=False, dynamo=encoder.dynamo)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    meta = {"torch": torch.__version__, "transformers": transformers.__version__, "seed": str(SEED)}
    onnx.helper.set_model_props(proto, meta)
    onnx.save(proto, str(path))
    check_against_torch(model, path, feeds, encoder)
    return path


def check_against_torch(model: torch.nn.Module, path: Path, feeds: dict[str, np.ndarray], encoder: Encoder) -> None:
    """onnxruntime's outputs equal torch's on the .npz rows (and, for text, on a shorter sequence too)."""
    if importlib.util.find_spec("onnxruntime") is None:
        print("  onnxruntime not installed: not checked against torch")
        return
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    variants = [feeds] + ([{k: v[:5, :v.shape[1] - 5] for k, v in feeds.items()}] if encoder.text else [])
    for arrays in variants:
        with torch.no_grad():
            expected = model(**{key: torch.from_numpy(value) for key, value in arrays.items()})
        got = session.run(list(encoder.outputs), arrays)
        for out_name, value in zip(encoder.outputs, got):
            want = expected[out_name].numpy()
            worst = float(np.max(np.abs(value - want)))
            if value.shape != want.shape or worst > TOLERANCE:
                raise SystemExit(f"{path.name}: {out_name} {value.shape} differs from torch {want.shape} by {worst}")


def main(names: list[str]) -> None:
    torch.set_num_threads(2)
    for name in names or list(ENCODERS):
        path = export(name, ENCODERS[name], HERE)
        proto = onnx.load(str(path))
        ops = len(proto.graph.node)
        print(f"{name}: {path.stat().st_size:,} bytes, {ops} nodes, inputs {[i.name for i in proto.graph.input]}")


if __name__ == "__main__":
    main(sys.argv[1:])
