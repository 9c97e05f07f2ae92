"""Hostile files (issue 15): mutated models and calibration files through `graphopt optimize`. Whatever the damage,
the command exits 0/1 with a model that passes the checker and loads in onnxruntime, or exits 2 with one line on
stderr and nothing written; it never crashes, and the input files never change.

The default run tries every structural case and a sample of the byte-level ones; ``pytest -m fuzz`` tries
``GRAPHOPT_FUZZ_FILES`` (default 1000) byte-level mutations of the model and the data file as well.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.robustness import mutations

ROOT = Path(__file__).resolve().parents[2]


def _cases(root: Path, byte_level: int, seed: int = 0) -> list[tuple[str, Path]]:
    """Case folders under ``root``: the structural damage, then ``byte_level`` byte mutations of model and data."""
    rng = random.Random(seed)
    model = mutations.small_model()
    good_model = model.SerializeToString()
    arrays = {"x": np.random.default_rng(1).standard_normal((16, 3, 8, 8)).astype(np.float32),
              "labels": np.arange(16) % 10}
    good_data = mutations.npz_bytes(arrays)
    (root / "outside.bin").write_bytes(np.ones(4096, np.float32).tobytes())  # what a traversal would read
    named = [(n, b, good_data) for n, b in mutations.structural(model)]
    bytes_model = mutations.truncations(good_model) + mutations.flips(good_model, rng, byte_level) \
        + mutations.lying_lengths(good_model, rng, max(1, byte_level // 4))
    rng.shuffle(bytes_model)
    named += [(n, b, good_data) for n, b in bytes_model[:byte_level]]
    named += [(n, good_model, d) for n, d in mutations.data_cases(arrays, rng, max(1, byte_level // 4))]
    cases = []
    for i, (name, model_bytes, data_bytes) in enumerate(named):
        case = root / f"case{i:05d}"
        case.mkdir()
        (case / "model.onnx").write_bytes(model_bytes)
        (case / "data.npz").write_bytes(data_bytes)
        (case / "short.bin").write_bytes(b"\0" * 16)
        (case / "link.bin").symlink_to(root / "outside.bin")
        cases.append((name, case))
    return cases


def _run_all(cases: list[tuple[str, Path]]) -> list[tuple[str, dict]]:
    """Each case through the runner; a case during which the runner died is a result with its exit status."""
    results, todo = [], list(cases)
    while todo:
        proc = subprocess.run([sys.executable, "-m", "tests.robustness.runner"], cwd=ROOT, capture_output=True,
                              text=True, input="\n".join(str(c) for _, c in todo) + "\n", timeout=3600)
        lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        results += [(name, line) for (name, _), line in zip(todo, lines)]
        todo = todo[len(lines):]
        if todo:  # the runner died on todo[0]
            results.append((todo[0][0], {"code": f"runner died ({proc.returncode}): {proc.stderr[-300:]}"}))
            todo = todo[1:]
    return results


def _failures(results: list[tuple[str, dict]]) -> list[str]:
    bad = []
    for name, r in results:
        code, err = r.get("code"), r.get("stderr", "")
        why = []
        if code not in (0, 1, 2):
            why.append(f"exit {code}")
        if code == 2 and (not err.startswith("error: ") or err.count("\n") != 1 or "Traceback" in err):
            why.append(f"stderr not one error line: {err[:300]!r}")
        if code == 2 and r.get("written"):
            why.append(f"refused but wrote {r['written']}")
        if code in (0, 1) and r.get("written") != ["o.onnx"]:
            why.append(f"wrote {r.get('written')}")
        if r.get("invalid_output"):
            why.append(f"written model does not load: {r['invalid_output']}")
        if r.get("input_changed"):
            why.append(f"input changed: {r['input_changed']}")
        if why:
            bad.append(f"{name}: {'; '.join(why)}")
    return bad


def _check(tmp_path: Path, byte_level: int) -> list[tuple[str, dict]]:
    results = _run_all(_cases(tmp_path, byte_level))
    failures = _failures(results)
    assert not failures, f"{len(failures)} of {len(results)} hostile files mishandled:\n" + "\n".join(failures)
    return results


def test_hostile_files(tmp_path):
    results = _check(tmp_path, byte_level=12)
    codes = {name: r["code"] for name, r in results}
    # the damage the parser cannot see is caught before any work: these must be refused, not optimized
    for name in ("zero stride", "a cycle", "two nodes write one output", "unknown op", "opset 99", "no outputs",
                 "input from nowhere", "external data missing", "external data short",
                 "external data outside the folder", "external data absolute path", "external data through a symlink",
                 "negative dim", "huge dims, small data", "short raw data", "npz wrong rank", "npz no samples"):
        assert codes[name] == 2, (name, [r for n, r in results if n == name])


@pytest.mark.fuzz
def test_hostile_files_long(tmp_path):
    count = int(os.environ.get("GRAPHOPT_FUZZ_FILES", "1000"))
    results = _check(tmp_path, byte_level=count)
    refused = sum(r["code"] == 2 for _, r in results)
    print(f"\nhostile files: {len(results)} tried, {refused} refused with one line, "
          f"{len(results) - refused} optimized into a valid model, 0 mishandled")


def test_mutations_cover_every_field_boundary():
    data = mutations.small_model().SerializeToString()
    boundaries = {e for _, _, e, _ in mutations.fields(data)}
    assert len(data) in boundaries and len(boundaries) > 20  # the graph's nodes and initializers were walked
    assert all(len(b) < len(data) for _, b in mutations.truncations(data))
    onnx.load_from_string(data)  # the base itself is valid
