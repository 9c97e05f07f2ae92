"""channel_prune on the real PP-OCRv4 rec model: line accuracy and CER vs MACs removed, with and without repair.

    python bench/channel_prune_ocr.py [--workers 2] [--ratios 0.05,0.1,0.2] [--scopes layer,global,sensitivity]
                                      [--sens-ratios 0.05,0.1,0.2] [--calib 64] [--test 100]

Recipe per point: ``fold_batchnorm; fuse; channel_prune:ratio=R,scope=S,repair=B`` through graphopt.optimize
(scope=sensitivity: R is about the share of the model's MACs removed, per-group ratios from measured damage),
calibration rendered lines (seed 1), gate data 10 lines of the test seed, max_drop 0.5 (a point the gate rolls
back is reported as rolled back, not scored), judged by CER on the test lines (seed 2). Writes
bench/results/channel_prune_ocr.md and .png. Each point runs in its own process (1 onnxruntime thread);
--workers runs points side by side.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import ocr  # noqa: E402
import graphopt  # noqa: E402
from graphopt import formatting, modelio  # noqa: E402
from graphopt.costs import count_macs  # noqa: E402
from graphopt.pipeline import RunOptions, machine_line  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SHAPE = {"x": (1, 3, 48, 320)}  # MACs at the minimum rec width (one 320-wide line)
N_CALIB, N_TEST, N_GATE = 64, 100, 10


REPAIR_OPTS = "max_samples=32"  # the default 256 samples take several minutes a point (22 repair waves)


def recipe(ratio: float, scope: str, repair: bool) -> str:
    extra = f",{REPAIR_OPTS}" if repair and REPAIR_OPTS else ""
    return f"fold_batchnorm; fuse; channel_prune:ratio={ratio},scope={scope},repair={str(repair).lower()}{extra}"


def _point(args: tuple[str, str, str, float, str, bool, str]) -> dict[str, Any]:
    model, calib, gate, ratio, scope, repair, steps = args
    test, texts = ocr.make_rec_data(N_TEST, ocr.TEST_SEED)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pruned.onnx"
        start = time.perf_counter()
        try:
            report = graphopt.optimize(model, out, passes=steps, calib=calib, data=gate,
                                       max_drop=0.5, run=RunOptions(latency=False, progress=False))
        except Exception as err:  # a failing pass is a result: report it, keep the sweep going
            return {"ratio": ratio, "scope": scope, "repair": repair, "error": f"{type(err).__name__}: {err}"}
        seconds = time.perf_counter() - start
        row = next(r for r in report.passes if r.step.startswith("channel_prune"))
        macs = count_macs(modelio.load_model(out), SHAPE)
        scores = ocr.score_rec(out, test, texts)
    return {"ratio": ratio, "scope": scope, "repair": repair, "status": row.status, "reason": row.reason,
            "notes": row.notes, "groups_pruned": len(row.rows), "macs": macs, "seconds": seconds, **scores}


def run(workers: int, ratios: list[float], scopes: list[str], sens_ratios: list[float]) -> list[dict[str, Any]]:
    model = str(__import__("models.fetch", fromlist=["x"]).fetch_ocr_models()["rec"])
    data_dir = Path(tempfile.mkdtemp(prefix="cp-ocr-"))
    calib, _ = ocr.make_rec_data(N_CALIB, ocr.CALIB_SEED)
    gate, _ = ocr.make_rec_data(N_GATE, ocr.TEST_SEED)
    ocr.write_feed_folder(calib, data_dir / "calib")
    ocr.write_feed_folder(gate, data_dir / "gate")
    jobs = [(model, str(data_dir / "calib"), str(data_dir / "gate"), r, s, b, recipe(r, s, b))
            for b, s in itertools.product((True, False), scopes)
            for r in (sens_ratios if s == "sensitivity" else ratios)]
    with ProcessPoolExecutor(workers) as pool:
        points = list(pool.map(_point, jobs))
    test, texts = ocr.make_rec_data(N_TEST, ocr.TEST_SEED)
    base = {"ratio": 0.0, "scope": "-", "repair": False, "macs": count_macs(modelio.load_model(model), SHAPE),
            **ocr.score_rec(model, test, texts)}
    return [base, *points]


def table(points: list[dict[str, Any]]) -> str:
    base = points[0]["macs"]
    rows = []
    for p in points:
        if "error" in p:
            rows.append([f"{p['ratio']:.2f}", p["scope"], str(p["repair"]).lower(), "-", "-", "-", "-",
                         f"failed: {p['error'][:120]}", "-"])
            continue
        if p.get("status") == "rolled back":  # the gate restored the float model: nothing pruned to score
            rows.append([f"{p['ratio']:.2f}", p["scope"], str(p["repair"]).lower(), "-", "-", "-", "-",
                         "rolled back", f"{p['seconds']:.0f}"])
            continue
        rows.append([f"{p['ratio']:.2f}", p["scope"], str(p["repair"]).lower(), formatting.human(p["macs"]),
                     f"{1 - p['macs'] / base:.1%}", f"{p['line_acc']:.3f}", f"{p['cer']:.4f}",
                     p.get("status", "float model"), f"{p['seconds']:.0f}" if "seconds" in p else "-"])
    return formatting.table(["ratio", "scope", "repair", "MACs (48x320)", "MACs removed", "line acc", "CER",
                        "pass status", "optimize s"], rows)


def point_notes(points: list[dict[str, Any]]) -> list[str]:
    """The repair and sensitivity notes of each scored point (what the pass did, layer by layer)."""
    out = []
    for p in points[1:]:
        keep = [n for n in p.get("notes", []) if n.startswith(("repair:", "sensitivity: ", "calibration data"))]
        if keep:
            out.append(f"- ratio {p['ratio']:g} {p['scope']} repair={str(p['repair']).lower()}: " + "; ".join(keep))
    return out


def intact_notes(points: list[dict[str, Any]]) -> list[str]:
    """The pass's notes on dependency groups and groups left intact (identical for every point)."""
    for p in points[1:]:
        if "notes" in p:
            return [n for n in p["notes"] if "left intact" in n or "dependency group" in n]
    return []


