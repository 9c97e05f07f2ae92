"""graphopt auto's options beyond a size search: --time-budget durations, the --calib/--data rule (the search's
samples and the held-out ones), and --objective balanced (its value, its space, a search end to end)."""

from __future__ import annotations

import json
import math

import numpy as np
import optuna
import pytest

from graphopt import cli, cpu
from graphopt.auto import Candidate, auto, space, workers
from graphopt.errors import GraphoptError
from tests.helpers import DIGITS

MODEL, CALIB, TEST = DIGITS / "digits.onnx", DIGITS / "calib.npz", DIGITS / "test.npz"

BLOCK = cpu.host().channel_block  # auto rounds pruned widths to the host's NCHWc block


@pytest.mark.parametrize("text,seconds", [("20m", 1200), ("90s", 90), ("1h", 3600), ("1h30m", 5400),
                                          ("1m30s", 90), ("1.5h", 5400), ("45", 45), ("2.5", 2.5), ("20M", 1200),
                                          (" 10s ", 10)])
def test_time_budget_durations(text, seconds):
    args = cli.build_parser().parse_args(["auto", "m.onnx", "--time-budget", text])
    assert args.time_budget == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["20x", "0", "0m", "-5", "", "h", "30m1h", "1h 30m", "1e3", "inf", "nan"])
def test_a_bad_duration_is_one_line_naming_it(tmp_path, capsys, monkeypatch, text):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["auto", str(MODEL), "--data", str(CALIB), "--time-budget", text]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: graphopt auto: argument --time-budget: ")
    assert repr(text) in err and "1h30m" in err
    assert list(tmp_path.iterdir()) == []


def _subsets(tmp_path):
    """C: 60 calib samples, D: 40 test samples (small, so a one-candidate search takes seconds)."""
    c, d = dict(np.load(CALIB)), dict(np.load(TEST))
    calib, data = tmp_path / "c.npz", tmp_path / "d.npz"
    np.savez(calib, **{k: v[:60] for k, v in c.items()})
    np.savez(data, **{k: v[:40] for k, v in d.items()})
    return calib, data


def _same_arrays(path_a, path_b):
    a, b = np.load(path_a), np.load(path_b)
    return sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_calib_and_data_via_the_api(tmp_path):
    # both: the search uses all of C (the samples it saved are C's), the judgment all of D (no split)
    calib, data = _subsets(tmp_path)
    out = tmp_path / "both.onnx"
    result = auto(MODEL, out, calib=calib, data=data, trials=1, progress=False)
    assert _same_arrays(out.with_suffix(".calib.npz"), calib)
    assert result.holdout["samples"] == 40
    assert result.samples == {"search": "c.npz (60 samples)", "holdout": "d.npz (40 samples)"}
    # calib alone is split as data alone is: 70% searched, 30% held out
    alone = auto(MODEL, tmp_path / "alone.onnx", calib=calib, trials=1, progress=False)
    assert alone.holdout["samples"] == 18 and len(np.load(tmp_path / "alone.calib.npz")["labels"]) == 42
    assert "evaluation part (18 of 60 samples" in alone.samples["holdout"]


def test_calib_and_data_via_the_cli(tmp_path, capsys):
    calib, data = _subsets(tmp_path)
    out = tmp_path / "o.onnx"
    code = cli.main(["auto", str(MODEL), "--calib", str(calib), "--data", str(data), "--trials", "1", "-o", str(out),
                     "--quiet"])
    report = json.loads(out.with_suffix(".json").read_text())
    assert code == (0 if report["passed"] else 1)
    assert report["holdout"]["samples"] == 40 and report["samples"]["holdout"] == "d.npz (40 samples)"
    assert _same_arrays(out.with_suffix(".calib.npz"), calib)
    # the same file for both would judge on samples the search saw
    assert cli.main(["auto", str(MODEL), "--calib", str(calib), "--data", str(calib), "-o", str(out)]) == 2
    assert "the held-out samples must be ones the search never saw" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs,match", [({"data": CALIB, "time_budget": 0}, "--time-budget 0"),
                                          ({}, "give --data .* or --calib")])
