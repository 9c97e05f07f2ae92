"""Never slower: the default recipe (`canonicalize; fold_batchnorm; fuse; cleanup`) on every benchmarked model.

For each model: `graphopt.optimize` with the default recipe and the latency guard on (1 thread), then the input
and the output timed again in one process, interleaved (quantize_vs_ort's rotations), and each step's status
with the ratio the guard measured. ``bert`` is the BERT-style encoder `bench/transformer_encoder.py` builds
(torch and transformers in their own venv; graphopt never imports them): build it first into
``bench/cache/bert`` or give ``--bert-dir``.

    python bench/default_recipe.py [--models digits resnet50 vgg19 rec cls det bert] [--bert-dir DIR]
Writes bench/results/default_recipe.md (a model's section is rewritten when that model runs).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.quantize_vs_ort import RESULTS, ROOT, rotated_bench, setup, write_sections  # noqa: E402
from graphopt.pipeline import RunOptions, machine_line, optimize  # noqa: E402

ALL = ("digits", "resnet50", "vgg19", "rec", "cls", "det", "bert")
BERT_DIR = ROOT / "bench" / "cache" / "bert"


def _bert(folder: Path) -> dict:
    model, data = folder / "bert_l6.onnx", folder / "bert_l6_data.npz"
    if not model.exists() or not data.exists():
        raise FileNotFoundError(f"{model}: build it with `python bench/transformer_encoder.py --out {folder}` "
                                "(a venv with torch and transformers)")
    arrays = np.load(data)
    one = [{k: arrays[k][i:i + 1] for k in arrays.files} for i in range(len(arrays[arrays.files[0]]))]
    return dict(path=model, bench=one[:4], optimize=dict(data=str(data)))


def run_model(name: str, repeats: int, min_time_s: float, bert_dir: Path) -> list[str]:
    with tempfile.TemporaryDirectory(prefix=f"default-{name}-") as tmpdir:
        tmp = Path(tmpdir)
        cfg = _bert(bert_dir) if name == "bert" else setup(name, tmp)
        src, out = Path(cfg["path"]), tmp / "out.onnx"
        report = optimize(str(src), out, run=RunOptions(progress=False), **cfg["optimize"])
        timing = rotated_bench([str(src), str(out)], ["input", "output"], cfg["bench"], repeats, min_time_s)
    lines = [f"\n### {name}\n", f"Output against input, re-timed interleaved: **x{timing['output'].ratio:.3f}** "
             f"({timing['input'].median_ms:.3f} → {timing['output'].median_ms:.3f} ms); gate "
             f"{'passed' if report.passed else 'FAILED'}.", "",
             "| step | status | x before (± noise) | x input | why / what |", "| --- | --- | ---: | ---: | --- |"]
    for row in report.passes[1:]:
        before = "-" if row.latency_vs_before is None else f"{row.latency_vs_before:.3f} ± {row.latency_noise:.3f}"
        orig = "-" if row.latency_ratio is None else f"{row.latency_ratio:.3f}"
        said = [row.reason] if row.reason else []
        said += [n for n in row.notes if "onnxsim" in n or "fold_and_prune" in n or "slower" in n]
        lines.append(f"| {row.step} | {row.status} | {before} | {orig} | {'; '.join(said).replace('|', '/')} |")
    print("\n".join(lines), flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(ALL))
    parser.add_argument("--bert-dir", default=str(BERT_DIR))
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--min-time", type=float, default=4.0)
    parser.add_argument("--out", default=str(RESULTS / "default_recipe.md"))
    args = parser.parse_args(argv)
    head = ["## The default recipe is never slower", "",
            f"Machine: {machine_line()}; onnxruntime 1 thread. `graphopt optimize MODEL --data D` (default recipe, "
            "latency guard on), then input and output re-timed interleaved (median over the rotations of their "
            "order, at least 40 rounds and 4 s). Command: `python bench/default_recipe.py --models "
            + " ".join(ALL) + "`."]
    write_sections(Path(args.out), head, args.models, ALL, lambda name: "\n".join(run_model(name, args.repeats, args.min_time, Path(args.bert_dir))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
