"""int8 across CPUs: full-range vs pair-safe (portable) weights, and onnxruntime with and without reduce_range.

For each model, every op int8 (``quantize:target=size``, so both weight kinds quantize the same ops):
- quality and latency ratio to float on this host (interleaved, as in quantize_vs_ort.py);
- the emulated AVX2 quality: :func:`graphopt.saturation_check.emulate` writes the model an AVX2 CPU (no VNNI)
  computes, and the same quality function scores it. On a host whose int8 kernels do not saturate (VNNI/AMX),
  onnxruntime runs the emulated model's integer layers exactly, so the column is the AVX2 result.

Command: ``python bench/int8_cpus.py [--models digits resnet50 rec cls det]``; writes
``bench/results/int8_cpus.md`` (a model's section is rewritten when that model runs).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.quantize_vs_ort import RESULTS, CalibReader, first_line_of, rotated_bench, setup, write_sections  # noqa: E402
from graphopt import cpu, modelio  # noqa: E402
from graphopt.pipeline import RunOptions, machine_line, optimize  # noqa: E402
from graphopt.saturation_check import emulate, find_layers  # noqa: E402

ALL = ("digits", "resnet50", "rec", "cls", "det")
RECIPE = "fold_batchnorm; fuse; quantize:target=size"


def _graphopt(cfg: dict, src: Path, out: Path, target: str) -> Path:
    opts = cfg.get("passes_opts")
    kw = dict(cfg["optimize"])
    kw.pop("min_snr", None)
    optimize(str(src), out, passes=RECIPE + (f",{opts}" if opts else ""), max_drop=1.0, target_cpu=target,
             run=RunOptions(progress=False, latency=False), **kw)
    return out


def _ort(src: Path, calib: list[dict], out: Path, reduce_range: bool) -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
    except Exception:  # noqa: BLE001 - as quantize_vs_ort.py: quantize the original then
        pre = src
    quantize_static(str(pre), str(out), CalibReader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=reduce_range,
                    calibrate_method=CalibrationMethod.MinMax)
    return out


def _quality(cfg: dict, path: Path, src: Path) -> str:
    qual = cfg["quality"](path, src)
    return ", ".join(f"{k} {v:.1f}" if k == "SNR dB" else f"{k} {v:.3f}" for k, v in qual.items())


def run_model(name: str, repeats: int, min_time_s: float) -> list[str]:
    with tempfile.TemporaryDirectory(prefix=f"int8cpu-{name}-") as tmpdir:
        tmp = Path(tmpdir)
        cfg = setup(name, tmp)
        src = Path(cfg["path"])
        builders = {"graphopt full range (target vnni)": lambda p: _graphopt(cfg, src, p, "vnni"),
                    "graphopt portable (pair-safe)": lambda p: _graphopt(cfg, src, p, "portable"),
                    "ort U8S8": lambda p: _ort(src, cfg["calib"], p, False),
                    "ort U8S8 reduce_range": lambda p: _ort(src, cfg["calib"], p, True)}
        paths: dict[str, Path] = {"float": src}
        errors: dict[str, str] = {}
        for i, (label, build) in enumerate(builders.items()):
            try:
                paths[label] = build(tmp / f"v{i}.onnx")
            except Exception as err:  # noqa: BLE001 - reported as a row
                traceback.print_exc()
                errors[label] = first_line_of(err)
        timing = rotated_bench([str(p) for p in paths.values()], list(paths), cfg["bench"], repeats, min_time_s)
        lines = [f"\n### {name}\n", "| variant | vs float (host) | quality on host | layers at risk on AVX2 | "
                 "quality emulated on AVX2 |", "| --- | ---: | --- | ---: | --- |"]
        for label, path in paths.items():
            host_q = _quality(cfg, path, src)
            if label == "float":
                lines.append(f"| float | 1.00x | {host_q} | - | - |")
                continue
            model = modelio.load_model(path)
            layers = find_layers(model)
            risky = sum(1 for layer in layers if layer.risky)
            emu_path = tmp / f"emu_{len(lines)}.onnx"
            modelio.save_model(emulate(model, counts=False), emu_path)
            lines.append(f"| {label} | {timing[label].ratio:.2f}x | {host_q} | {risky} of {len(layers)} | "
                         f"{_quality(cfg, emu_path, src)} |")
        for label, err in errors.items():
            lines.append(f"| {label} | build failed: {err} | | | |")
        print("\n".join(lines), flush=True)
        return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(ALL))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--min-time", type=float, default=3.0)
    parser.add_argument("--out", default=str(RESULTS / "int8_cpus.md"))
    args = parser.parse_args(argv)
    if cpu.host().isa not in ("vnni", "amx"):
        print(f"note: this host's int8 kernels ({cpu.host().isa}) saturate: the host columns are AVX2 numbers and "
              "the emulated column double-counts clipping for full-range weights", file=sys.stderr)
    head = ["## int8 across CPUs", "",
            f"Machine: {machine_line()}; onnxruntime 1 thread, interleaved. Recipe `{RECIPE}` (every op int8, "
            "bias correction on) with `--target-cpu vnni` (full-range int8 weights) and `portable` (pair-safe: "
            "no int16 pair sum of an AVX2 u8×s8 kernel can overflow); onnxruntime `quantize_static` QDQ U8S8 per "
            "channel, MinMax, same calibration feeds, with and without `reduce_range` (7-bit weights). "
            "'Emulated on AVX2': `graphopt.saturation_check.emulate` (checked against onnxruntime under "
            "`qemu-x86_64 -cpu Haswell`: digits ORT U8S8 98.33% both, graphopt vnni 98.06% both, portable 99.72% "
            "both). Command: `python bench/int8_cpus.py --models " + " ".join(ALL) + "`."]
    write_sections(Path(args.out), head, args.models, ALL, lambda name: "\n".join(run_model(name, args.repeats, args.min_time)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
