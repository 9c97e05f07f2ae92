"""Run the benchmark scripts and write BENCHMARKS.md from their results.

Each script in SCRIPTS writes its own Markdown section(s) to bench/results/*.md; this script runs the ones asked
for (all by default), then gathers every results file into BENCHMARKS.md under a header naming the machine,
the date and the commands. `--collect` only gathers what is already in bench/results/.

    python bench/run_all.py                    # everything (long: real models, VGG-19)
    python bench/run_all.py quantize_vs_ort    # one script, then rewrite BENCHMARKS.md
    python bench/run_all.py --collect
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# Script stem → what it measures (order = order in BENCHMARKS.md).
SCRIPTS = {
    "int8_cpus": "int8 that is right on every CPU: pair-safe weights, the host's kernels",
    "default_recipe": "the default recipe is never slower",
    "auto_bench": "graphopt auto: the searched pick on digits, 1 vs 2 Dask workers",
    "fuse_bench": "float fusions on the PP-OCR models",
    "quantize_vs_ort": "graphopt quantize against onnxruntime's quantizers",
    "compress_bench": "prune + kmeans (Deep Compression without retraining): digits, PP-OCRv4 rec, VGG-19",
    "channel_prune_bench": "structured channel pruning: digits, light zoo, ResNet-50 latency",
    "channel_prune_ocr": "structured channel pruning on PP-OCRv4 rec",
    "lowrank_bench": "low-rank factorization: digits, VGG-19, ResNet-50",
    "lowrank_ocr": "low-rank factorization on PP-OCRv4 rec, plain vs data-aware",
    "gap_distill_bench": "global-average-pooling heads and closed-form distillation",
    "distill_det": "distillation after lossy passes on PP-OCRv4 det",
    "quant_correct_bench": "empirical bias correction and the sensitivity screen's speed",
    "transformer_encoder": "a BERT-style encoder (needs torch and transformers to build it)",
}
# Results files in the order of the scripts that write them (by file-name prefix).
RESULT_PREFIXES = ["int8_cpus", "default_recipe", "auto", "fuse_bench", "quantize_vs_ort", "compress_", "channel_prune", "lowrank", "gap_distill",
                   "distill_det", "quant_correct"]


def machine() -> str:
    import onnxruntime

    from graphopt.bench import cpu_name

    return f"{cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}"


def run(names: list[str]) -> dict[str, int]:
    codes = {}
    for name in names:
        script = ROOT / "bench" / f"{name}.py"
        if not script.exists():
            print(f"{name}: no script, skipped")
            continue
        print(f"== {name}: {SCRIPTS.get(name, '')}", flush=True)
        codes[name] = subprocess.call([sys.executable, str(script)], cwd=ROOT)
    return codes


def collect(codes: dict[str, int]) -> Path:
    out = [
        "# graphopt benchmarks",
        "",
        f"- machine: {machine()}",
        f"- written: {datetime.date.today().isoformat()} by `python bench/run_all.py`",
        "- each section below names the command that reproduces it; latency is measured at 1 thread unless said",
        "",
    ]
    for name, code in codes.items():
        if code:
            out.append(f"- **{name} exited with code {code}**: its section may be stale or missing")
    files: list[Path] = []
    for prefix in RESULT_PREFIXES:
        files += [p for p in sorted(RESULTS.glob(f"{prefix}*.md")) if p not in files]
    files += [p for p in sorted(RESULTS.glob("*.md")) if p not in files]
    for path in files:
        out += ["", _as_section(path.read_text().strip()), ""]
    target = ROOT / "BENCHMARKS.md"
    target.write_text("\n".join(out).rstrip() + "\n")
    return target


def _as_section(text: str) -> str:
    """Demote a file that starts with a top-level '# ' title so every file is a '##' section."""
    if not text.startswith("# "):
        return text
    return "\n".join("#" + line if line.startswith("#") else line for line in text.splitlines())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"scripts to run (default all: {', '.join(SCRIPTS)})")
    parser.add_argument("--collect", action="store_true", help="only gather bench/results/*.md")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    codes = {} if args.collect else run(args.names or list(SCRIPTS))
    print(f"wrote {collect(codes)}")
    return 1 if any(codes.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
