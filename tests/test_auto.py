"""graphopt auto on the bundled digits model: a tiny search end to end, the held-out judgment, a resumed
study, the recipe that reproduces the pick byte for byte, repeated recipes not rerun, the Pareto fronts and their
report, a search on a real Dask LocalCluster, and the refusals."""

from __future__ import annotations

import json

import numpy as np
import optuna
import pytest

from graphopt import bench, cli, cpu
from graphopt.auto import Candidate, auto, candidate, pareto, search, space, summary
from graphopt.errors import GraphoptError
from graphopt.runtime import make_session
from tests.helpers import DIGITS

MODEL, CALIB = DIGITS / "digits.onnx", DIGITS / "calib.npz"

BLOCK = cpu.host().channel_block  # auto rounds pruned widths to the host's NCHWc block


def test_search_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["auto", str(MODEL), "--data", str(CALIB), "--trials", "3", "--quiet"])
    text = capsys.readouterr().out
    out = tmp_path / "digits.auto.onnx"
    report = json.loads(out.with_suffix(".json").read_text())
    assert code == (0 if report["passed"] else 1) and ("PASSED" in text) == report["passed"]
    cands = report["candidates"]
    assert [c["number"] for c in cands] == list(range(len(cands)))
    assert sum(c["same_as"] is None for c in cands) == 3  # --trials counts candidates built, not repeats
    assert cands[0]["recipe"] == "fold_batchnorm; fuse; compact"  # the original, as the exact passes leave it
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
    # the report: every candidate in the Markdown, the fronts in the JSON, the plot as a PNG
    md = out.with_suffix(".md").read_text()
    assert all(f"| {c['number']} " in md for c in cands) and "✔" in md
    assert chosen["number"] in report["fronts"]["fronts"]["lzma_bytes"]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_study_resumes(tmp_path):
    study = tmp_path / "study.db"
    first = auto(MODEL, tmp_path / "a.onnx", data=CALIB, trials=2, study=study, progress=False)
    built = [c for c in first.candidates if c.same_as is None]
    assert len(built) == 2 and first.candidates[0].number == 0
    second = auto(MODEL, tmp_path / "b.onnx", data=CALIB, trials=1, study=study, progress=False)
    assert second.candidates[:len(first.candidates)] == first.candidates
    assert sum(c.same_as is None for c in second.candidates) == 3


def test_recipes_of_the_space():
    assert space.recipe(space.original("size"), "size", 0.01) == "fold_batchnorm; fuse; compact"
    assert space.recipe(space.original("latency"), "latency", 0.01) == "fold_batchnorm; fuse"
    choices = {"prune": "0.5", "kmeans_bits": "4", "kmeans_data_aware": True, "quantize": True}
    assert space.recipe(choices, "size", 0.02) == (
        "fold_batchnorm; fuse; prune:sparsity=0.5,scope=global,max_drop=0.02; "
        "kmeans:bits=4,data_aware=true,refit=true,half_codebook=true,max_drop=0.02; "
        "quantize:target=size,max_drop=0.02; "
        "compact")
    choices = {"lowrank": "auto", "lowrank_share": 0.25, "lowrank_min_size": 16384, "kmeans_bits": "auto"}
    assert space.recipe(choices, "size", 0.01) == (
        "fold_batchnorm; fuse; lowrank:ratio=auto,ratio_of=params,data_aware=true,min_size=16384,max_samples=512,"
        "max_drop=0.0025; kmeans:bits=auto,refit=true,max_samples=512,time_budget=300,half_codebook=true,max_drop=0.01; "
        "compact")
    assert space.recipe({"quantize": True, "lowrank_macs": 0.6, "channel_ratio": 0.2}, "latency", 0.01) == (
        f"fold_batchnorm; fuse; channel_prune:ratio=0.2,scope=global,round_to={BLOCK},max_drop=0.01; "
        "lowrank:macs=0.6,max_drop=0.01; "
        "quantize:max_drop=0.01")
    # scope=sensitivity: per-group ratios from measured damage per MAC, each group measured at two levels
    params = {"quantize": True, "lowrank_macs": 1.0, "channel_ratio": 0.2, "channel_scope": "sensitivity"}
    choices = space.suggest(optuna.trial.FixedTrial(params), "latency")
    assert choices == params
    assert space.recipe(choices, "latency", 0.01, channel_block=16) == (
        "fold_batchnorm; fuse; channel_prune:ratio=0.2,scope=sensitivity,round_to=16,levels=0.25|0.5,"
        "sensitivity_samples=4,max_drop=0.01; quantize:max_drop=0.01")
    # ratio=auto: each group's ratio inside its share of the budget, checked on whole (repaired) models
    params = {"quantize": True, "lowrank_macs": 1.0, "channel_ratio": "auto", "channel_share": 0.5}
    choices = space.suggest(optuna.trial.FixedTrial(params), "latency")
    assert choices == params and choices in space.first("latency")
    assert space.recipe(choices, "latency", 0.01, channel_block=16) == (
        "fold_batchnorm; fuse; channel_prune:ratio=auto,round_to=16,levels=0.25|0.5,sensitivity_samples=4,"
        "max_macs=0.2,max_samples=512,max_drop=0.005; quantize:max_drop=0.01")
    no_channels = {"quantize": False, "lowrank_macs": 1.0, "channel_ratio": 0.0}
    assert space.suggest(optuna.trial.FixedTrial(no_channels), "latency") == no_channels


