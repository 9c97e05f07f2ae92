"""graphopt auto on Magika, Google's file-type classifier (a real jax2tf/tf2onnx export no one here wrote: int32
byte inputs, 214 content types), on the bytes of files found on this machine.

    python bench/auto_magika.py [--objectives size latency] [--time-budget 1200] [--agreement]

The samples are Magika's own features (the first and last 1024 bytes of a file, whitespace stripped, padded
with 256) of files under the Python standard library, this environment's site-packages, /usr/share and /etc
whose suffix names one of Magika's content types (directly or through ALIASES; the AMBIGUOUS ones, such as
.txt, .ini or .crt, left out), at most PER_LABEL of each, shuffled with a fixed seed. The first 60% go to auto as
--data with their labels (it keeps 30% of them for its held-out judgement), the rest is a test set it never
sees. Which files exist differs from machine to machine, so the script prints how many it found. The budget is
one point of accuracy; ``--agreement`` drops the labels, so it is one point of top-1 agreement with the float
model (harsher here: a tenth of the files get under 0.5 probability, and 8-bit weights already move some of
them to another type). Each run also builds the issue's fixed recipe (FIXED). Appends to
bench/results/auto_magika.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

RESULTS = BENCH / "results" / "auto_magika.md"
CACHE = BENCH / "cache" / "auto_magika"
BEG = END = 1024  # Magika standard_v3_3: beg_size, end_size (config.min.json)
BLOCK, PADDING = 4096, 256
PER_LABEL = 30  # files per content type, so .py and .so files do not make up the whole set
SEARCH_PART = 0.6
ALIASES = {"h": "c", "hpp": "cpp", "cc": "cpp", "cxx": "cpp", "yml": "yaml", "md": "markdown", "sh": "shell",
           "pl": "perl", "pm": "perl", "js": "javascript", "mjs": "javascript", "htm": "html", "so": "elf",
           "gz": "gzip", "tgz": "gzip", "bz2": "bzip", "pyc": "pythonbytecode", "pyi": "python", "rb": "ruby",
           "jpg": "jpeg", "tif": "tiff"}
AMBIGUOUS = {"txt", "ini", "crt", "cat", "cs", "sgml"}  # suffixes whose files are often another type
FIXED = "prune:sparsity=0.5,scope=global,sensitivity=true; kmeans:bits=4,data_aware=true"


def label_of(path: Path, labels: dict[str, int]) -> int | None:
    suffix = path.suffix.lower().lstrip(".")
    name = ALIASES.get(suffix, suffix)
    return None if name in AMBIGUOUS else labels.get(name)


def features(path: Path) -> np.ndarray:
    """Magika's features of one file (its extraction v2: beg and end, stripped, padded)."""
    size = path.stat().st_size
    n = min(BLOCK, size)
    with open(path, "rb") as handle:
        beg = handle.read(n).lstrip()[:BEG]
        handle.seek(size - n)
        end = handle.read(n).rstrip()[-END:]
    return np.asarray([*beg, *[PADDING] * (BEG - len(beg)), *[PADDING] * (END - len(end)), *end], np.int32)


