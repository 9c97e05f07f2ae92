"""Deep Compression without retraining on the bundled digits model: prune + kmeans at several settings.

    /work/venv/bin/python bench/compress_bench.py [--out bench/results]

Every setting starts from digits.onnx after canonicalize + fold_batchnorm (the deployed float form), runs
prune and/or kmeans (sensitivity and data-aware settings use calib.npz; accuracy is measured on the disjoint
test.npz), saves with graphopt.modelio and measures the file: bytes, lzma bytes and the Huffman figure.
Writes compress_digits.md (table) and compress_digits.png (test accuracy vs lzma size).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from graphopt import data as datamod
from graphopt import modelio
from graphopt.options import build_options
from graphopt.passbase import PassContext
from graphopt.passes.canonicalize import Canonicalize
from graphopt.passes.fold_batchnorm import FoldBatchNorm
from graphopt.passes.kmeans import KMeans
from graphopt.passes.prune import Prune
from graphopt.runtime import make_session
from graphopt.sizes import model_sizes

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits"

# (label, prune options or None, kmeans options or None)
SETTINGS: list[tuple[str, dict | None, dict | None]] = [
    ("float (BN folded)", None, None),
    ("prune 50%", {"sparsity": 0.5}, None),
    ("prune 90% (sparse init.)", {"sparsity": 0.9}, None),
    ("kmeans 8 bits", None, {"bits": 8}),
    ("kmeans 4 bits", None, {"bits": 4}),
    ("kmeans 4 bits per channel", None, {"bits": 4, "per_channel": True}),
    ("kmeans 3 bits", None, {"bits": 3}),
    ("kmeans 2 bits", None, {"bits": 2}),
    ("kmeans 1 bit (sign x scale)", None, {"bits": 1}),
    ("prune 50% + kmeans 4", {"sparsity": 0.5}, {"bits": 4}),
    ("prune 50% + kmeans 4 data-aware", {"sparsity": 0.5}, {"bits": 4, "data_aware": True}),
    ("prune 50% + kmeans 3", {"sparsity": 0.5}, {"bits": 3}),
    ("prune 60% global + kmeans 4", {"sparsity": 0.6, "scope": "global"}, {"bits": 4}),
    ("prune 70% + kmeans 4", {"sparsity": 0.7}, {"bits": 4}),
    ("prune 70% sensitivity + kmeans 4", {"sparsity": 0.7, "sensitivity": True, "min_size": 0}, {"bits": 4}),
    ("prune 70% sensitivity + kmeans 4 data-aware",
     {"sparsity": 0.7, "sensitivity": True, "min_size": 0}, {"bits": 4, "data_aware": True}),
    ("prune 70% sensitivity + kmeans 3", {"sparsity": 0.7, "sensitivity": True, "min_size": 0}, {"bits": 3}),
    ("prune 80% sensitivity + kmeans 4", {"sparsity": 0.8, "sensitivity": True, "min_size": 0}, {"bits": 4}),
]


def accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    logits = make_session(str(path)).run(None, {"input": x})[0]
    return float((logits.argmax(1) == y).mean())


def run(out: Path) -> list[dict]:
    test = np.load(DIGITS / "test.npz")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        float_path = Path(tmp) / "float.onnx"
        orig_path = DIGITS / "digits.onnx"
        orig = model_sizes(orig_path)
        for label, prune_opts, km_opts in SETTINGS:
            model = modelio.load_model(orig_path)
            Canonicalize()(model)
            FoldBatchNorm()(model)
            teacher = model.clone()
            calib = datamod.load_npz(DIGITS / "calib.npz", datamod.input_specs(model))
            context = PassContext(calib=calib, teacher=teacher)
            start = time.perf_counter()
            notes = []
            if prune_opts is not None:
                notes += Prune(build_options(Prune.Options, prune_opts, "prune"), context)(model).notes
            if km_opts is not None:
                notes += KMeans(build_options(KMeans.Options, km_opts, "kmeans"), context)(model).notes
            seconds = time.perf_counter() - start
            path = Path(tmp) / "m.onnx" if rows else float_path
            modelio.save_model(model, path)
            sizes = model_sizes(path)
            acc = accuracy(path, test["input"], test["labels"])
            rows.append({"setting": label, "accuracy": acc, **sizes, "seconds": seconds, "notes": notes})
            print(f"{label:48s} acc {acc:.4f}  bytes {sizes['bytes']:7d}  lzma {sizes['lzma_bytes']:7d}  "
                  f"huffman {sizes['huffman_bytes']:7d}  {seconds:.2f}s", flush=True)
    write(out, rows, orig)
    return rows


def write(out: Path, rows: list[dict], orig: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    base = rows[0]
    lines = [
        "# prune + kmeans on digits (no retraining)", "",
        f"Original digits.onnx: {orig['bytes']:,} bytes, lzma {orig['lzma_bytes']:,}. Every setting starts from "
        "it after canonicalize + fold_batchnorm; ratios are against the BN-folded float model below. Test "
        f"accuracy on test.npz ({len(np.load(DIGITS / 'test.npz')['labels'])} samples); sensitivity and "
        "data-aware settings use calib.npz. huffman = Huffman-coded index streams + codebooks + other tensors raw "
        "(Deep Compression's figure, weights only).", "",
        "| setting | test acc. | drop (pt) | bytes | lzma bytes | lzma ratio | huffman bytes | huffman ratio | s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {100 * r['accuracy']:.2f} % | {100 * (base['accuracy'] - r['accuracy']):+.2f} | "
            f"{r['bytes']:,} | {r['lzma_bytes']:,} | {base['lzma_bytes'] / r['lzma_bytes']:.1f}x | "
            f"{r['huffman_bytes']:,} | {base['huffman_bytes'] / r['huffman_bytes']:.1f}x | {r['seconds']:.2f} |")
    best = [r for r in rows if base["accuracy"] - r["accuracy"] <= 0.01 + 1e-9]
    top = max(best, key=lambda r: base["lzma_bytes"] / r["lzma_bytes"])
    lines += ["", f"Smallest within 1 point of the float accuracy: **{top['setting']}**, "
              f"{base['lzma_bytes'] / top['lzma_bytes']:.1f}x smaller (lzma), "
              f"{100 * top['accuracy']:.2f} % vs {100 * base['accuracy']:.2f} %.", ""]
    (out / "compress_digits.md").write_text("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        ax.scatter(r["lzma_bytes"] / 1024, 100 * r["accuracy"], s=25)
        ax.annotate(r["setting"], (r["lzma_bytes"] / 1024, 100 * r["accuracy"]), fontsize=6,
                    xytext=(3, 2), textcoords="offset points")
    ax.axhline(100 * (base["accuracy"] - 0.01), color="grey", ls="--", lw=0.8, label="float - 1 point")
    ax.axvline(base["lzma_bytes"] / 10 / 1024, color="grey", ls=":", lw=0.8, label="10x smaller (lzma)")
    ax.set_xscale("log")
    ax.set_xlabel("model size after lzma (KiB, log)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("digits: prune + kmeans without retraining")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "compress_digits.png", dpi=130)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    run(parser.parse_args().out)


if __name__ == "__main__":
    main()