@pytest.mark.parametrize("kwargs,match", [({}, "auto needs samples"), ({"data": CALIB, "objective": "speed"},
                                          "--objective speed"), ({"data": CALIB, "max_drop": 5}, "--max-drop 5"),
                                          ({"data": CALIB, "trials": 0}, "--trials 0"),
                                          ({"data": CALIB, "workers": 0}, "--workers 0")])
def test_refusals(tmp_path, kwargs, match):
    with pytest.raises(GraphoptError, match=match):
        auto(MODEL, tmp_path / "o.onnx", **kwargs)
    assert list(tmp_path.iterdir()) == []


def _cand(number, size, drop, latency=None, error=""):
    search = {"accuracy": 1.0 - drop, "reference_accuracy": 1.0}
    return Candidate(number, f"r{number}", size, latency, None if error else search, error=error)


def test_pareto_fronts():
    cands = [_cand(0, 100, 0.0, 1.0), _cand(1, 50, 0.01, 0.9), _cand(2, 60, 0.02, 0.5), _cand(3, 40, 0.005, 1.1),
             _cand(4, 10, 0.0, error="outside the budget")]
    assert [c.number for c in pareto.front(cands, "accuracy", "lzma_bytes")] == [3, 0]
    assert [c.number for c in pareto.front(cands, "accuracy", "latency_ratio")] == [2, 1, 0]
    assert pareto.loss(cands[4], "accuracy") is None


def test_cosine_loss_is_the_gates_drop():
    """On the cosine gate the front is ordered by the gate's own drop: the worst sample's shortfall counts a fifth."""
    def cos(number, size, mean, worst):
        return Candidate(number, f"r{number}", size, 1.0, {"cosine": mean, "worst_sample_cosine": worst})
    cands = [cos(0, 100, 1.0, 1.0), cos(1, 50, 0.999, 0.90), cos(2, 60, 0.995, 0.99)]
    assert pareto.loss(cands[1], "cosine") == pytest.approx(0.02)
    assert pareto.loss(cands[2], "cosine") == pytest.approx(0.005)
    assert [c.number for c in pareto.front(cands, "cosine", "lzma_bytes")] == [1, 2, 0]
    assert pareto.loss(cands[0], "snr") is None  # no SNR recorded: no loss on that metric


def test_a_repeated_recipe_is_not_run_again(tmp_path, monkeypatch):
    runs = []
    real = candidate.run
    monkeypatch.setattr(candidate, "run", lambda job: runs.append(job.recipe) or real(job))
    monkeypatch.setattr(space, "suggest", lambda trial, objective: {"kmeans_bits": "8"})
    result = auto(MODEL, tmp_path / "o.onnx", data=CALIB, trials=3, progress=False)
    assert len(runs) == 2 and runs[1].endswith("kmeans:bits=8,refit=true,half_codebook=true,max_drop=0.01; compact")
    first, again = result.candidates[1], result.candidates[2]
    assert again.same_as == 1 and again.recipe == first.recipe and again.lzma_bytes == first.lzma_bytes
    # a repeat does not count as a trial; a space with nothing new left ends the search after MAX_REPEATS
    assert len(result.candidates) == 2 + search.MAX_REPEATS
    assert summary(result)[0].startswith(f"2 candidates ({search.MAX_REPEATS} more repeated a recipe)")


