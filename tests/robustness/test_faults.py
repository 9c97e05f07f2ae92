"""Faults (issue 15): `graphopt optimize` killed with SIGKILL at random moments, a file size limit (a full disk),
a save that fails, and two runs writing one output at once. Always: no output, or a complete one; the input never
changes; a killed save's temporary folder is removed by the next save in that folder.

``pytest -m fuzz`` kills ``GRAPHOPT_FUZZ_KILLS`` (default 100) runs; the default run kills 4.
"""

from __future__ import annotations

import errno
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest

from graphopt import modelio
from graphopt.errors import GraphoptError
from tests.helpers import DIGITS

MODEL, CALIB = DIGITS / "digits.onnx", DIGITS / "calib.npz"
ROOT = Path(__file__).resolve().parents[2]


def _argv(out: Path) -> list[str]:
    return [sys.executable, "-m", "graphopt.cli", "optimize", str(MODEL), "--passes",
            "fold_batchnorm; prune:sparsity=0.5; kmeans:bits=4", "--calib", str(CALIB), "-o", str(out),
            "--no-latency", "--quiet"]


def _complete(path: Path) -> None:
    onnx.checker.check_model(str(path))
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _kills(tmp_path: Path, count: int) -> dict[str, int]:
    before = MODEL.read_bytes()
    start = time.monotonic()
    assert subprocess.run(_argv(tmp_path / "timed.onnx"), cwd=ROOT).returncode == 0
    whole = time.monotonic() - start  # a kill lands anywhere from start-up to the rename
    (tmp_path / "timed.onnx").unlink()
    rng, seen = random.Random(0), {"no output": 0, "complete output": 0}
    for i in range(count):
        out = tmp_path / f"k{i % 3}" / "o.onnx"
        out.parent.mkdir(exist_ok=True)
        if out.exists():
            out.unlink()
        proc = subprocess.Popen(_argv(out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.0, whole * 1.1))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():
            _complete(out)
            seen["complete output"] += 1
        else:
            seen["no output"] += 1
        assert sorted(p.name for p in out.parent.iterdir() if not p.name.startswith(".graphopt-")) in ([], ["o.onnx"])
    assert MODEL.read_bytes() == before
    # the next save in each folder removes what killed saves left behind
    for folder in tmp_path.glob("k*"):
        assert subprocess.run(_argv(folder / "o.onnx"), cwd=ROOT).returncode == 0
        assert sorted(p.name for p in folder.iterdir()) == ["o.onnx"]
    return seen


def test_sigkill_at_random_moments(tmp_path):
    _kills(tmp_path, 4)


@pytest.mark.fuzz
def test_sigkill_at_random_moments_long(tmp_path):
    count = int(os.environ.get("GRAPHOPT_FUZZ_KILLS", "100"))
    seen = _kills(tmp_path, count)
    print(f"\nkills: {count}, {seen['no output']} left no output, {seen['complete output']} a complete one, "
          "0 a partial one")


def test_a_file_size_limit_is_one_error_and_nothing_partial(tmp_path):
    # RLIMIT_FSIZE: writes past 20 kB fail (Python ignores SIGXFSZ, so they raise EFBIG), as on a full disk
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    out = tmp_path / "o.onnx"
    proc = subprocess.run(_argv(out), cwd=ROOT, capture_output=True, text=True, preexec_fn=limit)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and "could not write" in proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   PermissionError(errno.EACCES, "Permission denied")])
def test_a_failed_save_is_one_error_and_nothing_partial(tmp_path, monkeypatch, error):
    # a full disk while writing, a read-only folder (root ignores chmod, so the failure is injected)
    model = modelio.load_model(MODEL)

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(onnx, "save_model", fail)
    with pytest.raises(GraphoptError, match=f"o.onnx: could not write the model \\({error.strerror}\\)"):
        modelio.save_model(model, tmp_path / "o.onnx")
    assert list(tmp_path.iterdir()) == []


def test_two_runs_writing_one_output(tmp_path):
    out = tmp_path / "o.onnx"
    procs = [subprocess.Popen(_argv(out), cwd=ROOT, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    codes = [p.wait() for p in procs]
    assert codes == [0, 0], [p.stderr.read() for p in procs]
    _complete(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.onnx"]


def test_a_stale_temporary_folder_of_a_live_process_is_kept(tmp_path):
    live = tmp_path / f"{modelio.TEMP_PREFIX}{os.getpid()}-abc"
    dead = tmp_path / f"{modelio.TEMP_PREFIX}999999999-abc"  # above any pid_max
    for folder in (live, dead):
        folder.mkdir()
        (folder / "o.onnx").write_bytes(b"partial")
    modelio.save_model(modelio.load_model(MODEL), tmp_path / "o.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "o.onnx"])