def plot(points: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = points[0]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for (scope, repair), marker in zip(itertools.product(("layer", "global", "sensitivity"), (True, False)),
                                       "osD^vP"):
        pts = sorted((p for p in points[1:] if "error" not in p and p.get("status") != "rolled back"
                      and p["scope"] == scope and p["repair"] == repair),
                     key=lambda p: p["macs"], reverse=True)
        if pts:
            ax.plot([100 * (1 - p["macs"] / base["macs"]) for p in pts], [p["cer"] for p in pts], marker=marker,
                    label=f"{scope}, repair={'on' if repair else 'off'}")
    ax.axhline(base["cer"], color="k", ls="--", lw=1, label="float model")
    ax.set_xlabel("MACs removed (%)")
    ax.set_ylabel(f"character error rate ({N_TEST} lines)")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title("PP-OCRv4 rec: channel_prune")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(points: list[dict[str, Any]], command: str) -> str:
    notes = "\n".join(f"- {n}" for n in intact_notes(points))
    return (f"## channel_prune on PP-OCRv4 rec: CER vs MACs, with and without repair\n\n"
            f"Machine: 2-core AMD EPYC, onnxruntime 1 thread ({machine_line()}). Data: Pillow-rendered lines "
            f"(bench/ocr.py): calibration {N_CALIB} lines seed 1, gate {N_GATE} lines seed 2 (max_drop 0.5 "
            f"on line agreement; rolled-back points are marked, not scored), scored on {N_TEST} lines seed 2 with "
            f"rapidocr's CTC decoding.\n\n"
            f"Command: `{command}`\n\nRecipe per point: `fold_batchnorm; fuse; channel_prune:ratio=R,scope=S,"
            f"repair=B` (compensate=true, the default; repair points add `{REPAIR_OPTS}`; scope=sensitivity: R is "
            f"about the share of the model's MACs removed, split over groups by measured damage).\n\n"
            f"{table(points)}\n\n"
            f"![CER vs MACs](channel_prune_ocr.png)\n\n"
            f"Groups found by the pass (notes of its report row):\n\n{notes}\n\n"
            f"Repair and sensitivity notes per point:\n\n" + "\n".join(point_notes(points)) + "\n")


def main(argv: list[str] | None = None) -> int:
    global REPAIR_OPTS, N_CALIB, N_TEST
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--ratios", default="0.05,0.1,0.2", help="ratios of the layer and global scopes")
    parser.add_argument("--scopes", default="layer,global,sensitivity")
    parser.add_argument("--sens-ratios", default="0.05,0.1,0.2", help="ratios of scope=sensitivity (MAC share)")
    parser.add_argument("--calib", type=int, default=N_CALIB, help="calibration lines (seed 1)")
    parser.add_argument("--test", type=int, default=N_TEST, help="test lines (seed 2)")
    parser.add_argument("--repair-opts", default=REPAIR_OPTS, help="extra channel_prune options of repair points")
    parser.add_argument("--json", type=Path, help="also write the raw points here")
    args = parser.parse_args(argv)
    REPAIR_OPTS, N_CALIB, N_TEST = args.repair_opts, args.calib, args.test
    points = run(args.workers, [float(r) for r in args.ratios.split(",")], args.scopes.split(","),
                 [float(r) for r in args.sens_ratios.split(",")])
    if args.json:
        args.json.write_text(json.dumps(points, indent=1, default=str))
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(points, RESULTS / "channel_prune_ocr.png")
    command = "python bench/channel_prune_ocr.py" + (f" {' '.join(argv)}" if argv else "")
    (RESULTS / "channel_prune_ocr.md").write_text(markdown(points, command))
    print(markdown(points, command))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