def test_the_time_budget_starts_no_candidate_it_has_no_time_left_for(tmp_path, monkeypatch):
    # A fake clock: the original takes 1 s, every other candidate 40 s, the budget is 100 s. After two 40 s
    # candidates (81 s spent) 19 s are left, fewer than the quickest one took: the search stops there.
    clock = {"now": 0.0}
    real = candidate.run

    def timed(job):
        cand = real(job)
        cand.seconds = 1.0 if job.number == 0 else 40.0
        clock["now"] += cand.seconds
        return cand

    monkeypatch.setattr(search, "_clock", lambda: clock["now"])
    monkeypatch.setattr(candidate, "run", timed)
    monkeypatch.setattr(space, "suggest", lambda trial, objective: {"kmeans_bits": "864"[trial.number % 3]})
    result = auto(MODEL, tmp_path / "o.onnx", data=CALIB, trials=10, time_budget=100, progress=False)
    assert [c.seconds for c in result.candidates] == [1.0, 40.0, 40.0] and clock["now"] == 81.0


def test_the_time_budget_stops_a_candidate_still_running(tmp_path, monkeypatch):
    # The clock starts once the original is built; the next candidate would take an hour. The budget's 2 s stop
    # that one, its trial fails, and the original is written as the pick.
    import time

    real, spent = candidate.run, {"original": 0.0}

    def slow(job):
        if job.number == 0:
            began = time.perf_counter()
            cand = real(job)
            spent["original"] = time.perf_counter() - began
            return cand
        time.sleep(3600)

    monkeypatch.setattr(search, "_clock", lambda: time.perf_counter() - spent["original"])
    monkeypatch.setattr(candidate, "run", slow)
    began = time.perf_counter()
    result = auto(MODEL, tmp_path / "o.onnx", data=CALIB, trials=5, time_budget=2, progress=False)
    assert time.perf_counter() - began < 600  # not the hour
    assert [c.number for c in result.candidates] == [0] and len(result.stopped) == 1
    assert result.stopped[0] != result.candidates[0].recipe and (tmp_path / "o.onnx").exists()
    assert "1 more stopped unfinished by the time budget" in summary(result)[0]


def test_a_search_on_a_local_dask_cluster(tmp_path, monkeypatch):
    # Two workers, every trial after the original suggesting the same recipe: while it runs, the trials asked for
    # the free worker wait for its result instead of running it again, then take it as repeats.
    monkeypatch.setattr(space, "suggest", lambda trial, objective: {"kmeans_bits": "8"})
    result = auto(MODEL, tmp_path / "o.onnx", data=CALIB, trials=3, workers=2, progress=False)
    assert result.where == "2 Dask worker(s)"
    built = [c for c in result.candidates if c.same_as is None]
    assert [c.number for c in built] == [0, 1] and all(c.seconds > 0 for c in built)
    assert len(result.candidates) == 2 + search.MAX_REPEATS
    assert all(c.same_as == 1 and c.lzma_bytes == built[1].lzma_bytes for c in result.candidates[2:])
    assert (tmp_path / "o.onnx").exists() and result.chosen.lzma_bytes <= result.candidates[0].lzma_bytes


def test_a_task_cancelled_on_a_local_cluster_stops_running():
    # Dask's cancel leaves a started task running on its worker; the search's end must not leave one computing
    # beside the latency it judges next, so the local cluster's worker processes are gone after cancel.
    import os
    import time

    import psutil

    from graphopt.auto import workers

    pool = workers.DaskWorkers(1, None, timed=False)
    try:
        worker = psutil.Process(next(iter(pool.client.run(os.getpid).values())))
        future = pool.client.submit(time.sleep, 600, pure=False)
        while not any(pool.client.processing().values()):
            time.sleep(0.1)
        pool.cancel([future])
        assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE
    finally:
        pool.close()