def test_refusals(tmp_path, kwargs, match):
    with pytest.raises(GraphoptError, match=match):
        auto(MODEL, tmp_path / "o.onnx", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_balanced_value_counts_each_halving_the_same():
    ok = {"accuracy": 1.0, "reference_accuracy": 1.0}
    half_size = Candidate(1, "r", 100, 1.0, ok, size_ratio=0.5)
    half_time = Candidate(2, "r", 200, 0.5, ok, size_ratio=1.0)
    assert half_size.value("balanced") == pytest.approx(half_time.value("balanced")) == pytest.approx(math.sqrt(0.5))
    assert Candidate(3, "r", 50, 0.5, ok, size_ratio=0.25).value("balanced") == pytest.approx(0.25 ** 0.5 * 0.5 ** 0.5)
    assert Candidate(4, "r", 50, 0.5, None, error="outside the budget", size_ratio=0.25).value("balanced") == math.inf
    assert Candidate(5, "r", 50, 0.5, ok).value("balanced") == math.inf  # no size ratio: not comparable


def test_balanced_space():
    assert space.recipe(space.original("balanced"), "balanced", 0.01) == "fold_batchnorm; fuse; compact"
    params = {"lowrank_macs": 0.8, "channel_ratio": 0.2, "channel_scope": "global", "prune": "0.5", "kmeans_bits": "4",
              "kmeans_data_aware": False, "kmeans_per_channel": False, "quantize": True, "quantize_target": "latency"}
    choices = space.suggest(optuna.trial.FixedTrial(params), "balanced")
    assert choices == params
    assert space.recipe(choices, "balanced", 0.01) == (
        f"fold_batchnorm; fuse; channel_prune:ratio=0.2,scope=global,round_to={BLOCK},max_drop=0.01; "
        "lowrank:macs=0.8,max_drop=0.01; "
        "prune:sparsity=0.5,scope=global,max_drop=0.01; kmeans:bits=4,refit=true,half_codebook=true,max_drop=0.01; "
        "quantize:max_drop=0.01; compact")
    size_int8 = space.recipe({**params, "quantize_target": "size"}, "balanced", 0.01)
    assert "quantize:target=size,max_drop=0.01; compact" in size_int8


def test_a_balanced_search(tmp_path, monkeypatch):
    # the original first, then one candidate with a structural knob (channels: bytes and MACs) and a size-only
    # one (8-bit sharing); every candidate carries both ratios and the pick is the lowest balanced value
    monkeypatch.setattr(space, "suggest", lambda trial, objective: {"channel_ratio": 0.1, "kmeans_bits": "8"})
    out = tmp_path / "o.onnx"
    result = auto(MODEL, out, data=CALIB, objective="balanced", trials=2, progress=False)
    original, chosen = result.candidates[0], result.chosen
    assert original.recipe == "fold_batchnorm; fuse; compact" and original.valid
    built = [c for c in result.candidates if c.same_as is None]
    assert len(built) == 2 and all(c.size_ratio is not None and c.latency_ratio is not None for c in built)
    assert chosen.valid and chosen.value("balanced") <= original.value("balanced")
    assert chosen.value("balanced") == min(c.value("balanced") for c in result.candidates)
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["objective"] == "balanced" and report["chosen"]["number"] == chosen.number
    assert report["chosen"]["size_ratio"] == pytest.approx(chosen.lzma_bytes / result.original_lzma_bytes, rel=1e-5)
    md = out.with_suffix(".md").read_text()
    assert "| balanced |" in md and f"{chosen.value('balanced'):.3f}" in md
    assert f"(balanced x{chosen.value('balanced'):.3f})" in md.splitlines()[2]


def test_pruned_widths_follow_the_timing_workers_block():
    # a remote timing worker with AVX-512 (16) among AVX2 workers (8): the latency search rounds to its block;
    # a size search, whose candidates run anywhere, to the widest (16 is a multiple of 8)
    blocks = {"tcp://a": 8, "tcp://b": 16, "tcp://c": 8}
    assert workers.widest_block(blocks, ["tcp://b"]) == 16
    assert workers.widest_block(blocks, ["tcp://a", "tcp://c"]) == 8
    assert workers.widest_block(blocks, list(blocks)) == 16
    assert space.recipe({"channel_ratio": 0.1}, "latency", 0.01, channel_block=16).endswith(
        "channel_prune:ratio=0.1,scope=global,round_to=16,max_drop=0.01")


def test_a_local_cluster_reports_its_workers_block():
    pool = workers.executor(2, None, timed=True)
    try:
        assert pool.channel_block == BLOCK == workers.Inline().channel_block
    finally:
        pool.close()
