"""Empirical bias correction (bias_correct) after quantize: accuracy, ops kept float, latency.

Per model, after canonicalize (the teacher), fold_batchnorm and fuse, with the same calibration feeds:
- full int8: quantize target=size with no accuracy budget (every coverable op int8), then + bias_correct;
- budget: quantize with its defaults (target=latency, max_drop 0.01 on the calibration data), then + bias_correct;
- budget after correction: the same (quantize's bias_correction off), but each of the budget's combination
  checks runs bias correction on its candidate before comparing with the float model
  (quantize.placement.accuracy_budget's build wrapped here;
  the single-op sensitivity screen is unchanged), then + bias_correct on the result;
- quantize bias_correction=true: quantize's own option (its default), which does the above by itself.
Quality on held-out data (digits test accuracy; PP-OCRv4 rec exact-line accuracy and CER; det probability-map
agreement and box F1), latency of all variants and the float model interleaved in one process (1 thread).

    python bench/quant_correct_bench.py [--models digits,rec,det] [--repeats 20]
Writes bench/results/quant_correct.md (one section per model, re-running a model rewrites its section).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graphopt import bench, modelio  # noqa: E402
from graphopt import data as datamod  # noqa: E402
from graphopt.options import build_options  # noqa: E402
from graphopt.passbase import PassContext  # noqa: E402
from graphopt.passes.canonicalize import Canonicalize  # noqa: E402
from graphopt.passes.fold_batchnorm import FoldBatchNorm  # noqa: E402
from graphopt.passes.fuse import Fuse  # noqa: E402
from graphopt.passes.quantize import BiasCorrect, Quantize, QuantizeOptions, correct_biases  # noqa: E402
from graphopt.passes.quantize import placement as qp  # noqa: E402
from graphopt.pipeline import machine_line  # noqa: E402
from graphopt.runtime import make_session  # noqa: E402

RESULTS = ROOT / "bench" / "results"
ALL = ("digits", "rec", "det")


def _snr_db(ref_model, model, feeds: list[dict]) -> float:
    """Output SNR of ``model`` against the float model on held-out feeds (first output)."""
    a, b = make_session(modelio.to_proto(ref_model)), make_session(modelio.to_proto(model))
    num = den = 0.0
    for f in feeds:
        r, g = a.run(None, f)[0].astype(np.float64), b.run(None, f)[0].astype(np.float64)
        num, den = num + float(np.sum(r * r)), den + float(np.sum((r - g) ** 2))
    return float(10 * np.log10(num / max(den, 1e-30)))


def setup(name: str) -> dict[str, Any]:
    if name == "digits":
        d = ROOT / "models" / "digits"
        calib, test = np.load(d / "calib.npz"), np.load(d / "test.npz")
        cal = [{"input": calib["input"][i:i + 32]} for i in range(0, len(calib["input"]), 32)]

        def quality(model) -> dict[str, float]:
            out = make_session(modelio.to_proto(model)).run(None, {"input": test["input"]})[0]
            return {"test acc": float((out.argmax(1) == test["labels"]).mean())}

        return dict(path=d / "digits.onnx", calib=cal, bench=[{"input": test["input"][:1]}], metric="agreement",
                    quality=quality, opts={}, snr_feeds=[{"input": test["input"]}])
    from bench import ocr
    from models.fetch import fetch_ocr_models

    path = fetch_ocr_models()[name]
    if name == "rec":
        cal, _ = ocr.make_rec_data(64, 1)
        ev, texts = ocr.make_rec_data(150, 2)

        def quality(model) -> dict[str, float]:
            s = ocr.score_rec(modelio.to_proto(model), ev, texts)
            return {"line acc": s["line_acc"], "CER": s["cer"]}

        return dict(path=path, calib=cal, bench=ev[:4], metric="agreement", quality=quality, opts={},
                    snr_feeds=ev[:50])
    cal, _ = ocr.make_det_data(8, 1)
    ev, boxes = ocr.make_det_data(8, 2)

    def quality(model) -> dict[str, float]:
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "m.onnx"
            modelio.save_model(model, p)
            s = ocr.score_det(str(p), str(path), ev, boxes)
        return {"map agree": s["map_agree"], "box F1": s["f1"]}

    return dict(path=path, calib=cal, bench=ev[:2], metric="snr", quality=quality, opts={"min_snr_db": 15.0})


def _corrected_budget():
    """quantize.placement.accuracy_budget with bias correction inside each combination check."""
    real = qp.accuracy_budget

    def wrapped(context, model, anchors, build, *args, **kwargs):
        def build_corrected(m, keep):
            build(m, keep)
            if len(keep) > 1:  # combination checks (single-op screens stay as they are)
                correct_biases(model, m, context.calib, context.threads)
        return real(context, model, anchors, build_corrected, *args, **kwargs)
    return real, wrapped


def run_model(name: str, repeats: int, full_only: bool = False) -> list[str]:
    cfg = setup(name)
    model = modelio.load_model(cfg["path"])
    float_model = model.clone()
    Canonicalize()(model)
    teacher = model.clone()
    FoldBatchNorm()(model)
    Fuse()(model)
    data = datamod.load_data(cfg["calib"], datamod.input_specs(model))
    variants: dict[str, tuple[Any, str, float]] = {}

    def quantize(label: str, max_drop: float | None, then: bool = True, **opts) -> Any:
        m = model.clone()
        ctx = PassContext(calib=data, teacher=teacher, metric=cfg["metric"], max_drop=max_drop)
        start = time.perf_counter()
        res = Quantize(build_options(QuantizeOptions, {**cfg["opts"], **opts}, "quantize"), ctx)(m)
        secs = time.perf_counter() - start
        static = sum(1 for r in res.rows if r.get("action") == "int8")
        dynamic = sum(1 for r in res.rows if str(r.get("action", "")).startswith("int8 dynamic"))
        int8 = f"{static} static" + (f" + {dynamic} dynamic" if dynamic else "")
        budget = next((n for n in res.notes if n.startswith("accuracy budget")), "")
        kept = budget.split(":")[1].split("(")[0].strip() if ":" in budget else "none kept float for accuracy"
        fixed = sum(1 for r in res.rows if r.get("bias_correction", {}).get("action") == "bias corrected")
        variants[label] = (m, f"{int8} int8; {kept}" + (f"; {fixed} biases corrected" if fixed else ""), secs)
        if not then:
            return res
        start = time.perf_counter()
        c = m.clone()
        r = BiasCorrect(context=PassContext(calib=data, teacher=teacher, threads=1))(c)
        fixed = sum(1 for x in r.rows if x["action"] == "bias corrected")
        variants[label + " + bias_correct"] = (c, f"{int8} int8; {fixed} biases corrected", time.perf_counter() - start)
        return res

    quantize("full int8", None, target="size", bias_correction=False)
    if not full_only:
        quantize("budget", 0.01, bias_correction=False)
        real, wrapped = _corrected_budget()
        qp.accuracy_budget = wrapped
        try:
            quantize("budget checked after correction", 0.01, bias_correction=False)
        finally:
            qp.accuracy_budget = real
        quantize("quantize bias_correction=true (default)", 0.01, then=False)
    labels = ["float", *variants]
    models = [float_model] + [v[0] for v in variants.values()]
    timing = bench.benchmark([modelio.to_proto(m) for m in models], cfg["bench"], threads=1, warmup=3,
                             repeats=repeats, labels=labels)
    lines = [f"### {name}", "", "| variant | ops | quality | median ms | vs float | build s |",
             "| --- | --- | --- | ---: | ---: | ---: |"]
    for label, m, t in zip(labels, models, timing):
        q = cfg["quality"](m)
        qtext = ", ".join(f"{k} {v:.3f}" for k, v in q.items())
        if cfg.get("snr_feeds") and label != "float":
            qtext += f", output SNR {_snr_db(float_model, m, cfg['snr_feeds']):.1f} dB"
        desc, secs = ("", 0.0) if label == "float" else variants[label][1:]
        lines.append(f"| {label} | {desc} | {qtext} | {t.median_ms:.2f} | {t.ratio:.2f}x | {secs:.1f} |")
    print("\n".join(lines), flush=True)
    return lines


def sensitivity_speed(name: str) -> list[str]:
    """quantize's sensitivity screen on ``name`` with and without prefix reuse: same rows? how long?"""
    from graphopt import sensitivity as sens
    from graphopt.pipeline import RunOptions, optimize

    cfg = setup(name)
    real = sens.measure
    out: dict[bool, dict] = {}
    for reuse in (True, False):
        def patched(*args, reuse=reuse, **kwargs):
            start = time.perf_counter()
            table = real(*args, **{**kwargs, "reuse_prefix": reuse})
            out[reuse] = {"seconds": time.perf_counter() - start, "rows": [(r.key, r.drop, r.worst_snr_db)
                                                                           for r in table]}
            return table
        sens.measure = patched
        try:
            extra = "".join(f",{k}={v}" for k, v in cfg["opts"].items())
            optimize(str(cfg["path"]), None, passes="fold_batchnorm; fuse; quantize:target=size,"
                     f"sensitivity_budget_s=100000{extra}", max_drop=0.01, metric=cfg["metric"],
                     run=RunOptions(progress=False, latency=False), calib=cfg["calib"], data=cfg["calib"][:32])
        finally:
            sens.measure = real
    a, b = out[True]["rows"], out[False]["rows"]
    same = [r[0] for r in a] == [r[0] for r in b]
    drop = max((abs((x[1] or 0.0) - (y[1] or 0.0)) for x, y in zip(sorted(a), sorted(b))), default=0.0)
    snr = max((abs(x[2] - y[2]) for x, y in zip(sorted(a), sorted(b))), default=0.0)
    return [f"### sensitivity screen speed: {name}", "",
            f"quantize target=size, no time budget: {len(a)} single-op candidates, each against the float model on "
            "16 calibration samples. Whole clones (before) vs edited suffix on captured prefix values (now), one "
            "after the other in one process.", "",
            "| measure() | seconds | same ranking | max drop diff | max SNR diff dB |", "| --- | ---: | --- | ---: | ---: |",
            f"| whole clones | {out[False]['seconds']:.1f} | | | |",
            f"| suffix (reuse_prefix) | {out[True]['seconds']:.1f} | {same} | {drop:.2g} | {snr:.2g} |"]