def test_a_killed_search_resumes_from_its_study(tmp_path):
    # SIGKILL the command once two candidates are in the study: nothing is written where the pick goes, and a
    # rerun with the same --study goes on from the trials that finished (their files kept beside the study).
    import signal
    import sqlite3
    import subprocess
    import sys
    import time

    study, out = tmp_path / "s.db", tmp_path / "o.onnx"
    argv = [sys.executable, "-m", "graphopt.cli", "auto", str(MODEL), "--data", str(CALIB), "--study", str(study),
            "-o", str(out), "--quiet"]
    proc = subprocess.Popen(argv + ["--trials", "50"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def finished() -> int:
        try:
            with sqlite3.connect(study) as db:
                return db.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
        except sqlite3.Error:  # not created yet
            return 0

    deadline = time.monotonic() + 120
    while finished() < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = finished()
    assert 2 <= done < 50 and not out.exists()
    again = subprocess.run(argv + ["--trials", "1"], capture_output=True, text=True, timeout=300)
    assert again.returncode in (0, 1), again.stderr
    report = json.loads(out.with_suffix(".json").read_text())
    assert [c["number"] for c in report["candidates"]][:done] == list(range(done))
    built = [c for c in report["candidates"] if c["same_as"] is None]
    assert len(built) == sum(c["same_as"] is None for c in report["candidates"][:done]) + 1
    assert report["candidates"][0]["recipe"] == "fold_batchnorm; fuse; compact"
    assert report["chosen"]["lzma_bytes"] == bench.file_sizes(out)[1]


def test_size_recipes_write_half_codebooks_and_compact_names(tmp_path):
    # a size recipe against the same steps (refit too) with float32 codebooks and no compact: smaller after lzma, the
    # same compressed forms (codebooks now float16), and outputs as close as centroids rounded to 11 bits allow
    import onnx

    from graphopt.pipeline import RunOptions, optimize

    run = RunOptions(latency=False, progress=False)
    sized, plain = tmp_path / "size.onnx", tmp_path / "plain.onnx"
    optimize(str(MODEL), sized, passes=space.recipe({"kmeans_bits": "4"}, "size", 0.01), calib=str(CALIB), run=run)
    optimize(str(MODEL), plain, passes="fold_batchnorm; fuse; kmeans:bits=4,refit=true,max_drop=0.01",
             calib=str(CALIB), run=run)
    proto = onnx.load(str(sized))
    books = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    layers = sum(n.op_type in ("Conv", "Gemm") for n in proto.graph.node)
    assert len(books) == sum(n.op_type == "Gather" for n in proto.graph.node) == layers  # one per weight
    assert max(len(n.name) for n in proto.graph.node) <= 2 and not proto.graph.value_info
    assert bench.file_sizes(sized)[1] < bench.file_sizes(plain)[1]
    test = np.load(DIGITS / "test.npz")["input"]
    a = make_session(str(plain)).run(None, {"input": test})[0]
    b = make_session(str(sized)).run(None, {"input": test})[0]
    # float16 centroids: each weight off by at most 2^-11 of itself; the logits by far less than 1% of their range
    assert np.abs(a - b).max() < 0.01 * np.abs(a).max()
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.99


def test_auto_never_returns_a_pick_slower_than_its_input(tmp_path, monkeypatch):
    """Size candidates are not timed while built; the pick is. With a (fake) CPU on which every compressed
    candidate runs twice as long as the input, auto returns the original (exact passes only) and says why."""
    from pathlib import Path

    from graphopt import latency

    def twice_as_long(models, feeds, *args, **kwargs):
        slow = [Path(str(m)).stem.startswith("candidate") and Path(str(m)).stem != "candidate0" for m in models]
        return [[2.0 if s else 1.0] * 10 for s in slow]

    monkeypatch.setattr(latency, "time_rounds", twice_as_long)
    result = auto(MODEL, tmp_path / "p.onnx", data=CALIB, objective="size", trials=2, progress=False)
    assert result.candidates[1].lzma_bytes < result.candidates[0].lzma_bytes  # a smaller one was found ...
    assert result.chosen.number == 0 and result.latency_ratio == pytest.approx(1.0)  # ... and passed over
    assert [f["number"] for f in result.failed_holdout] == [1]
    assert result.failed_holdout[0]["why"].startswith("slower than the original: x2.000")
    assert result.passed


def test_the_mixed_widths_share_by_op_type_and_stay_inside_the_budget(tmp_path):
    from graphopt.pipeline import RunOptions, optimize

    out = tmp_path / "mixed.onnx"
    report = optimize(MODEL, out, passes=space.recipe({"kmeans_bits": space.MIXED, "kmeans_data_aware": True},
                                                      "size", 0.01),
                      data=CALIB, run=RunOptions(latency=False, progress=False))
    row = next(p for p in report.passes if p.step.startswith("kmeans"))
    assert row.status == "kept" and report.passed
    shared = {r["layer"]: r for r in row.rows or [] if "codebook" in r}
    assert shared and {r["bits"] for r in shared.values()} <= {8, 4}
    for r in shared.values():  # one codebook per channel on Convs, one per layer on Gemms
        assert len(r["codebook"]) == (2 if r["op"] == "Conv" else 1), r
    assert any("whole-model checks" in n for n in row.notes)  # the widths were sought inside the budget
    assert bench.file_sizes(out)[1] < bench.file_sizes(MODEL)[1] / 3


def test_the_first_candidates_after_the_original_are_the_strong_starting_points(tmp_path):
    """A search with room for few candidates (a slow model) starts from what a hand recipe would try first."""
    result = auto(MODEL, tmp_path / "p.onnx", data=CALIB, objective="latency", trials=2, progress=False)
    recipes = [c.recipe for c in result.candidates]
    assert recipes == [space.recipe(space.original("latency"), "latency", 0.01),
                       space.recipe(space.first("latency")[0], "latency", 0.01)]
    assert recipes[1] == "fold_batchnorm; fuse; quantize:max_drop=0.01"
    mixed, steady, seeking = (space.recipe(c, "size", 0.01) for c in space.first("size")[:3])
    # the best hand recipe's widths, sought inside the budget: 8, 6 or 4 bits per layer, a codebook per Conv channel
    assert "kmeans:bits=auto,levels=8|6|4,per_channel=Conv|ConvTranspose" in mixed and "quantize" not in mixed
    # then a quick, near-lossless fixed width: nothing measured, one codebook per layer
    assert steady == ("fold_batchnorm; fuse; kmeans:bits=6,data_aware=true,refit=true,half_codebook=true,"
                      "max_drop=0.01; compact")
    assert "kmeans:bits=auto,data_aware=true,per_channel=true" in seeking and "lowrank" not in seeking


@pytest.mark.parametrize("verdicts, pick, judged", [
    # a slower pick says nothing about the held-out samples: it does not count against the accuracy tries
    ({1: "outside", 2: "outside", 3: "slower", 4: "ok"}, 4, [1, 2, 3, 4]),
    ({1: "outside", 2: "outside", 3: "outside", 4: "ok"}, 0, [1, 2, 3, 0]),
    ({1: "slower", 2: "slower", 3: "slower", 4: "ok"}, 0, [1, 2, 3, 0]),
])
def test_the_judgement_counts_accuracy_and_latency_failures_apart(verdicts, pick, judged):
    from pathlib import Path

    from graphopt.auto.choose import Verdict, choose
    from graphopt.latency import Ratio

    original = "fold_batchnorm; fuse; compact"
    cands = [Candidate(0, original, lzma_bytes=100, search={})]
    cands += [Candidate(n, f"kmeans:bits={n}", lzma_bytes=40 + 10 * n, search={}) for n in range(1, 6)]  # #1 best
    seen = []

    def judge(path: Path) -> Verdict:
        n = int(path.stem)
        seen.append(n)
        says = verdicts.get(n, "ok")
        return Verdict({}, says != "outside", Ratio(2.0 if says == "slower" else 1.0, 0.05, 20))

    chosen, _, verdict, passed_over = choose(cands, "size", original, judge,
                                             lambda c: (c, Path(f"{c.number}.onnx")))
    assert chosen.number == pick and seen == judged
    assert [p["number"] for p in passed_over] == [n for n in judged if n != pick]


def test_the_judgement_adds_one_standard_error_from_the_changed_predictions(tmp_path, monkeypatch):
    """With labels, the held-out accuracy drop is a net count: flips both ways cancel on these samples, not on
    others. The judgement holds drop + sqrt(changed share / n) to the budget, both counted here with onnxruntime."""
    import onnx
    from onnx import numpy_helper

    from graphopt import data as datamod
    from graphopt import latency
    from graphopt.auto.choose import OUTSIDE, Judge
    from graphopt.modelio import load_model

    noisy, rng = onnx.load(str(MODEL)), np.random.default_rng(0)
    for init in noisy.graph.initializer:  # weights 0.4 of their spread off: 4 of the 200 predictions change
        w = numpy_helper.to_array(init)
        if w.ndim >= 2:
            init.CopyFrom(numpy_helper.from_array((w + 0.4 * w.std() * rng.standard_normal(w.shape)).astype(w.dtype),
                                                  init.name))
    onnx.save(noisy, tmp_path / "noisy.onnx")
    calib = np.load(CALIB)
    ref, got = (make_session(str(m)).run(None, {"input": calib["input"]})[0].argmax(1)
                for m in (MODEL, tmp_path / "noisy.onnx"))
    n = len(ref)
    drop = ((ref == calib["labels"]).sum() - (got == calib["labels"]).sum()) / n
    spread = np.sqrt((ref != got).mean() / n)
    assert 0 < drop < 0.05 and spread > 0.005

    monkeypatch.setattr(latency, "time_rounds", lambda models, *a, **k: [[1.0] * 10 for _ in models])
    specs = datamod.input_specs(load_model(MODEL))
    holdout = datamod.load_data(CALIB, specs)
    verdicts = {budget: Judge(MODEL, holdout, budget, None, 1, None, latency.batch_one(specs, holdout.feeds[:4]))(
        tmp_path / "noisy.onnx") for budget in (drop + 0.5 * spread, drop + 1.01 * spread)}
    inside, outside = verdicts[drop + 1.01 * spread], verdicts[drop + 0.5 * spread]
    assert inside.holdout["accuracy"] == pytest.approx((got == calib["labels"]).mean())
    assert inside.accurate and not outside.accurate and outside.why_not == OUTSIDE
    assert inside.spread == pytest.approx(spread)  # what the summary line names


def test_a_run_reports_the_spread_its_search_candidates_are_held_to(tmp_path):
    """optimize's report carries the accuracy drop and the standard error auto adds to a candidate's accuracy drop on the search
    samples: sqrt(share of changed predictions / n), counted here with onnxruntime."""
    from graphopt.pipeline import RunOptions, optimize

    out = tmp_path / "two_bits.onnx"
    test = DIGITS / "test.npz"  # the evaluation samples, all of them
    report = optimize(MODEL, out, passes="kmeans:bits=2,max_drop=1", calib=CALIB, data=test, max_drop=1.0,
                      run=RunOptions(latency=False, progress=False))
    x = np.load(test)["input"]
    ref, got = (make_session(str(m)).run(None, {"input": x})[0].argmax(1) for m in (MODEL, out))
    assert report.final["samples"] == len(ref) and (ref != got).any()  # 2 bits change some predictions
    assert report.final_spread == pytest.approx(np.sqrt((ref != got).mean() / len(ref)))
    labels = np.load(test)["labels"]
    assert report.final_drop == pytest.approx((ref == labels).mean() - (got == labels).mean())
    fixed = optimize(MODEL, tmp_path / "exact.onnx", passes="fuse", calib=CALIB, data=test,
                     run=RunOptions(latency=False, progress=False))
    assert fixed.final_spread == 0.0  # nothing changed


def test_recipes_that_build_the_same_file_compete_once(tmp_path):
    """A recipe whose lossy step rolls back builds the file a shorter recipe built: its timing differs only by noise
    (PP-OCR cls, AVX2: x0.664 against the fused original's x0.696, the same bytes), so it must not win on it."""
    from graphopt.auto.choose import Verdict, choose
    from graphopt.data import input_specs, load_data
    from graphopt.latency import Ratio
    from graphopt.modelio import load_model

    search_samples = load_data(str(CALIB), input_specs(load_model(str(MODEL))))

    def build(number, recipe):
        return candidate.run(candidate.Job(MODEL, tmp_path, number, recipe, search_samples, "latency", 0.01, None, 1))

    fused = build(0, "fold_batchnorm; fuse")
    wrecked = build(1, "fold_batchnorm; fuse; prune:sparsity=0.99,scope=global")  # far outside 1 point: rolled back
    pruned = build(2, "fold_batchnorm; fuse; prune:sparsity=0.3,scope=global")  # inside it: kept
    assert fused.digest and wrecked.digest == fused.digest and pruned.digest != fused.digest
    assert (tmp_path / "candidate1.onnx").read_bytes() == (tmp_path / "candidate0.onnx").read_bytes()
    # timed: the repeat of #0 lucky, #2 in between
    fused.latency_ratio, wrecked.latency_ratio, pruned.latency_ratio = 0.70, 0.60, 0.65
    cands = [fused, wrecked, pruned]
    judged = []

    def judge(path):
        judged.append(path.name)
        return Verdict({}, True, Ratio(1.0, 0.05, 20))

    chosen, *_ = choose(cands, "latency", fused.recipe, judge, lambda c: (c, tmp_path / f"candidate{c.number}.onnx"))
    assert chosen.number == 2 and judged == ["candidate2.onnx"]
    assert 1 not in [c.number for c in pareto.front(cands, "agreement", "latency_ratio")]
    table = pareto.markdown(cands, "agreement", chosen, [], objective="latency")
    assert "built the same file as #0" in next(line for line in table.splitlines() if line.startswith("| 1 "))
