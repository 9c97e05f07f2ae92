"""Global-average-pooling heads (`gap`) and closed-form distillation (`distill`).

    /work/venv/bin/python bench/gap_distill_bench.py [--light vgg19,bvlc_alexnet] [--calib 48] [--out bench/results]

1. VGG-19 and AlexNet topologies (models/light.py: seeded random weights): after canonicalize, `gap` with
   head=true and through=0/1/2 without data (averaged weights, later layers composed as if linear), and
   through=2 refit on random-image calibration feeds. Whole-model parameters, file bytes, and the output's
   relative L2 error against the original on 4 held-out random images (random weights: the error says how
   far from spatially uniform the features are, not how a trained model would fare).
2. The digits model (calib.npz / test.npz): recipes through graphopt.optimize with the gate opened
   (max_drop=1) so every pass is kept and its accuracy shows; test accuracy of the saved model.
   `prune → distill → kmeans` and `channel_prune → distill` against the same recipes without distill;
   passes missing from graphopt.passes.REGISTRY are reported as "pass not available".
Writes gap_distill_bench.md (the two tables) to --out and prints it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graphopt import modelio  # noqa: E402
from graphopt.costs import count_params  # noqa: E402
from graphopt.data import Dataset  # noqa: E402
from graphopt.passbase import PassContext  # noqa: E402
from graphopt.passes import REGISTRY  # noqa: E402
from graphopt.passes.canonicalize import Canonicalize  # noqa: E402
from graphopt.passes.gap import Gap  # noqa: E402
from graphopt.pipeline import RunOptions, optimize  # noqa: E402
from graphopt.runtime import make_session  # noqa: E402

DIGITS = ROOT / "models" / "digits"


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / (np.linalg.norm(b.astype(np.float64)) or 1.0))


def _outputs(model_or_path, feeds: list[dict]) -> np.ndarray:
    handle = str(model_or_path) if isinstance(model_or_path, Path) else modelio.to_proto(model_or_path)
    session = make_session(handle, threads=2)
    return np.concatenate([session.run(None, f)[0] for f in feeds])


def light_rows(names: list[str], calib_samples: int) -> list[str]:
    from models.light import build_light

    lines = ["| model | variant | params | % of original | file bytes | output rel. error | refit error "
             "(calib, before → after) | s |", "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    rng = np.random.default_rng(0)
    for name in names:
        path = build_light(name)
        base = modelio.load_model(path)
        Canonicalize()(base)
        shape = tuple(d if isinstance(d, int) else 1 for d in base.graph.inputs[0].shape)
        input_name = base.graph.inputs[0].name
        held_out = [{input_name: rng.standard_normal(shape).astype(np.float32)} for _ in range(4)]
        reference = _outputs(path, held_out)
        params0 = count_params(base)
        lines.append(f"| {name} | original | {params0:,} | 100.0 % | {path.stat().st_size:,} | 0 | | |")
        variants = [(k, False) for k in (0, 1, 2)] + [(2, True)]
        for through, refit in variants:
            model = base.clone()
            context = PassContext()
            if refit:
                feeds = [{input_name: rng.standard_normal(shape).astype(np.float32)} for _ in range(calib_samples)]
                context = PassContext(calib=Dataset(feeds=feeds, source="random images"), teacher=base, threads=2)
            start = time.perf_counter()
            result = Gap(Gap.Options(head=True, through=through, refit=refit), context)(model)
            seconds = time.perf_counter() - start
            head = next((r for r in result.rows if r.get("rewrite") == "head→GAP"), None)
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "m.onnx"
                modelio.save_model(model, out)
                size = sum(p.stat().st_size for p in Path(tmp).iterdir())
                error = _rel(_outputs(out, held_out), reference)
            params = count_params(model)
            fit = "" if not head or head["rel_error"] is None else \
                f"{head['rel_error_before']:.3g} → {head['rel_error']:.3g} ({calib_samples} imgs)"
            label = f"head, through={through}" + (", refit" if refit else "") + \
                (f" (replaced {'+'.join(head['replaced'])})" if head else " (no head found)")
            lines.append(f"| {name} | {label} | {params:,} | {100 * params / params0:.1f} % | {size:,} | "
                         f"{error:.3g} | {fit} | {seconds:.1f} |")
            del model
    return lines


def _accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    logits = make_session(str(path), threads=2).run(None, {"input": x})[0]
    return float((logits.argmax(1) == y).mean())


def _digits_names() -> list[str]:
    model = modelio.load_model(DIGITS / "digits.onnx")
    return [n.name for n in model.graph if n.op_type in ("Conv", "Gemm")]


def digits_rows() -> list[str]:
    test = np.load(DIGITS / "test.npz")
    x, y = test["input"], test["labels"]
    linear = _digits_names()
    base = "fold_batchnorm"
    recipes: list[tuple[str, list]] = [
        ("float (BN folded)", [base]),
        ("gap head, no refit", [base, {"gap": {"head": True, "refit": False}}]),
        ("gap head + refit", [base, {"gap": {"head": True}}]),
        ("gap head through=1 + refit", [base, {"gap": {"head": True, "through": 1}}]),
        ("gap head, no refit → distill", [base, {"gap": {"head": True, "refit": False}}, "distill"]),
        ("gap head + refit → distill", [base, {"gap": {"head": True}}, "distill"]),
    ]
    for sparsity, bits in ((0.7, 4), (0.8, 3)):
        prune = {"prune": {"sparsity": sparsity}}
        kmeans = {"kmeans": {"bits": bits}}
        tag = f"prune {sparsity:.0%} → kmeans {bits}"
        recipes += [(tag, [base, prune, kmeans]),
                    (tag.replace(" → ", " → distill → "), [base, prune, "distill", kmeans]),
                    (tag.replace(" → ", " → distill(all layers) → "),
                     [base, prune, {"distill": {"layers": linear}}, kmeans])]
    for ratio in (0.3, 0.5):
        cp = {"channel_prune": {"ratio": ratio, "repair": False}}
        tag = f"channel_prune {ratio:.0%}"
        recipes += [(f"{tag} (no repair)", [base, cp]),
                    (f"{tag} → distill", [base, cp, "distill"]),
                    (f"{tag} → distill(all layers)", [base, cp, {"distill": {"layers": linear}}]),
                    (f"{tag} with its own repair", [base, {"channel_prune": {"ratio": ratio, "repair": True}}])]
    original = _accuracy(DIGITS / "digits.onnx", x, y)
    lines = [f"Original digits.onnx: test accuracy {original:.2%} (360 samples); calibration: calib.npz "
             "(200 samples, disjoint from test). Gate opened (max_drop=1): every pass is kept. "
             "distill(all layers): every Conv/Gemm named, refit upstream first.", "",
             "| recipe | test acc. | drop (pt) | params | file bytes | passes (status) | s |",
             "| --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    run = RunOptions(threads=2, latency=False, progress=False)
    for label, steps in recipes:
        wanted = [s if isinstance(s, str) else next(iter(s)) for s in steps]
        missing = [w for w in wanted if w not in REGISTRY]
        if missing:
            lines.append(f"| {label} | pass not available ({', '.join(missing)}) | | | | | |")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "m.onnx"
            start = time.perf_counter()
            report = optimize(DIGITS / "digits.onnx", out, passes=steps, calib=DIGITS / "calib.npz",
                              data=DIGITS / "test.npz", max_drop=1.0, run=run)
            seconds = time.perf_counter() - start
            acc = _accuracy(out, x, y)
            params = count_params(modelio.load_model(out))
            size = out.stat().st_size
        statuses = ", ".join(f"{r.step.split(':')[0]}={r.status}" for r in report.passes[1:]
                             if r.step.split(":")[0] not in ("canonicalize", "cleanup"))
        lines.append(f"| {label} | {acc:.2%} | {100 * (original - acc):+.2f} | {params:,} | {size:,} | "
                     f"{statuses} | {seconds:.1f} |")
    lines += ["", "After channel_prune, layers whose output channels were cut no longer match the teacher's values "
              "(another channel count): distill skips them with a note and refits the layers whose outputs are "
              "whole (here fc2), so distill(all layers) equals distill there."]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--light", default="vgg19,bvlc_alexnet", help="light topologies ('' to skip)")
    parser.add_argument("--calib", type=int, default=48, help="random calibration images for the refit row")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    lines = ["# gap and distill", "", "Reproduce: `python bench/gap_distill_bench.py`.", "",
             "## Head substitution on VGG-19 / AlexNet (seeded random weights)", ""]
    names = [n for n in args.light.split(",") if n]
    lines += light_rows(names, args.calib) if names else ["(skipped)"]
    lines += ["", "## Digits: gap head, distill after lossy passes", ""]
    lines += digits_rows()
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gap_distill_bench.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
