"""Run `graphopt optimize` on case folders, one per line on stdin; one JSON line per case on stdout.

A case folder holds ``model.onnx`` (and any files it points to) and ``data.npz``; the output goes to its
``out/`` folder. Run as ``python -m tests.robustness.runner`` by test_hostile_files, which restarts it after a
crash (a signal kills only the case being run) and counts that case as a failure.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

PASSES = "fold_batchnorm; prune:sparsity=0.5; kmeans:bits=4"


def run_case(case: Path) -> dict:
    import onnx
    import onnxruntime as ort

    from graphopt import cli

    inputs = {p.name: p.read_bytes() for p in case.iterdir() if p.is_file() and not p.is_symlink()}
    out_dir = case / "out"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / "o.onnx"
    argv = ["optimize", str(case / "model.onnx"), "--passes", PASSES, "--calib", str(case / "data.npz"),
            "-o", str(out), "--no-latency", "--quiet"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(argv)
        except BaseException as exc:  # noqa: BLE001 - anything escaping main is the finding
            code = f"escaped {type(exc).__name__}: {str(exc)[:200]}"
    result = {"case": case.name, "code": code, "stderr": err.getvalue(),
              "written": sorted(p.name for p in out_dir.iterdir()),
              "input_changed": sorted(n for n, b in inputs.items() if (case / n).read_bytes() != b)}
    if out.exists():
        try:
            onnx.checker.check_model(str(out))
            ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - a written model that does not load is the finding
            result["invalid_output"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return result


def main() -> None:
    for line in sys.stdin:
        case = Path(line.strip())
        print(json.dumps(run_case(case)), flush=True)


if __name__ == "__main__":
    main()
