"""End-to-end: the optimize command on the digits model, rollback, exit codes and one-line errors."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt import cli
from graphopt.options import BaseOptions
from graphopt.passbase import GraphoptPass
from graphopt.graphs import all_nodes
from graphopt.weights import constant_array, replace_initializer
from tests.helpers import DIGITS, REPO

MODEL, CALIB, TEST = DIGITS / "digits.onnx", DIGITS / "calib.npz", DIGITS / "test.npz"


class ZeroHead(GraphoptPass):
    """Destroys the model: zeroes the last Gemm's weights (the gate must roll it back)."""

    name = "zero_head"
    Options = BaseOptions

    def call(self, model):
        gemms = [n for n in all_nodes(model) if n.op_type == "Gemm"]
        weight = gemms[-1].inputs[1]
        replace_initializer(weight, np.zeros_like(constant_array(weight)))
        return self.result(model, [{"layer": gemms[-1].name}])


class Crash(GraphoptPass):
    name = "crash"
    Options = BaseOptions

    def call(self, model):
        raise RuntimeError("boom\nsecond line")


@pytest.fixture
def fake_passes(register_passes):
    register_passes(ZeroHead, Crash)


def _optimize(tmp_path, *extra):
    out = tmp_path / "out.onnx"
    code = cli.main(["optimize", str(MODEL), "-o", str(out), "--calib", str(CALIB), "--data", str(TEST),
                     "--quiet", "--no-latency", *extra])
    return code, out


def test_main_command_on_digits(tmp_path, capsys):
    report = tmp_path / "r.json"
    code, out = _optimize(tmp_path, "--report", str(report))
    text = capsys.readouterr().out
    assert code == 0 and out.exists()
    assert "fold_batchnorm" in text and "kept" in text and "PASSED" in text
    data = json.loads(report.read_text())
    assert data["passed"] is True and data["metric"] == "accuracy"
    assert data["final"]["accuracy"] >= 0.97  # the bundled model's floor, measured on test.npz
    assert abs(data["final"]["accuracy"] - data["final"]["reference_accuracy"]) < 1e-9  # exact passes only
    assert report.with_suffix(".md").exists()
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert "BatchNormalization" not in ops


def test_rollback_keeps_the_run_going(tmp_path, capsys, fake_passes):
    code, out = _optimize(tmp_path, "--passes", "zero_head; crash; fold_batchnorm", "--report",
                          str(tmp_path / "r.json"))
    assert code == 0
    rows = {r["step"]: r for r in json.loads((tmp_path / "r.json").read_text())["passes"]}
    assert rows["zero_head"]["status"] == "rolled back"
    assert "accuracy drop" in rows["zero_head"]["reason"]
    assert rows["crash"]["status"] == "failed" and "RuntimeError: boom" in rows["crash"]["reason"]
    assert rows["fold_batchnorm"]["status"] == "kept"
    weights = [t for t in onnx.load(out).graph.initializer if t.name.startswith("fc2") or "fc2" in t.name]
    assert weights and all(np.abs(onnx.numpy_helper.to_array(t)).max() > 0 for t in weights)


def test_pass_budget_kept_but_final_gate_fails_exit_1(tmp_path, capsys, fake_passes):
    code, _ = _optimize(tmp_path, "--passes", "zero_head:max_drop=1.0")
    assert code == 1
    assert "FAILED" in capsys.readouterr().out


