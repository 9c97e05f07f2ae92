"""graphopt on a BERT-base-sized encoder (issue 16's "Done when"): int8, 4-bit MatMulNBits and FFN/head pruning
against float and onnxruntime's own quantize_dynamic, at 1 thread, batch 1, sequence 128.

The model and rows come from `bench/encoder_models.py` (run it first in the torch venv: bench/cache/bert_base.onnx
and bert_base.npz, 64 rows at sequence 128). Every variant is built once into bench/cache/bert_base_runs/ (reused
on later runs; ``--rebuild`` remakes the chosen ones) and then, all together:

- latency: every built variant and float timed in one process, interleaved (graphopt.bench.benchmark: every model
  once per round, in a fresh seeded order), batch 1 on the first ``--bench-rows`` rows; ratio to float's median;
- file size on disk and after lzma (graphopt.bench.file_sizes, one preset for the whole table);
- mean and worst-sample cosine of last_hidden_state to float on all npz rows at batch 1 (graphopt.metrics.vectors:
  per token vector, a sample is the mean over its tokens, padded ones included, as graphopt's gate counts them);
- resident memory of the onnxruntime session: a fresh child process per model reads its VmRSS after importing
  onnxruntime and loading the feeds, creates the session (graphopt.runtime.session_options, 1 thread), runs one
  row, and reads VmRSS again; the difference is reported after glibc's malloc_trim (what the session holds) and
  untrimmed, with the peak (VmHWM).

graphopt variants run graphopt.optimize with the npz as calibration data (``--calib``: the gate's evaluation then
reuses the same rows, and so do the cosines here: there are no other rows) and the step's own max_drop.

    python bench/bert_base.py [--only LABEL ...] [--rebuild] [--build-only | --timing-only] [--bench-rows 4]
                              [--repeats 15]
Writes bench/results/bert_base.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.quantize_vs_ort import RESULTS, first_line_of  # noqa: E402
from graphopt import bench  # noqa: E402
from graphopt.metrics.vectors import VectorCosines  # noqa: E402
from graphopt.pipeline import RunOptions, machine_line, optimize  # noqa: E402
from graphopt.runtime import make_session  # noqa: E402

CACHE = ROOT / "bench" / "cache"
SOURCE, ROWS = CACHE / "bert_base.onnx", CACHE / "bert_base.npz"
RUNS = CACHE / "bert_base_runs"
OUTPUT = "last_hidden_state"


@dataclasses.dataclass(frozen=True)
class Variant:
    label: str
    kind: str  # float | graphopt | ort
    recipe: str = ""  # graphopt: the recipe string
    max_drop: float = 0.01  # graphopt: the run's budget (cosine drop)
    target_cpu: str | None = None  # graphopt: None = graphopt's default (portable)
    base: str = ""  # ort: the label of the variant quantize_dynamic starts from
    per_channel: bool = False  # ort: quantize_dynamic's per_channel

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "_", self.label.lower()).strip("_")


VARIANTS = (
    Variant("float", "float"),
    Variant("fuse", "graphopt", "fuse"),
    Variant("ort quantize_dynamic", "ort", base="float"),
    Variant("ort quantize_dynamic per-channel", "ort", base="float", per_channel=True),
    Variant("ort quantize_dynamic on fuse", "ort", base="fuse"),
    Variant("ort quantize_dynamic per-channel on fuse", "ort", base="fuse", per_channel=True),
    Variant("fuse; quantize", "graphopt", "fuse; quantize"),
    Variant("fuse; quantize (target host)", "graphopt", "fuse; quantize", target_cpu="host"),
    Variant("fuse; quantize_dynamic", "graphopt", "fuse; quantize_dynamic"),
    Variant("fuse; quantize_dynamic (target host)", "graphopt", "fuse; quantize_dynamic", target_cpu="host"),
    Variant("nbits rtn all", "graphopt", "nbits:method=rtn,layers=all", max_drop=1.0),
    Variant("nbits gptq all", "graphopt", "nbits:method=gptq,layers=all", max_drop=1.0),
    Variant("nbits rtn budget", "graphopt", "nbits:method=rtn", max_drop=0.02),
    Variant("nbits gptq budget", "graphopt", "nbits:method=gptq", max_drop=0.02),
    Variant("nbits rtn all + embeddings", "graphopt", "nbits:method=rtn,layers=all,embeddings=true", max_drop=1.0),
    Variant("nbits gptq all + embeddings", "graphopt", "nbits:method=gptq,layers=all,embeddings=true", max_drop=1.0),
    Variant("nbits gptq budget + embeddings", "graphopt", "nbits:method=gptq,embeddings=true", max_drop=0.02),
    Variant("channel_prune 30% MACs", "graphopt", "channel_prune:scope=sensitivity,ratio=0.3", max_drop=1.0),
    # every head group and FFN group loses the same share: 4 of 12 heads and 34% of the FFN neurons
    Variant("channel_prune 34% per group", "graphopt", "channel_prune:ratio=0.34", max_drop=1.0),
    Variant("channel_prune 30% per group", "graphopt", "channel_prune:ratio=0.3", max_drop=1.0),
)
BY_LABEL = {v.label: v for v in VARIANTS}


def path_of(variant: Variant) -> Path:
    return SOURCE if variant.kind == "float" else RUNS / f"{variant.slug}.onnx"


def info_of(variant: Variant) -> Path:
    return RUNS / f"{variant.slug}.json"


# ---------------------------------------------------------------- building


def _steps_summary(report) -> list[str]:
    """One line per step: status, why, and the notes that say what it did."""
    keep = ("int8", "whole model", "accuracy budget", "exclude_nodes", "MatMulNBits", "layer(s)", "groups",
            "MACs", "fused", "not fused", "budget", "slower", "pruned", "heads", "neurons", "nothing")
    out = []
    for row in report.passes[1:]:
        if row.step.startswith(("canonicalize", "cleanup")) and row.status in ("kept", "no change"):
            continue
        ratio = "" if row.latency_ratio is None else f", {row.latency_ratio:.2f}x float in the run"
        line = f"{row.step}: {row.status}{ratio}" + (f" ({row.reason})" if row.reason else "")
        notes = [n for n in row.notes if any(k in n for k in keep)]
        out.append(line + ("; " + "; ".join(n[:300] for n in notes) if notes else ""))
    return out


def build(variant: Variant) -> dict:
    """Build one variant's file; the info dict (seconds, notes or error) is saved beside it."""
    RUNS.mkdir(parents=True, exist_ok=True)
    dest, start = path_of(variant), time.perf_counter()
    info: dict = {"label": variant.label}
    try:
        if variant.kind == "graphopt":
            report = optimize(str(SOURCE), dest, passes=variant.recipe, calib=str(ROWS), max_drop=variant.max_drop,
                              target_cpu=variant.target_cpu, run=RunOptions(progress=False),
                              report_path=RUNS / f"{variant.slug}.report.json")
            info["steps"] = _steps_summary(report)
            info["gate"] = "passed" if report.passed else "FAILED"
        elif variant.kind == "ort":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            base = path_of(BY_LABEL[variant.base])
            if not base.exists():
                raise FileNotFoundError(f"{base}: build {variant.base!r} first")
            quantize_dynamic(str(base), str(dest), weight_type=QuantType.QInt8, per_channel=variant.per_channel,
                             op_types_to_quantize=["MatMul"])
            make_session(str(dest))
    except Exception as err:  # noqa: BLE001 - a failed build is a row
        traceback.print_exc()
        info["error"] = first_line_of(err)
        dest.unlink(missing_ok=True)
    info["seconds"] = round(time.perf_counter() - start, 1)
    info_of(variant).write_text(json.dumps(info, indent=1) + "\n")
    print(f"built {variant.label}: {info}", flush=True)
    return info