def labelled_files(labels: dict[str, int], seed: int = 0) -> list[tuple[Path, int]]:
    roots = [sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"], "/usr/share", "/etc"]
    by_label: dict[int, list[Path]] = {}
    for root in roots:
        for folder, dirs, names in os.walk(root):
            dirs.sort()
            for name in sorted(names):
                path = Path(folder) / name
                try:
                    if (label := label_of(path, labels)) is not None and path.is_file() and not path.is_symlink() \
                            and path.stat().st_size >= 64:
                        by_label.setdefault(label, []).append(path)
                except OSError:
                    continue
    rng = random.Random(seed)
    picked = []
    for label in sorted(by_label):
        files = by_label[label]
        rng.shuffle(files)
        picked += [(p, label) for p in files[:PER_LABEL]]
    rng.shuffle(picked)
    print(f"{sum(map(len, by_label.values()))} labelled files of {len(by_label)} content types, {len(picked)} "
          "picked", flush=True)
    return picked


def make_data(config: Path, with_labels: bool) -> tuple[Path, Path]:
    """data.npz (auto's --data) and test.npz (never seen by the search), built once into the cache."""
    CACHE.mkdir(parents=True, exist_ok=True)
    data, test = CACHE / "data.npz", CACHE / "test.npz"
    if not (data.exists() and test.exists()):
        names = json.loads(config.read_text())["target_labels_space"]
        picked = labelled_files({name: i for i, name in enumerate(names)})
        x = np.stack([features(p) for p, _ in picked])
        y = np.asarray([label for _, label in picked], np.int64)
        n = int(len(picked) * SEARCH_PART)
        np.savez(data, bytes=x[:n], labels=y[:n])
        np.savez(test, bytes=x[n:], labels=y[n:])
    if with_labels:
        return data, test
    plain = CACHE / "data_unlabelled.npz"
    np.savez(plain, bytes=np.load(data)["bytes"])
    return plain, test


def scores(model: str, reference: str, test: Path) -> str:
    """Accuracy on the test files' labels and top-1 agreement with the float model."""
    from graphopt.runtime import make_session

    x, y = np.load(test)["bytes"], np.load(test)["labels"]
    ref, cand = (make_session(m).run(None, {"bytes": x})[0].argmax(1) for m in (reference, model))
    return f"accuracy {np.mean(cand == y):.4f} (float {np.mean(ref == y):.4f}), agreement {np.mean(cand == ref):.4f}"


def one_run(model: str, objective: str, budget: float, data: Path, test: Path, labelled: bool) -> list[str]:
    from graphopt import bench as gbench
    from graphopt import optimize
    from graphopt.auto import auto, summary
    from graphopt.data import input_specs, load_data
    from graphopt.latency import batch_one
    from graphopt.modelio import load_model
    from graphopt.pipeline import RunOptions

    out = CACHE / f"magika.{objective}.{'accuracy' if labelled else 'agreement'}.auto.onnx"
    start = time.perf_counter()
    result = auto(model, out, data=str(data), objective=objective, trials=500, time_budget=budget, progress=False)
    seconds = time.perf_counter() - start
    built = sum(c.same_as is None for c in result.candidates)
    valid = sum(c.valid for c in result.candidates if c.same_as is None)
    fixed = CACHE / "magika.fixed.onnx"
    report = optimize(model, fixed, passes=FIXED, data=str(data), max_drop=0.01, run=RunOptions(progress=False))
    kept = [p.step.split(":")[0] for p in report.passes if p.status == "kept" and p.step.split(":")[0] in
            ("prune", "kmeans")]
    specs = input_specs(load_model(model))
    feeds = batch_one(specs, load_data(str(data), specs).feeds[:4])
    rows = gbench.benchmark([model, str(out)], feeds, threads=1, min_time_s=10.0)
    pick_bytes, fixed_bytes = gbench.file_sizes(out)[1], gbench.file_sizes(fixed)[1]
    return [f"### magika, --objective {objective}, budget on {'accuracy' if labelled else 'agreement'}", "",
            f"{time.strftime('%Y-%m-%d %H:%M')}; {result.machine}; time budget {budget:.0f} s, wall {seconds:.0f} s; "
            f"{built} candidates built, {valid} inside the budget on the search samples.", "",
            *[f"- {line}" for line in summary(result)[:3]],
            f"- after lzma: {pick_bytes:,} B vs float {result.original_lzma_bytes:,} B: "
            f"**{result.original_lzma_bytes / pick_bytes:.2f}x smaller**",
            f"- test files never seen ({len(np.load(test)['bytes'])}): {scores(str(out), model, test)}",
            f"- latency: float {rows[0].median_ms:.3f} ms, pick x{rows[1].ratio:.3f} (interleaved, batch 1, 1 thread)",
            f"- the fixed recipe `{FIXED}` (1-point budget, same data): kept {', '.join(kept) or 'nothing'}; "
            f"{result.original_lzma_bytes / fixed_bytes:.2f}x smaller after lzma, test {scores(str(fixed), model, test)}",
            ""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objectives", nargs="+", default=["size", "latency"], choices=["size", "latency"])
    parser.add_argument("--time-budget", type=float, default=1200.0)
    parser.add_argument("--agreement", action="store_true", help="no labels: the budget is on agreement")
    args = parser.parse_args()
    from models.fetch import fetch_magika

    paths = fetch_magika()
    model = str(paths["magika"])
    data, test = make_data(paths["magika_config"], not args.agreement)
    for objective in args.objectives:
        lines = one_run(model, objective, args.time_budget, data, test, not args.agreement)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with open(RESULTS, "a") as f:
            f.write("\n".join(lines) + "\n")
        print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
