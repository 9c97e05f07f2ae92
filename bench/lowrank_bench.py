"""Benchmark of the `lowrank` pass: CPU speed-up under a global MACs budget, and accuracy vs MACs on digits.

    /work/venv/bin/python bench/lowrank_bench.py [--out bench/results] [--skip-light] [--models vgg19,resnet50]

1. Light topologies (models/light.py, seeded random weights): canonicalize + fold_batchnorm, then
   lowrank macs=0.5 (plain; scheme auto); fp32 median latency at 1 thread (graphopt.bench.benchmark) before
   and after, and the model's MACs (graphopt.costs) before and after.
2. digits (models/digits): canonicalize + fold_batchnorm, then lowrank at global budgets from 90% to 20% of the
   factorizable MACs: plain (scheme svd = basis for k×k convs), plain auto, and data-aware (calib.npz, 200
   samples). Test accuracy on the disjoint test.npz. Writes lowrank_digits.md and lowrank_digits.png.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

# One BLAS thread: multi-threaded OpenBLAS LAPACK (SVD) on a busy 2-core box ran ~80x slower than one thread.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graphopt import bench, modelio  # noqa: E402
from graphopt import data as datamod  # noqa: E402
from graphopt.costs import count_macs  # noqa: E402
from graphopt.options import build_options  # noqa: E402
from graphopt.passbase import PassContext  # noqa: E402
from graphopt.passes.canonicalize import Canonicalize  # noqa: E402
from graphopt.passes.fold_batchnorm import FoldBatchNorm  # noqa: E402
from graphopt.passes.lowrank import LowRank  # noqa: E402
from graphopt.runtime import make_session  # noqa: E402

DIGITS = ROOT / "models" / "digits"
BUDGETS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)
VARIANTS = {"plain svd/basis": {"scheme": "svd"}, "plain auto": {"scheme": "auto"},
            "data-aware svd/basis": {"scheme": "svd", "data_aware": True}}


def _prepared(path: Path):
    model = modelio.load_model(path)
    Canonicalize()(model)
    FoldBatchNorm()(model)
    return model


def _lowrank(model, options: dict, context: PassContext | None = None):
    return LowRank(build_options(LowRank.Options, options, "lowrank"), context)(model)


def light(names: list[str], repeats: int) -> list[dict]:
    from models.light import build_light

    rows = []
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            base_path, low_path = Path(tmp) / "base.onnx", Path(tmp) / "lowrank.onnx"
            model = _prepared(build_light(name))
            modelio.save_model(model, base_path)
            macs_before = count_macs(model)
            start = time.perf_counter()
            result = _lowrank(model, {"macs": 0.5})
            seconds = time.perf_counter() - start
            modelio.save_model(model, low_path)
            macs_after = count_macs(model)
            del model
            x = {i.name: np.random.default_rng(0).standard_normal([d if isinstance(d, int) else 1 for d in i.shape])
                 .astype(np.float32) for i in make_session(str(base_path)).get_inputs()}
            timed = bench.benchmark([str(base_path), str(low_path)], [x], threads=1, warmup=2, repeats=repeats)
            schemes: dict[str, int] = {}
            for r in result.rows:
                schemes[r["scheme"]] = schemes.get(r["scheme"], 0) + 1
            row = {"model": name, "macs_before": macs_before, "macs_after": macs_after,
                   "ms_before": timed[0].median_ms, "ms_after": timed[1].median_ms,
                   "speedup": timed[0].median_ms / timed[1].median_ms, "layers": len(result.rows),
                   "schemes": schemes, "pass_s": seconds,
                   "mean_rel_error": float(np.mean([r["rel_error"] for r in result.rows])) if result.rows else 0.0}
            print(f"{name}: MACs {macs_before / 1e9:.2f}G -> {macs_after / 1e9:.2f}G, {row['ms_before']:.1f} ms -> "
                  f"{row['ms_after']:.1f} ms ({row['speedup']:.2f}x), {schemes}, pass {seconds:.1f}s", flush=True)
            rows.append(row)
    return rows


def _accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    logits = make_session(modelio.to_proto(model)).run(None, {"input": x})[0]
    return float((logits.argmax(1) == y).mean())


def digits() -> tuple[dict, list[dict]]:
    test = np.load(DIGITS / "test.npz")
    base = _prepared(DIGITS / "digits.onnx")
    calib = datamod.load_npz(DIGITS / "calib.npz", datamod.input_specs(base))
    total = count_macs(base)
    ref = {"accuracy": _accuracy(base, test["input"], test["labels"]), "macs": total}
    rows = []
    for budget in BUDGETS:
        for label, options in VARIANTS.items():
            model = base.clone()
            context = PassContext(calib=calib, teacher=base)
            result = _lowrank(model, {**options, "macs": budget, "max_samples": 200}, context)
            macs = count_macs(model)
            acc = _accuracy(model, test["input"], test["labels"])
            rows.append({"budget": budget, "variant": label, "accuracy": acc, "macs": macs,
                         "model_macs_kept": macs / total, "layers": len(result.rows),
                         "ranks": {r["layer"]: r["rank"] for r in result.rows}})
            print(f"budget {budget:.1f} {label:22s} model MACs kept {macs / total:6.1%}  acc {acc:.4f}", flush=True)
    return ref, rows


def write(out: Path, light_rows: list[dict], ref: dict | None, digit_rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# lowrank", ""]
    if light_rows:
        lines += ["## Light topologies, global budget macs=0.5 (plain, scheme auto), fp32, 1 thread", "",
                  "| model | MACs before | MACs after | kept | ms before | ms after | speed-up | layers | schemes |"
                  " mean rel. weight error |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
        for r in light_rows:
            lines.append(f"| {r['model']} | {r['macs_before'] / 1e9:.2f} G | {r['macs_after'] / 1e9:.2f} G | "
                         f"{r['macs_after'] / r['macs_before']:.1%} | {r['ms_before']:.1f} | {r['ms_after']:.1f} | "
                         f"{r['speedup']:.2f}x | {r['layers']} | {r['schemes']} | {r['mean_rel_error']:.3f} |")
        lines.append("")
    if ref is not None:
        lines += ["## digits: test accuracy vs MACs kept (global budget, no retraining)", "",
                  f"BN-folded float model: {100 * ref['accuracy']:.2f} % on test.npz, {ref['macs']:,} MACs. The budget "
                  "is the fraction of the factorizable layers' MACs kept; 'model kept' counts the whole model.", "",
                  "| budget | " + " | ".join(f"{v} (model kept / acc.)" for v in VARIANTS) + " |",
                  "| ---: | " + " | ".join("---:" for _ in VARIANTS) + " |"]
        for budget in BUDGETS:
            cells = []
            for v in VARIANTS:
                r = next(r for r in digit_rows if r["budget"] == budget and r["variant"] == v)
                cells.append(f"{r['model_macs_kept']:.1%} / {100 * r['accuracy']:.2f} %")
            lines.append(f"| {budget:.0%} | " + " | ".join(cells) + " |")
        lines.append("")
    (out / "lowrank.md").write_text("\n".join(lines))
    if ref is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in VARIANTS:
        pts = sorted((r["model_macs_kept"], r["accuracy"]) for r in digit_rows if r["variant"] == v)
        ax.plot([100 * p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=v)
    ax.axhline(100 * (ref["accuracy"] - 0.01), color="grey", ls="--", lw=0.8, label="float - 1 point")
    ax.axvline(60, color="grey", ls=":", lw=0.8, label="40% fewer MACs")
    ax.set_xlabel("model MACs kept (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("digits: lowrank, plain vs data-aware (no retraining)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "lowrank_digits.png", dpi=130)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--models", default="vgg19,resnet50")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-light", action="store_true")
    parser.add_argument("--skip-digits", action="store_true")
    args = parser.parse_args()
    ref, digit_rows = digits() if not args.skip_digits else (None, [])
    light_rows = [] if args.skip_light else light(args.models.split(","), args.repeats)
    write(args.out, light_rows, ref, digit_rows)


if __name__ == "__main__":
    main()
