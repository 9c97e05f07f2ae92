"""k-means 4-bit on a BERT-base encoder's embedding tables (issue 16: "embedding table >= 6x smaller after lzma").

Runs the kmeans pass on the Gather tables only (MatMul/Gemm skipped) of bench/cache/bert_base.onnx (made by
`bench/encoder_models.py` in the torch venv), saves the model, and reports per table the float table's bytes after
lzma against its codes + codebook after lzma, the whole file before and after, and the cosine of last_hidden_state
to float on the 64 rows of bert_base.npz (bench/bert_base.py's cosines: per token, mean and worst sample).

    python bench/embedding_tables.py [--bits 4] [--word-only]
Writes bench/results/embedding_tables.md.
"""

from __future__ import annotations

import argparse
import lzma
import sys
import tempfile
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bert_base import OUTPUT, SOURCE, cosines, load_rows  # noqa: E402
from graphopt import bench, modelio  # noqa: E402
from graphopt.options import build_options  # noqa: E402
from graphopt.passes.kmeans import KMeans  # noqa: E402
from graphopt.pipeline import machine_line  # noqa: E402
from graphopt.runtime import make_session  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "embedding_tables.md"


def lzma_size(data: bytes) -> int:
    return len(lzma.compress(data, preset=6))


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
                 + (" --word-only" if args.word_only else "") + "`; tables: lzma preset 6.", "",
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
        # the whole file at bench/bert_base.py's preset: its lzma column shows the same float file
        whole_before = bench.file_sizes(SOURCE, bench.LZMA_FAST_PRESET)[1]
        whole_after = bench.file_sizes(path, bench.LZMA_FAST_PRESET)[1]
        rows = load_rows()
        reference = make_session(str(SOURCE))
        mean, worst = cosines(path, rows, [reference.run([OUTPUT], feed)[0] for feed in rows])
        del reference
    lines += ["", f"Whole file after lzma (preset {bench.LZMA_FAST_PRESET}): {whole_before / 1e6:.2f} MB -> {whole_after / 1e6:.2f} MB "
              f"({whole_before / whole_after:.2f}x; the MatMul weights stay float). last_hidden_state cosine to "
              f"float over {len(rows)} rows: mean {mean:.5f}, worst row {worst:.5f}. "
              f"Layers changed: {len(result.rows)}.", ""]
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
