"""graphopt quantize against onnxruntime's stock quantizers, on the same calibration data, 1 thread.

For each model: graphopt.optimize with the recipe "fold_batchnorm; fuse; quantize" (max_drop 0.01; the light
topologies, whose random weights make top-1 meaningless, run with the accuracy budget off (snr metric,
min_snr_db=-100): any int8 form of their near-uniform softmax output measures about 9 dB, onnxruntime's included,
and its worst class channel far less; the SNR column shows the cost), and onnxruntime 1.32's stock flow:
quant_pre_process, then quantize_static (QDQ, per-channel, MinMax) with uint8 (U8S8) and int8 (S8S8) activations,
and quantize_dynamic (int8 weights). All variants and the float model are timed in one process, interleaved
(graphopt.bench.benchmark, 1 thread, median). Build failures are reported as rows. Quality: digits test accuracy;
ResNet-50/VGG-19 output SNR vs float; PP-OCRv4 rec exact-line accuracy and CER on rendered lines; PP-OCR cls
accuracy and agreement with float; PP-OCRv4 det probability-map agreement with float and box F1.

    python bench/quantize_vs_ort.py [--models digits resnet50 vgg19 rec cls det] [--repeats 20]
Writes bench/results/quantize_vs_ort.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graphopt import bench, formatting, modelio  # noqa: E402
from graphopt.errors import first_line  # noqa: E402
from graphopt.pipeline import RunOptions, machine_line, optimize  # noqa: E402
from graphopt.runtime import make_session  # noqa: E402

RESULTS = ROOT / "bench" / "results"
RECIPE = "fold_batchnorm; fuse; quantize"


class CalibReader:
    """onnxruntime's CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds, self.i = feeds, 0

    def get_next(self):
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def rewind(self) -> None:
        self.i = 0


def first_line_of(err: BaseException) -> str:
    return first_line(err, limit=160)