# ---------------------------------------------------------------- measuring


def load_rows() -> list[dict[str, np.ndarray]]:
    arrays = np.load(ROWS)
    return [{k: arrays[k][i:i + 1] for k in arrays.files} for i in range(len(arrays[arrays.files[0]]))]


def cosines(path: Path, rows: list[dict], reference: list[np.ndarray]) -> tuple[float, float]:
    session = make_session(str(path))
    names = {i.name for i in session.get_inputs()}
    acc = VectorCosines()
    for feed, ref in zip(rows, reference):
        got = session.run([OUTPUT], {k: v for k, v in feed.items() if k in names})[0]
        acc.add(ref, got)
    return acc.result()


# A fresh interpreter per model: the session's resident memory is VmRSS after one run minus VmRSS before it, read
# after glibc's malloc_trim (as tests/test_nbits.py reads it: the heap pages of the model file onnxruntime parsed
# and freed go back, what stays is what the session holds), and also untrimmed, as a process monitor shows it.
_RSS_CHILD = r"""
import ctypes
import sys
import numpy as np
from graphopt.runtime import session_options
import onnxruntime as ort

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

def trimmed():
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return status("VmRSS")

arrays = np.load(sys.argv[2])
feed = {k: arrays[k][:1] for k in arrays.files}
before = trimmed()
session = ort.InferenceSession(sys.argv[1], session_options(1), providers=["CPUExecutionProvider"])
names = {i.name for i in session.get_inputs()}
session.run(None, {k: v for k, v in feed.items() if k in names})
untrimmed = status("VmRSS")
print(trimmed() - before, untrimmed - before, status("VmHWM") - before)
"""