def _sections(text: str) -> dict[str, str]:
    return {c.split("\n", 1)[0].strip(): "### " + c.strip("\n") for c in text.split("\n### ")[1:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(ALL))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--full-only", default="", help="models run with the full-int8 variants only (e.g. det)")
    parser.add_argument("--out", default=str(RESULTS / "quant_correct.md"))
    parser.add_argument("--sensitivity", action="store_true", help="time the sensitivity screen instead "
                        "(writes bench/results/quant_correct_sensitivity.md)")
    args = parser.parse_args(argv)
    if args.sensitivity:
        lines = ["## Quantization: sensitivity screen speed", "", f"Machine: {machine_line()}; 1 thread; shared "
                 "machine, so seconds are indicative, the equality of rows is exact.",
                 f"Command: `python bench/quant_correct_bench.py --sensitivity --models {args.models}`", ""]
        for name in args.models.split(","):
            lines += sensitivity_speed(name.strip()) + [""]
        (RESULTS / "quant_correct_sensitivity.md").write_text("\n".join(lines))
        return 0
    head = ["## Quantization: empirical bias correction (bias_correct)", "",
            f"Machine: {machine_line()}; 1 thread, variants and float interleaved (median of {args.repeats}+ "
            "rounds). Before quantize: canonicalize (the teacher), fold_batchnorm, fuse. 'full int8': quantize "
            "target=size, no accuracy budget. 'budget': quantize defaults (target=latency, max_drop 0.01 on "
            "calibration data), bias_correction=false. 'budget checked after correction': the budget's "
            "combination checks correct biases first (32 samples, wrapped here). 'quantize bias_correction=true': "
            "quantize's own option (checks corrected on 8 samples, the result on 32). '+ bias_correct': its "
            "defaults (one layer per wave, 32 calibration samples). ops: int8 rows of quantize, and "
            "the budget's float count. Quality on held-out data.",
            f"Command: `python bench/quant_correct_bench.py --models {args.models} --repeats {args.repeats}"
            + (f" --full-only {args.full_only}" if args.full_only else "") + "`"]
    out = Path(args.out)
    kept = _sections(out.read_text()) if out.exists() else {}
    for name in args.models.split(","):
        kept[name] = "\n".join(run_model(name.strip(), args.repeats, name in args.full_only.split(",")))
        order = [m for m in ALL if m in kept] + [m for m in kept if m not in ALL]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(head) + "\n\n" + "\n\n".join(kept[m] for m in order) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