def test_python_api(tmp_path):
    report = graphopt.optimize(str(MODEL), tmp_path / "api.onnx", passes=["fold_batchnorm"], calib=str(CALIB),
                               data=str(TEST), run=graphopt.pipeline.RunOptions(latency=False, progress=False))
    assert report.passed and [r.step for r in report.passes] == ["input", "canonicalize", "fold_batchnorm",
                                                                  "cleanup"]


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def _bad(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("make,match", [
    (lambda p: p / "missing.onnx", "no such file"),
    (lambda p: _bad(p, "text.onnx", b"this is not a model at all\n" * 20), "not an ONNX model"),
    (lambda p: _bad(p, "cut.onnx", MODEL.read_bytes()[:100_000]), "truncated|not an ONNX"),
    (lambda p: _bad(p, "empty.onnx", b""), "empty file"),
])
def test_bad_model_files(tmp_path, capsys, make, match):
    path = make(tmp_path)
    code = cli.main(["optimize", str(path), "-o", str(tmp_path / "o.onnx"), "--quiet"])
    assert code == 2
    err = _err(capsys)
    assert re.search(match, err), err
    assert not (tmp_path / "o.onnx").exists()


def test_npz_with_wrong_keys(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, image=np.zeros((4, 1, 32, 32), np.float32))
    code = cli.main(["optimize", str(MODEL), "-o", str(tmp_path / "o.onnx"), "--data", str(bad), "--quiet"])
    assert code == 2 and "input" in _err(capsys)
    assert not (tmp_path / "o.onnx").exists()


def test_output_equal_to_input_refused(tmp_path, capsys):
    copy = tmp_path / "m.onnx"
    copy.write_bytes(MODEL.read_bytes())
    code = cli.main(["optimize", str(copy), "-o", str(copy), "--quiet"])
    assert code == 2 and "overwrite the input" in _err(capsys)
    assert copy.read_bytes() == MODEL.read_bytes()


@pytest.mark.parametrize("args,match", [
    (["optimize", str(MODEL), "--passes", "nosuch"], "unknown pass 'nosuch'"),
    (["optimize", str(MODEL), "--passes", "fold_batchnorm:colour=1"], "unknown option 'colour'"),
    (["optimize", str(MODEL), "--max-drop", "5"], "--max-drop"),
    (["optimize", str(MODEL), "--passes", "fold_batchnorm; lowrank:data_aware=true"],
     "pass 'lowrank:data_aware=True' needs calibration data (data_aware fits"),
    (["optimize", str(MODEL), "--passes", "fold_batchnorm; prune:sensitivity=true"],
     "pass 'prune:sensitivity=True' needs calibration data (sensitivity measures"),
    (["optimize", str(MODEL), "--passes", "kmeans:data_aware=true"], "pass 'kmeans:data_aware=True' needs calibration"),
    (["optimize", str(MODEL), "--passes", "distill"], "pass 'distill' needs calibration data (it calibrates"),
    (["optimize", str(MODEL), "--passes", "channel_prune:importance=activation"],
     "pass 'channel_prune:importance=activation' needs calibration data (importance=activation scores"),
    (["optimize", str(MODEL), "--passes", "channel_prune:scope=sensitivity"],
     "pass 'channel_prune:scope=sensitivity' needs calibration data (scope=sensitivity measures"),
    (["optimize"], "required"),
    ([], "give a command"),
    (["frobnicate"], "invalid choice"),
])
def test_usage_errors(tmp_path, capsys, monkeypatch, args, match):
    monkeypatch.chdir(tmp_path)
    assert cli.main(args) == 2
    assert match in _err(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs,match", [({"max_drop": 5}, "--max-drop 5"), ({"min_snr": 1e9}, "--min-snr"),
                                          ({"synthetic_samples": 0}, "--samples 0")])
def test_python_api_refuses_what_the_cli_refuses(tmp_path, kwargs, match):
    with pytest.raises(graphopt.GraphoptError, match=match):
        graphopt.optimize(str(MODEL), tmp_path / "o.onnx", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_model_without_initializers_runs(tmp_path, capsys):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    code = cli.main(["optimize", str(path), "-o", str(tmp_path / "o.onnx"), "--quiet", "--no-latency"])
    out = capsys.readouterr().out
    assert code == 0 and "synthetic" in out and (tmp_path / "o.onnx").exists()


def test_evaluate_bench_inspect_passes(tmp_path, capsys):
    assert cli.main(["evaluate", str(MODEL), str(MODEL), "--data", str(TEST)]) == 0
    out = capsys.readouterr().out
    assert "200.0 dB" in out and "acc" in out
    assert cli.main(["bench", str(MODEL), str(MODEL), "--data", str(TEST), "--repeats", "3", "--warmup", "1"]) == 0
    assert "digits.onnx" in capsys.readouterr().out
    assert cli.main(["inspect", str(MODEL)]) == 0
    assert "Conv" in capsys.readouterr().out
    assert cli.main(["passes"]) == 0
    listing = capsys.readouterr().out
    assert "fold_batchnorm" in listing and "max_drop" in listing


def test_package_layout_resolves():
    import graphopt.passes

    assert Path(graphopt.passes.__file__).resolve().parent == REPO / "passes"
    assert dataclasses.is_dataclass(graphopt.passes.REGISTRY["canonicalize"].Options)


def test_rollback_with_checkpoints_on_disk(tmp_path, capsys, fake_passes, monkeypatch):
    """Large models roll back from the last kept model on disk instead of an in-memory snapshot."""
    from graphopt import pipeline, verify

    monkeypatch.setattr(pipeline, "LARGE_BYTES", 1000)
    monkeypatch.setattr(verify, "LARGE_BYTES", 1000)
    code, out = _optimize(tmp_path, "--passes", "fold_batchnorm; zero_head; crash", "--report",
                          str(tmp_path / "r.json"))
    assert code == 0
    rows = {r["step"]: r for r in json.loads((tmp_path / "r.json").read_text())["passes"]}
    assert [rows[k]["status"] for k in ("fold_batchnorm", "zero_head", "crash")] == ["kept", "rolled back",
                                                                                     "failed"]
    saved = onnx.load(out)
    assert "BatchNormalization" not in {n.op_type for n in saved.graph.node}  # the kept pass survived
    fc2 = [t for t in saved.graph.initializer if "fc2" in t.name]
    assert fc2 and all(np.abs(onnx.numpy_helper.to_array(t)).max() > 0 for t in fc2)


def test_python_api_in_memory_model_with_rollback(fake_passes):
    from graphopt import modelio

    model = modelio.load_model(MODEL)
    report = graphopt.optimize(model, passes="fold_batchnorm; zero_head", calib=str(CALIB), data=str(TEST),
                               run=graphopt.pipeline.RunOptions(latency=False, progress=False))
    assert [r.status for r in report.passes[1:]] == ["no change", "kept", "rolled back", "no change"]
    ops = {n.op_type for n in report.optimized.graph}
    assert "BatchNormalization" not in ops  # the kept pass is in the returned model, the rolled back one not
    assert "optimized" not in report.to_dict()
