"""Measure each `fuse` family on the PP-OCR models: 1-thread latency and output difference vs the original.

For det/rec/cls: canonicalize, then one variant per fusion family that fires (``only=[family]``), the
HardSwish forms for opset 13 (x*HardSigmoid(x) vs upgrading to opset 14 for a HardSwish op), and the
defaults; rec is also measured upgraded to opset 17 (LayerNorm needs it). Families the PP-OCR models lack
(GELU, Mish) are timed on a synthetic [1, 64, 56, 56] graph. Feeds: rendered text from bench/ocr.py.
Latency: graphopt.bench.benchmark (interleaved rounds, median). Run:
``python bench/fuse_bench.py [--repeats 50] [--models det,rec,cls] [--out bench/results]``. Prints a Markdown
table and writes it to bench/results/fuse_bench.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx_ir as ir

from graphopt import bench, modelio
from graphopt.passes.canonicalize import Canonicalize
from graphopt.passes.fuse import FAMILIES, Fuse
from graphopt.runtime import make_session

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"det": (1, 3, 480, 640), "rec": (1, 3, 48, 320), "cls": (1, 3, 48, 192)}


def _feeds(key: str) -> list[dict[str, np.ndarray]]:
    """Rendered text lines/pages (realistic activations); random inputs if bench/ocr.py cannot render."""
    try:
        from bench import ocr

        make = {"det": ocr.make_det_data, "rec": ocr.make_rec_data, "cls": ocr.make_cls_data}[key]
        return make(2, 0)[0]
    except Exception as err:  # noqa: BLE001 - fonts/PIL missing: timing does not depend on the pixels
        print(f"(random {key} inputs: {err})", file=sys.stderr)
        rng = np.random.default_rng(0)
        return [{"x": rng.standard_normal(SHAPES[key]).astype(np.float32)} for _ in range(2)]


def _models(names: Sequence[str]) -> dict[str, str]:
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from models.fetch import fetch_ocr_models

    found = fetch_ocr_models()
    return {k: str(found[k]) for k in names}


def _copy(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(modelio.to_proto(model))


def _variants(base: ir.Model, key: str) -> dict[str, tuple[ir.Model, int]]:
    """label → (fused copy, fused sites); families that find nothing are left out."""
    out: dict[str, tuple[ir.Model, int]] = {}
    if key == "rec":  # LayerNormalization needs opset 17: time the upgraded model with and without it
        op17 = _copy(base)
        Canonicalize(Canonicalize.Options(opset=17))(op17)  # upgrade, then infer shapes again
        out["opset17"] = (op17, 1)
        for label, options in {"opset17 layernorm": Fuse.Options(only=["layernorm"]),
                               "opset17 defaults": Fuse.Options()}.items():
            fused = _copy(op17)
            out[label] = (fused, len(Fuse(options)(fused).rows))
    configs: dict[str, Fuse.Options] = {f: Fuse.Options(only=[f]) for f in FAMILIES}
    configs["hardswish(upgrade 14)"] = Fuse.Options(only=["hardswish"], hardswish_below_14="upgrade")
    configs["hardswish+conv_affine"] = Fuse.Options(only=["hardswish", "conv_affine"])
    configs["silu(contrib)"] = Fuse.Options(only=["silu"], contrib_ops=True)
    configs["defaults"] = Fuse.Options()
    configs["defaults+upgrade14"] = Fuse.Options(hardswish_below_14="upgrade")
    for label, options in configs.items():
        model = _copy(base)
        result = Fuse(options)(model)
        sites = sum(1 for r in result.rows if "change" not in r)
        if sites:
            out[label] = (model, sites)
    return out


def _max_diff(ref: list[np.ndarray], got: list[np.ndarray]) -> tuple[float, float]:
    abs_diff = max(float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in zip(ref, got))
    scale = max(float(np.max(np.abs(a))) for a in ref)
    return abs_diff, abs_diff / max(scale, 1e-12)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--models", default="det,rec,cls")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    table = ["| model | variant | sites | median ms | ratio | max abs diff | rel diff |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    print("\n".join(table))
    for key, path in _models(args.models.split(",")).items():
        base = modelio.load_model(path)
        Canonicalize()(base)
        variants = _variants(base, key)
        feeds = _feeds(key)
        ref = make_session(base).run(None, feeds[0])
        labels = ["original", *variants]
        models = [base, *(m for m, _ in variants.values())]
        rows = bench.benchmark(models, feeds, threads=1, warmup=3, repeats=args.repeats, labels=labels)
        for row, model in zip(rows, models):
            sites = variants[row.label][1] if row.label in variants else 0
            abs_d, rel_d = _max_diff(ref, make_session(model).run(None, feeds[0]))
            _emit(table, f"| {key} | {row.label} | {sites} | {row.median_ms:.2f} | {row.ratio:.3f} | {abs_d:.2e} | "
                  f"{rel_d:.2e} |")
    _synthetic(args.repeats, table)
    _write(args, table)
    return 0


def _emit(table: list[str], line: str) -> None:
    table.append(line)
    print(line, flush=True)


def _write(args: argparse.Namespace, table: list[str]) -> None:
    command = f"python bench/fuse_bench.py --repeats {args.repeats} --models {args.models}"
    text = ["## Float fusions on the PP-OCR models (fuse)", "",
            f"Machine: {bench.machine_summary()}. Command: `{command}`.", "",
            "Each variant is the canonicalized model with one fusion family (`fuse:only=[family]`) or the defaults; "
            "families that fire nowhere are left out. median ms: 1-thread latency (graphopt.bench.benchmark, "
            "interleaved rounds, median), ratio to the canonicalized original; diffs: the first feed's outputs "
            "against the original. Feeds: rendered text from bench/ocr.py (det 480x640 page, rec 48-px line, "
            "cls 48x192). GELU and Mish do not occur in PP-OCR: timed on a synthetic [1, 64, 56, 56] graph.", "",
            *table, ""]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fuse_bench.md").write_text("\n".join(text))


def _synthetic(repeats: int, table: list[str]) -> None:
    """GELU (opset 20) and Mish (opset 18) spelled out on a [1, 64, 56, 56] tensor vs fused."""
    from onnx import helper

    def model(nodes: list, opset: int) -> ir.Model:
        consts = {"half": 0.5, "one": 1.0, "sqrt2": float(np.sqrt(2.0))}
        inits = [helper.make_tensor(k, 1, [], [v]) for k, v in consts.items()]
        x = helper.make_tensor_value_info("x", 1, [1, 64, 56, 56])
        graph = helper.make_graph(nodes, "g", [x], [helper.make_empty_tensor_value_info("y")], inits)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        proto.ir_version = 10
        return ir.serde.deserialize_model(proto)

    gelu = [helper.make_node("Div", ["x", "sqrt2"], ["q"]), helper.make_node("Erf", ["q"], ["e"]),
            helper.make_node("Add", ["e", "one"], ["t"]), helper.make_node("Mul", ["x", "half"], ["h"]),
            helper.make_node("Mul", ["h", "t"], ["y"])]
    mish = [helper.make_node("Softplus", ["x"], ["p"]), helper.make_node("Tanh", ["p"], ["t"]),
            helper.make_node("Mul", ["x", "t"], ["y"])]
    feeds = [{"x": np.random.default_rng(0).standard_normal((1, 64, 56, 56)).astype(np.float32)}]
    for name, nodes, opset in (("gelu", gelu, 20), ("mish", mish, 18)):
        base = model(nodes, opset)
        fused = _copy(base)
        sites = len(Fuse(Fuse.Options(only=[name]))(fused).rows)
        rows = bench.benchmark([base, fused], feeds, repeats=repeats, labels=["original", name])
        abs_d, rel_d = _max_diff(make_session(base).run(None, feeds[0]), make_session(fused).run(None, feeds[0]))
        for row, n in zip(rows, (0, sites)):
            _emit(table, f"| synthetic {name} | {row.label} | {n} | {row.median_ms:.3f} | {row.ratio:.3f} | "
                  f"{abs_d if n else 0:.2e} | {rel_d if n else 0:.2e} |")


if __name__ == "__main__":
    raise SystemExit(main())