def resident(path: Path) -> tuple[int, int, int]:
    """(session RSS after one run and malloc_trim, the same untrimmed, peak) in bytes, above the child's RSS before
    the session."""
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(path), str(ROWS)], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    rss, untrimmed, peak = out.stdout.split()
    return int(rss), int(untrimmed), int(peak)


def time_together(labels: list[str], rows: list[dict], repeats: int, min_time: float) -> list:
    """The built ``labels`` timed in one benchmark at 1 thread: every model once per round, in a fresh order."""
    return bench.benchmark([str(path_of(BY_LABEL[label])) for label in labels], rows, threads=1, warmup=1,
                           repeats=repeats, labels=labels, min_time_s=min_time, stats=False)


def measure(labels: list[str], bench_rows: int, repeats: int, min_time: float) -> dict[str, dict]:
    rows = load_rows()
    ref_session = make_session(str(SOURCE))
    reference = [ref_session.run([OUTPUT], feed)[0] for feed in rows]
    del ref_session
    found = {label: {} for label in labels}
    for label in labels:
        path = path_of(BY_LABEL[label])
        size, packed = bench.file_sizes(path, bench.LZMA_FAST_PRESET)  # one preset for all: the float file is big
        found[label].update(size=size, lzma=packed)
        found[label]["cosine"] = cosines(path, rows, reference) if label != "float" else (1.0, 1.0)
        found[label]["rss"] = resident(path)
        print(f"measured {label}: {found[label]}", flush=True)
    # One benchmark, every model in each round in a fresh seeded order (latency.time_rounds); not
    # quantize_vs_ort.rotated_bench: it re-creates every session per order, and 19 sessions of a BERT-base took
    # about a minute per order (36 orders), where predecessor effects on a ~100 ms model are small.
    for row in time_together(labels, rows[:bench_rows], repeats, min_time):
        found[row.label]["ms"], found[row.label]["ratio"] = row.median_ms, row.ratio
    return found


