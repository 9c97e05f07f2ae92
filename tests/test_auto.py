"""graphopt auto on the bundled digits model: a tiny search end to end, the held-out judgment, a resumed
study, the recipe that reproduces the pick byte for byte, and the refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from graphopt import bench, cli
from graphopt.auto import auto, space
from graphopt.errors import GraphoptError
from tests.helpers import DIGITS

MODEL, CALIB = DIGITS / "digits.onnx", DIGITS / "calib.npz"


def test_search_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["auto", str(MODEL), "--data", str(CALIB), "--trials", "3", "--quiet"])
    text = capsys.readouterr().out
    out = tmp_path / "digits.auto.onnx"
    report = json.loads(out.with_suffix(".json").read_text())
    assert code == (0 if report["passed"] else 1) and ("PASSED" in text) == report["passed"]
    cands = report["candidates"]
    assert [c["number"] for c in cands] == [0, 1, 2]
    assert cands[0]["recipe"] == "fold_batchnorm; fuse"  # the original, as the exact passes leave it
    chosen = report["chosen"]
    assert chosen["lzma_bytes"] == min(c["lzma_bytes"] for c in cands if not c["error"])
    assert chosen["lzma_bytes"] == bench.file_sizes(out)[1] <= cands[0]["lzma_bytes"]
    # the held-out judgment covers the 30% the search never saw
    search = np.load(out.with_suffix(".calib.npz"))
    total = len(np.load(CALIB)["labels"])
    assert len(search["labels"]) + report["holdout"]["samples"] == total
    assert report["holdout"]["samples"] == round(0.3 * total)
    # the recipe and the search samples reproduce the pick exactly
    again = tmp_path / "again.onnx"
    assert cli.main(["optimize", str(MODEL), "--recipe", str(out.with_suffix(".yaml")), "--calib",
                     str(out.with_suffix(".calib.npz")), "-o", str(again), "--quiet", "--no-latency"]) == 0
    assert again.read_bytes() == out.read_bytes()


def test_a_study_resumes(tmp_path):
    study = tmp_path / "study.db"
    first = auto(MODEL, tmp_path / "a.onnx", data=CALIB, trials=2, study=study, progress=False)
    assert [c.number for c in first.candidates] == [0, 1]
    second = auto(MODEL, tmp_path / "b.onnx", data=CALIB, trials=1, study=study, progress=False)
    assert [c.number for c in second.candidates] == [0, 1, 2]
    assert [c.recipe for c in second.candidates[:2]] == [c.recipe for c in first.candidates]


def test_recipes_of_the_space():
    assert space.recipe(space.original("size"), "size", 0.01) == "fold_batchnorm; fuse"
    assert space.recipe(space.original("latency"), "latency", 0.01) == "fold_batchnorm; fuse"
    choices = {"prune": "0.5", "kmeans_bits": "4", "kmeans_data_aware": True, "quantize": True}
    assert space.recipe(choices, "size", 0.02) == (
        "fold_batchnorm; fuse; prune:sparsity=0.5,scope=global,max_drop=0.02; "
        "kmeans:bits=4,data_aware=true,max_drop=0.02; quantize:target=size,max_drop=0.02")
    assert space.recipe({"quantize": True, "lowrank_macs": 0.6, "channel_ratio": 0.2}, "latency", 0.01) == (
        "fold_batchnorm; fuse; channel_prune:ratio=0.2,scope=global,max_drop=0.01; lowrank:macs=0.6,max_drop=0.01; "
        "quantize:max_drop=0.01")


@pytest.mark.parametrize("kwargs,match", [({}, "auto needs samples"), ({"data": CALIB, "objective": "speed"},
                                          "--objective speed"), ({"data": CALIB, "max_drop": 5}, "--max-drop 5"),
                                          ({"data": CALIB, "trials": 0}, "--trials 0")])
def test_refusals(tmp_path, kwargs, match):
    with pytest.raises(GraphoptError, match=match):
        auto(MODEL, tmp_path / "o.onnx", **kwargs)
    assert list(tmp_path.iterdir()) == []
