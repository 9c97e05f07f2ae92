"""Does distill after channel_prune or lowrank bring the PP-OCRv4 det probability map back to the float model?

    python bench/distill_det.py [--ratio 0.2] [--macs 0.5]

Recipes (graphopt.optimize): ``fold_batchnorm; channel_prune:ratio=R,repair=false`` and
``fold_batchnorm; lowrank:macs=M``, each with and without ``; distill`` (layers=last: the nearest refittable
Gemm/MatMul/Conv before the output, walking back through the head's ConvTranspose layers). Data:
Pillow-rendered pages 480x640 at their own size (limit_side 480), calibration 20 pages seed 1, gate 5 pages
seed 2 (metric snr, min_snr -1000 and max_drop 1: nothing is rolled back), scored on 20 pages seed 2 with
bench.ocr.score_det (map MAE / agreement vs the float model, box F1 vs drawn boxes).
Writes bench/results/distill_det.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
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
SIZE, LIMIT = (480, 640), 480
SHAPE = {"x": (1, 3, *SIZE)}
N_CALIB, N_TEST, N_GATE = 20, 20, 5


def recipes(ratio: float, macs: float) -> list[str]:
    prune = f"fold_batchnorm; channel_prune:ratio={ratio},repair=false"
    low = f"fold_batchnorm; lowrank:macs={macs}"
    return [prune, f"{prune}; distill", low, f"{low}; distill"]


def _step_cell(report: Any, name: str) -> str:
    """Status of the step, the layers it refit (relative error before -> after) or why it did nothing."""
    rows = [r for r in report.passes if r.step.split(":")[0] == name]
    if not rows:
        return "-"
    r = rows[-1]
    refit = ", ".join(f"{x['layer']} {x['rel_error_before']:.3g}->{x['rel_error']:.3g}" for x in r.rows
                      if x.get("changed"))
    walked = next((n for n in r.notes if n.startswith("walked past")), "")
    note = refit or r.reason or (r.notes[-1] if r.notes else "")
    return f"{r.status}: {note}"[:200] + (f" ({walked[:200]})" if walked else "")


def run(ratio: float, macs: float) -> tuple[list[list[str]], dict[str, Any]]:
    model = str(__import__("models.fetch", fromlist=["x"]).fetch_ocr_models()["det"])
    tmp = Path(tempfile.mkdtemp(prefix="distill-det-"))
    calib, _ = ocr.make_det_data(N_CALIB, ocr.CALIB_SEED, SIZE, LIMIT)
    gate, _ = ocr.make_det_data(N_GATE, ocr.TEST_SEED, SIZE, LIMIT)
    test, boxes = ocr.make_det_data(N_TEST, ocr.TEST_SEED, SIZE, LIMIT)
    ocr.write_feed_folder(calib, tmp / "calib")
    ocr.write_feed_folder(gate, tmp / "gate")
    base_macs = count_macs(modelio.load_model(model), SHAPE)
    float_scores = ocr.score_det(model, model, test, boxes)
    rows = [["float model", formatting.human(base_macs), "-", f"{float_scores['map_mae']:.4f}",
             f"{float_scores['map_agree']:.4f}", f"{float_scores['f1']:.3f}", "-", "-"]]
    for recipe in recipes(ratio, macs):
        out = tmp / "out.onnx"
        start = time.perf_counter()
        try:
            report = graphopt.optimize(model, out, passes=recipe, calib=str(tmp / "calib"), data=str(tmp / "gate"),
                                       metric="snr", min_snr=-1000.0, max_drop=1.0,
                                       run=RunOptions(latency=False, progress=False))
        except Exception as err:  # a failing pass is a result
            rows.append([f"`{recipe}`", "-", "-", "-", "-", "-", f"failed: {type(err).__name__}: {err}"[:160], "-"])
            print(recipe, "FAILED", err, flush=True)
            continue
        seconds = time.perf_counter() - start
        macs = count_macs(modelio.load_model(out), SHAPE)
        s = ocr.score_det(out, model, test, boxes)
        rows.append([f"`{recipe}`", formatting.human(macs), f"{1 - macs / base_macs:.1%}", f"{s['map_mae']:.4f}",
                     f"{s['map_agree']:.4f}", f"{s['f1']:.3f}", _step_cell(report, "distill"), f"{seconds:.0f}"])
        print(rows[-1], flush=True)
    return rows, float_scores


def conclusion(rows: list[list[str]]) -> str:
    """One honest line: for each compression, does `; distill` lower the map MAE of the recipe it extends?"""
    mae = {r[0].strip("`"): r[3] for r in rows}
    holds, fails, parts = [], [], []
    for recipe, value in mae.items():
        base = mae.get(recipe.split("; distill")[0], "-") if recipe.endswith("; distill") else "-"
        if value == "-" or base == "-":
            continue
        what = recipe.split("; ")[-2].split(":")[0]
        parts.append(f"{what}: map MAE {base} -> {value}")
        (holds if float(value) < float(base) - 1e-4 else fails).append(what)
    if holds and not fails:
        verdict = "the goal holds: distill lowers the output error after " + " and ".join(holds)
    elif holds:
        verdict = (f"the goal holds only partly: distill lowers the output error after {' and '.join(holds)}, "
                   f"not after {' and '.join(fails)}")
    else:
        verdict = "the goal does NOT hold: distill did not lower the output error"
    return f"Conclusion: {verdict} ({'; '.join(parts)})."


def markdown(rows: list[list[str]], command: str) -> str:
    tab = formatting.table(["recipe", "MACs (480x640)", "MACs removed", "map MAE vs float", "map agreement (0.3)",
                       "box F1", "distill step", "optimize s"], rows)
    return (f"## distill after channel_prune / lowrank on PP-OCRv4 det (segmentation map)\n\n"
            f"Machine: 2-core AMD EPYC, onnxruntime 1 thread ({machine_line()}). Data: Pillow-rendered pages "
            f"{SIZE[0]}x{SIZE[1]} fed at their own size (bench/ocr.py, limit_side {LIMIT}): calibration {N_CALIB} "
            f"pages seed 1, gate {N_GATE} pages seed 2 (metric snr, min_snr -1000, max_drop 1: nothing rolled "
            f"back), scored on {N_TEST} pages seed 2.\n\nCommand: `{command}`\n\n{tab}\n\n"
            f"{conclusion(rows)}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--macs", type=float, default=0.5)
    args = parser.parse_args(argv)
    rows, _ = run(args.ratio, args.macs)
    command = "python bench/distill_det.py" + (f" {' '.join(argv)}" if argv else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distill_det.md").write_text(markdown(rows, command))
    print(markdown(rows, command))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
