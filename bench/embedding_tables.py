"""k-means 4-bit on a BERT-base encoder's embedding tables (issue 16: "embedding table >= 6x smaller after lzma").

Runs the kmeans pass on the Gather tables only (MatMul/Gemm skipped) of bench/cache/bert_base.onnx (made by
`bench/encoder_models.py` in the torch venv), saves the model, and reports per table the float table's bytes after
lzma against its codes + codebook after lzma, the whole file before and after, and the cosine of last_hidden_state
to float on the 64 rows of bert_base.npz (per token, mean over tokens; mean over rows and the worst row).

    python bench/embedding_tables.py [--bits 4] [--word-only]
Writes bench/results/embedding_tables.md.
"""

from __future__ import annotations

import argparse
import lzma
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graphopt import modelio  # noqa: E402
from graphopt.options import build_options  # noqa: E402
from graphopt.passes.kmeans import KMeans  # noqa: E402
from graphopt.pipeline import machine_line  # noqa: E402
from graphopt.runtime import make_session  # noqa: E402

CACHE = ROOT / "bench" / "cache"
SOURCE, ROWS = CACHE / "bert_base.onnx", CACHE / "bert_base.npz"
RESULTS = ROOT / "bench" / "results" / "embedding_tables.md"


def lzma_size(data: bytes) -> int:
    return len(lzma.compress(data, preset=6))


def hidden_states(path: Path, rows: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = make_session(str(path), threads=2)
    names = [i.name for i in session.get_inputs()]
    count = len(next(iter(rows.values())))
    return [session.run(["last_hidden_state"], {n: rows[n][i:i + 1] for n in names})[0][0] for i in range(count)]


def cosines(reference: list[np.ndarray], found: list[np.ndarray]) -> tuple[float, float]:
    per_row = []
    for a, b in zip(reference, found):
        dot = (a * b).sum(-1)
        per_row.append(float(np.mean(dot / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12))))
    return float(np.mean(per_row)), float(np.min(per_row))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--word-only", action="store_true", help="leave the position and token-type tables float")
    args = parser.parse_args(argv)

    source = onnx.load(str(SOURCE))
    floats = {t.name: onnx.numpy_helper.to_array(t) for t in source.graph.initializer}
    model = modelio.load_model(SOURCE)
    raw = {"bits": args.bits, "skip_ops": ["MatMul", "Gemm"]}
    if args.word_only:
        gathers = [n for n in model.graph if n.op_type == "Gather" and n.inputs[0].name in floats
                   and floats[n.inputs[0].name].ndim == 2 and "word" not in n.inputs[0].name]
        raw["skip_nodes"] = [n.name for n in gathers]
    result = KMeans(build_options(KMeans.Options, raw, "kmeans"), None)(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tables.onnx"
        modelio.save_model(model, path)
        stored = {t.name: t for t in onnx.load(str(path)).graph.initializer}
        lines = [f"## k-means {args.bits}-bit on BERT-base's embedding tables" + (" (word table only)" if args.word_only
                                                                                 else ""), "",
                 machine_line(), f"Command: `python bench/embedding_tables.py --bits {args.bits}"
                 + (" --word-only" if args.word_only else "") + "`; lzma preset 6.", "",
                 "| table | shape | float bytes | float lzma | codes + codebook | after lzma | ratio after lzma |",
                 "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for name, array in floats.items():
            idx, book = stored.get(f"{name}_indices"), stored.get(f"{name}_codebook")
            if idx is None or book is None:
                continue
            before = lzma_size(array.tobytes())
            after = lzma_size(idx.raw_data) + lzma_size(book.raw_data)
            lines.append(f"| {name} | {'x'.join(map(str, array.shape))} | {array.nbytes:,} | {before:,} | "
                         f"{len(idx.raw_data) + len(book.raw_data):,} | {after:,} | {before / after:.2f}x |")
        whole_before, whole_after = lzma_size(SOURCE.read_bytes()), lzma_size(path.read_bytes())
        rows = dict(np.load(ROWS))
        mean, worst = cosines(hidden_states(SOURCE, rows), hidden_states(path, rows))
    lines += ["", f"Whole file after lzma: {whole_before / 1e6:.2f} MB -> {whole_after / 1e6:.2f} MB "
              f"({whole_before / whole_after:.2f}x; the MatMul weights stay float). last_hidden_state cosine to "
              f"float over {len(next(iter(rows.values())))} rows: mean {mean:.5f}, worst row {worst:.5f}. "
              f"Layers changed: {len(result.rows)}.", ""]
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