# ---------------------------------------------------------------- the report


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def write(found: dict[str, dict], infos: dict[str, dict], loads: list[str], command: str, bench_rows: int) -> str:
    import onnxruntime

    fl = found.get("float")
    lines = ["## graphopt on a BERT-base-sized encoder (issue 16)", "",
             f"Machine: {machine_line()}; onnxruntime {onnxruntime.__version__}, 1 thread, batch 1, sequence 128. "
             "The machine was shared with other jobs while this ran (load average "
             + " → ".join(loads) + "): absolute times are contended; compare the ratios, which are interleaved.",
             f"Command: `{command}`.", "",
             "Model: `bench/encoder_models.py` (BertModel: hidden 768, 12 layers, 12 heads, FFN 3072, vocabulary "
             "30522; seeded random weights; torch's exporter, opset 17). Rows: the 64 rows of bert_base.npz (every "
             "fourth padded); graphopt's calibration data and the cosine rows are the same (there are no others). "
             f"Latency: median over interleaved rounds on the first {bench_rows} rows, ratio = float's median / "
             "the variant's (higher is faster). Cosine: last_hidden_state against float per token, mean over all "
             "tokens and the worst sample's mean. Session RSS: a fresh process's resident memory after creating the "
             "session and one run, minus before, read after glibc's malloc_trim (the freed heap of the parsed model "
             "file returned; untrimmed and the peak VmHWM in brackets).", "",
             "| variant | speed vs float | median ms | size | lzma | cosine mean | cosine worst | session RSS "
             "(untrimmed, peak) | RSS vs float (untrimmed) | build s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for v in VARIANTS:
        info = infos.get(v.label, {})
        got = found.get(v.label)
        if got is None:
            why = info.get("error") or "not built"
            lines.append(f"| {v.label} | {why} | | | | | | | | {info.get('seconds', '')} |")
            continue
        rss, untrimmed, peak = got["rss"]
        vs_float = f"{rss / fl['rss'][0]:.2f}x ({untrimmed / fl['rss'][1]:.2f}x)" if fl else ""
        lines.append(
            f"| {v.label} | {1 / got['ratio']:.2f}x | {got['ms']:.1f} | {_mb(got['size'])} | {_mb(got['lzma'])} | "
            f"{got['cosine'][0]:.5f} | {got['cosine'][1]:.5f} | {_mb(rss)} ({_mb(untrimmed)}, {_mb(peak)}) | "
            f"{vs_float} | {info.get('seconds', '')} |")
    lines += ["", "What each variant is and what graphopt did:", ""]
    for v in VARIANTS:
        info = infos.get(v.label, {})
        if v.kind == "graphopt":
            what = f"`graphopt optimize bert_base.onnx --passes \"{v.recipe}\" --calib bert_base.npz " \
                   f"--max-drop {v.max_drop:g}" + (f" --target-cpu {v.target_cpu}" if v.target_cpu else "") + "`"
        elif v.kind == "ort":
            what = f"onnxruntime `quantize_dynamic(op_types_to_quantize=['MatMul'], weight_type=QInt8, " \
                   f"per_channel={v.per_channel})` on the {v.base} model"
        else:
            what = "the export"
        detail = [f"gate {info['gate']}"] if "gate" in info else []
        detail += info.get("steps", [])
        if info.get("error"):
            detail.append(f"build failed: {info['error']}")
        lines.append(f"- **{v.label}**: {what}" + ("".join(f"\n  - {d}" for d in detail)))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=None, help="variant labels to build (default: all)")
    parser.add_argument("--rebuild", action="store_true", help="remake the chosen variants even if built")
    parser.add_argument("--build-only", action="store_true", help="build, do not measure")
    parser.add_argument("--timing-only", action="store_true",
                        help="only re-time the chosen built variants (interleaved) and append the ratios to --out")
    parser.add_argument("--bench-rows", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--min-time", type=float, default=0.0)
    parser.add_argument("--out", default=str(RESULTS / "bert_base.md"))
    args = parser.parse_args(argv)
    if not SOURCE.exists() or not ROWS.exists():
        print(f"{SOURCE} or {ROWS} missing: run `/work/torchvenv/bin/python bench/encoder_models.py` first",
              file=sys.stderr)
        return 2
    chosen = args.only or [v.label for v in VARIANTS]
    unknown = [label for label in chosen if label not in BY_LABEL]
    if unknown:
        print(f"unknown variant {unknown[0]!r} (variants: {', '.join(BY_LABEL)})", file=sys.stderr)
        return 2
    loads = [_load()]
    for label in chosen:
        v = BY_LABEL[label]
        if v.kind != "float" and (args.rebuild or not path_of(v).exists()):
            build(v)
    if args.build_only:
        return 0
    command = "python bench/bert_base.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    if args.timing_only:
        return retime([label for label in chosen if path_of(BY_LABEL[label]).exists()], args, command)
    infos = {v.label: json.loads(info_of(v).read_text()) for v in VARIANTS if info_of(v).exists()}
    labels = [v.label for v in VARIANTS if path_of(v).exists()]
    found = measure(labels, args.bench_rows, args.repeats, args.min_time)
    loads.append(_load())
    text = write(found, infos, loads, command.strip(), args.bench_rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


def retime(labels: list[str], args: argparse.Namespace, command: str) -> int:
    """Time the built ``labels`` again, interleaved on an idle machine, and append the ratios to ``args.out``."""
    loads = [_load()]
    timing = time_together(labels, load_rows()[:args.bench_rows], args.repeats, args.min_time)
    loads.append(_load())
    lines = ["", f"Re-timed ({time.strftime('%Y-%m-%d %H:%M')}, {machine_line()}, load average "
             + " → ".join(loads) + f", {args.repeats} interleaved rounds): `{command}`", ""]
    lines += [f"- {row.label}: {row.median_ms:.1f} ms, {1 / row.ratio:.2f}x float" for row in timing]
    with Path(args.out).open("a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    sys.exit(main())