def ort_variants(src: Path, calib: list[dict], tmp: Path) -> dict[str, tuple[Path | None, float, str]]:
    """label → (path or None, build seconds, error) for onnxruntime's stock quantizers."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out: dict[str, tuple[Path | None, float, str]] = {}
    pre = tmp / "pre.onnx"
    start = time.perf_counter()
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
    except Exception as err:  # noqa: BLE001 - reported as a row
        pre_err = first_line_of(err)
        pre = src
        print(f"  quant_pre_process failed ({pre_err}); using the original", file=sys.stderr)
    pre_s = time.perf_counter() - start
    for label, act in (("ort static U8S8", QuantType.QUInt8), ("ort static S8S8", QuantType.QInt8)):
        dest = tmp / f"{label.replace(' ', '_')}.onnx"
        start = time.perf_counter()
        try:
            quantize_static(str(pre), str(dest), CalibReader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=act, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
            make_session(str(dest))
            out[label] = (dest, pre_s + time.perf_counter() - start, "")
        except Exception as err:  # noqa: BLE001
            out[label] = (None, pre_s + time.perf_counter() - start, first_line_of(err))
    dest = tmp / "ort_dynamic.onnx"
    start = time.perf_counter()
    try:
        quantize_dynamic(str(pre), str(dest), weight_type=QuantType.QInt8)
        make_session(str(dest))
        out["ort dynamic"] = (dest, pre_s + time.perf_counter() - start, "")
    except Exception as err:  # noqa: BLE001
        out["ort dynamic"] = (None, pre_s + time.perf_counter() - start, first_line_of(err))
    return out


# ---------------------------------------------------------------- models: (path, calib, eval, quality fn, options)


def _snr_db(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    num = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in ref)
    den = sum(float(np.sum((r.astype(np.float64) - g) ** 2)) for r, g in zip(ref, got))
    return 10 * np.log10(num / max(den, 1e-30))


def _outputs(path: Path, feeds: list[dict]) -> list[np.ndarray]:
    sess = make_session(str(path))
    return [sess.run(None, f)[0] for f in feeds]


def setup(name: str, tmp: Path) -> dict[str, Any]:
    if name == "digits":
        d = ROOT / "models" / "digits"
        calib = np.load(d / "calib.npz")
        test = np.load(d / "test.npz")
        cal_feeds = [{"input": calib["input"][i:i + 32]} for i in range(0, len(calib["input"]), 32)]

        def quality(path: Path, ref: Path) -> dict[str, float]:
            out = make_session(str(path)).run(None, {"input": test["input"]})[0]
            return {"test acc": float((out.argmax(1) == test["labels"]).mean())}

        return dict(path=d / "digits.onnx", calib=cal_feeds, bench=[{"input": test["input"][:1]}],
                    optimize=dict(calib=d / "calib.npz", data=d / "test.npz", metric="accuracy"),
                    quality=quality, key="test acc")
    if name in ("resnet50", "vgg19"):
        from models.light import build_light

        path = build_light(name)
        m = modelio.load_model(path)
        rng = np.random.default_rng(0)
        inp = m.graph.inputs[0].name
        n_cal = 16 if name == "resnet50" else 8
        feeds = [{inp: rng.standard_normal((1, 3, 224, 224)).astype(np.float32)} for _ in range(n_cal + 4)]
        cal, ev = feeds[:n_cal], feeds[n_cal:]

        def quality(p: Path, ref: Path) -> dict[str, float]:
            return {"SNR dB": _snr_db(_outputs(ref, ev), _outputs(p, ev))}

        return dict(path=path, calib=cal, bench=ev[:2], quality=quality, key="SNR dB",
                    optimize=dict(calib=cal, data=ev, metric="snr"), passes_opts="min_snr_db=-100")
    from bench import ocr
    from models.fetch import fetch_ocr_models

    path = fetch_ocr_models()[name]
    if name == "rec":
        cal, _ = ocr.make_rec_data(64, 1)
        ev, texts = ocr.make_rec_data(150, 2)

        def quality(p: Path, ref: Path) -> dict[str, float]:
            s = ocr.score_rec(str(p), ev, texts)
            return {"line acc": s["line_acc"], "CER": s["cer"]}

        return dict(path=path, calib=cal, bench=ev[:4], quality=quality, key="line acc",
                    optimize=dict(calib=cal, data=ev[:100], metric="agreement"))
    if name == "cls":
        cal, _ = ocr.make_cls_data(64, 1)
        ev, labels = ocr.make_cls_data(200, 2)

        def quality(p: Path, ref: Path) -> dict[str, float]:
            a, b = _outputs(ref, ev), _outputs(p, ev)
            return {"acc": ocr.score_cls(str(p), ev, labels)["acc"],
                    "agree": float(np.mean([x.argmax() == y.argmax() for x, y in zip(a, b)]))}

        return dict(path=path, calib=cal, bench=ev[:4], quality=quality, key="agree",
                    optimize=dict(calib=cal, data=ev[:100], metric="agreement"))
    cal, _ = ocr.make_det_data(8, 1)
    ev, boxes = ocr.make_det_data(8, 2)

    def quality(p: Path, ref: Path) -> dict[str, float]:
        s = ocr.score_det(str(p), str(ref), ev, boxes)
        return {"map agree": s["map_agree"], "box F1": s["f1"]}

    return dict(path=path, calib=cal, bench=ev[:2], quality=quality, key="map agree",
                optimize=dict(calib=cal, data=ev, metric="snr", min_snr=15.0), passes_opts="min_snr_db=15")


def rotated_bench(paths: list[str], labels: list[str], feeds: list[dict], repeats: int, min_time_s: float
           ) -> dict[str, bench.BenchRow]:
    """bench.benchmark once per rotation of the variants after float (paths[0]), forward and reversed: a model's
    time depends on which model ran just before it (measured on digits: the same int8 model is 3% faster after
    another small int8 model than after float or dynamic int8, and a fixed order always gives it the same
    predecessor), so every variant gets every predecessor equally often. Each label's median is the median over
    the orders' medians; min_time_s (split over the orders) gives a 0.1 ms model the thousands of rounds its
    median needs."""
    rest = list(range(1, len(paths)))
    orders = [[0, *seq[k:], *seq[:k]] for seq in (rest, rest[::-1]) for k in range(len(rest))] or [[0]]
    per: dict[str, list[float]] = {label: [] for label in labels}
    first: dict[str, bench.BenchRow] = {}
    for k, idx in enumerate(orders):
        rows = bench.benchmark([paths[i] for i in idx], feeds, threads=1, warmup=3 if k == 0 else 1,
                               repeats=max(repeats // len(orders), 3), labels=[labels[i] for i in idx],
                               min_time_s=min_time_s / len(orders), stats=k == 0)
        first = first or {r.label: r for r in rows}
        for r in rows:
            per[r.label].append(r.median_ms)
    for label, row in first.items():
        row.median_ms = float(np.median(per[label]))
        row.ratio = row.median_ms / float(np.median(per[labels[0]]))
    return first


def run_model(name: str, repeats: int, lines: list[str], min_time_s: float = 5.0) -> None:
    with tempfile.TemporaryDirectory(prefix=f"qbench-{name}-") as tmpdir:
        tmp = Path(tmpdir)
        cfg = setup(name, tmp)
        src = Path(cfg["path"])
        variants: dict[str, tuple[Path | None, float, str]] = {"float": (src, 0.0, "")}
        out = tmp / "graphopt.onnx"
        opts = cfg.get("passes_opts")
        recipe = RECIPE + (f":{opts}" if opts else "")
        start = time.perf_counter()
        note = ""
        try:
            kw = dict(cfg["optimize"])
            report = optimize(str(src), out, passes=recipe, max_drop=0.01,
                              run=RunOptions(progress=False, latency=False), **kw)
            q = next(p for p in report.passes if p.step.startswith("quantize"))
            note = f"quantize {q.status}" + (f" ({q.reason})" if q.reason else "")
            picked = [n for n in q.notes if "exclude_nodes=" in n or "whole model" in n or "whole-model" in n
                      or n.startswith("bias correction")]
            if picked:
                note += "; " + "; ".join(n[:200] for n in picked)
            variants["graphopt"] = (out, time.perf_counter() - start, "")
        except Exception as err:  # noqa: BLE001
            traceback.print_exc()
            variants["graphopt"] = (None, time.perf_counter() - start, first_line_of(err))
        variants.update(ort_variants(src, cfg["calib"], tmp))
        ok = {k: v for k, v in variants.items() if v[0] is not None}
        timing = rotated_bench([str(v[0]) for v in ok.values()], list(ok), cfg["bench"], repeats, min_time_s)
        lines.append(f"\n### {name}\n")
        if note:
            lines.append(f"graphopt: {note}\n")
        lines.append("| variant | median ms | vs float | size | quality | build s |")
        lines.append("| --- | ---: | ---: | ---: | --- | ---: |")
        for label, (path, secs, err) in variants.items():
            if path is None:
                lines.append(f"| {label} | build failed: {err} | | | | {secs:.1f} |")
                continue
            try:
                qual = cfg["quality"](path, src)
                qtext = ", ".join(f"{k} {v:.3f}" if k != "SNR dB" else f"{k} {v:.1f}" for k, v in qual.items())
            except Exception as err:  # noqa: BLE001
                qtext = f"failed: {first_line_of(err)}"
            r = timing[label]
            lines.append(f"| {label} | {r.median_ms:.2f} | {r.ratio:.2f}x | {formatting.human(r.file_bytes, 'B')} | "
                         f"{qtext} | {secs:.1f} |")
        print("\n".join(lines[-(len(variants) + 4):]), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(ALL),
                        help=f"models to run, space- or comma-separated (of {', '.join(ALL)})")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--min-time", type=float, default=5.0,
                        help="timed seconds at least per model's benchmark (rounds continue past --repeats)")
    parser.add_argument("--out", default=str(RESULTS / "quantize_vs_ort.md"))
    args = parser.parse_args(argv)
    import onnxruntime

    lines = ["## Quantization: graphopt vs onnxruntime's stock quantizers", "",
             f"Machine: {machine_line()}; onnxruntime {onnxruntime.__version__}, 1 thread, models interleaved "
             f"(median of {args.repeats}+ rounds and at least {args.min_time:g} s, split over the rotations of the "
             "variants' order, forward and reversed: a model's time depends on the model run just before it). "
             f"graphopt: `{RECIPE}`, max_drop 0.01, target=latency (measured placement; activation type "
             "auto: uint8 or int8, whichever whole model measures faster; bias_correction on, so the accuracy "
             "budget judges bias-corrected candidates), its own gate. onnxruntime: "
             "quant_pre_process, then QDQ per-channel MinMax static "
             "(U8S8, S8S8) and quantize_dynamic, same calibration feeds.",
             f"Command: `python bench/quantize_vs_ort.py [--models ...] --repeats {args.repeats} --min-time "
             f"{args.min_time:g}` (each model's "
             "section is rewritten when that model is run). Float latencies differ between sections: the machine "
             "was shared with other jobs; compare ratios, which are interleaved within a section."]
    def one(name: str) -> str:  # a failure keeps the lines the model wrote before it
        section: list[str] = []
        try:
            run_model(name, args.repeats, section, args.min_time)
        except Exception as err:  # noqa: BLE001
            traceback.print_exc()
            section.append(f"\n### {name}\n\nbenchmark failed: {first_line_of(err)}")
        return "\n".join(section)

    write_sections(Path(args.out), lines, [m.strip() for arg in args.models for m in arg.split(",") if m.strip()],
                   ALL, one)
    return 0


ALL = ("digits", "resnet50", "vgg19", "rec", "cls", "det")


def write_sections(out: Path, head: list[str], names: list[str], known: tuple[str, ...], run) -> None:
    """Run each model's section (``run(name)`` → Markdown) and rewrite ``out`` after each, keeping the sections
    of models not run this time; a model that fails becomes a one-line section, the others still run."""
    kept = _sections(out.read_text()) if out.exists() else {}
    for name in names:
        try:
            kept[name] = run(name).strip("\n")
        except Exception as err:  # noqa: BLE001 - one model failing is a row, the others still run
            traceback.print_exc()
            kept[name] = f"### {name}\n\nbenchmark failed: {first_line_of(err)}"
        out.parent.mkdir(parents=True, exist_ok=True)
        order = [m for m in known if m in kept] + [m for m in kept if m not in known]
        out.write_text("\n".join(head) + "\n\n" + "\n\n".join(kept[m] for m in order) + "\n")


def _sections(text: str) -> dict[str, str]:
    """Model sections of an earlier results file (re-running one model keeps the others)."""
    found: dict[str, str] = {}
    for chunk in text.split("\n### ")[1:]:
        name = chunk.split("\n", 1)[0].strip()
        found[name] = "### " + chunk.strip("\n")
    return found


if __name__ == "__main__":
    sys.exit(main())
