"""The latency guard, decided by injected fake timings — never by this CPU's real speed.

Fake passes set a ``fake_ms`` metadata key on the model; the fake timer reads it back from whatever it is given
(the input file, an onnxruntime session, a proto) and reports that many milliseconds, with ±0.5% seeded jitter
per round, so the guard's noise margin is its floor (2%).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np
import onnx
import pytest

import graphopt
from graphopt import cli, latency
from graphopt.latency import LatencyProbe, paired_ratio
from graphopt.options import BaseOptions, option
from graphopt.passbase import GraphoptPass, PassContext
from graphopt.passes.cleanup import Cleanup
from graphopt.pipeline import RunOptions
from tests.helpers import DIGITS, ONNXSIM_FEEDS, assert_same_outputs, clone, onnxsim_friendly_model

MODEL, CALIB, TEST = DIGITS / "digits.onnx", DIGITS / "calib.npz", DIGITS / "test.npz"


def _metadata(model) -> dict[str, str]:
    if hasattr(model, "get_modelmeta"):
        return dict(model.get_modelmeta().custom_metadata_map)
    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(str(model), load_external_data=False)
    if isinstance(model, onnx.ModelProto):
        return {p.key: p.value for p in model.metadata_props}
    return dict(model.metadata_props)


class FakeTimer:
    """``ms(model)`` milliseconds per round, ±0.5% jitter; counts how often it was asked."""

    def __init__(self, ms=lambda m: float(_metadata(m).get("fake_ms", 1.0)), rounds: int = 20):
        self.ms, self.rounds, self.calls = ms, rounds, 0
        self.rng = np.random.default_rng(0)

    def __call__(self, models, feeds):
        self.calls += 1
        return [[self.ms(m) * (1 + 0.005 * j) for j in self.rng.uniform(-1, 1, self.rounds)] for m in models]


class Slowdown(GraphoptPass):
    """Multiplies the model's fake latency by ``factor`` (the outputs are untouched)."""

    name = "slowdown"

    @dataclasses.dataclass(frozen=True)
    class Options(BaseOptions):
        factor: float = option(1.1, "fake latency factor", low=0.0)

    def call(self, model):
        ms = float(model.metadata_props.get("fake_ms", "1.0")) * self.options.factor
        model.metadata_props["fake_ms"] = repr(ms)
        return self.result(model, [{"fake_ms": ms}])


class SizeSlowdown(Slowdown):
    name = "size_slowdown"
    size_objective = True


@pytest.fixture
def fake_passes(register_passes):
    register_passes(Slowdown, SizeSlowdown)


def _said(text: str, prefix: str) -> float:
    """The ratio a reason or note states after ``prefix``."""
    assert text.startswith(prefix), text
    return float(re.match(r"[0-9.]+", text[len(prefix):]).group())


def _run(tmp_path, passes: str, timer: FakeTimer | None = None, **run) -> tuple[dict, dict]:
    out = tmp_path / "out.onnx"
    report = graphopt.optimize(str(MODEL), out, passes=passes, calib=str(CALIB), data=str(TEST),
                               run=RunOptions(progress=False, timer=timer or FakeTimer(), **run))
    rows = {r.step: r for r in report.passes}
    return rows, _metadata(out)


def test_paired_ratio_and_its_margin():
    base = [10.0] * 40
    assert paired_ratio(base, [11.0] * 40).value == pytest.approx(1.1)
    assert paired_ratio(base, [11.0] * 40).margin == latency.MIN_MARGIN  # no spread: the floor
    noisy = np.random.default_rng(1).uniform(0.8, 1.2, 40) * 10  # ±20% per round
    wide = paired_ratio(base, noisy)
    assert 0.05 < wide.margin < 0.2 and not wide.slower  # an honest interval: 1.0 lies inside it
    assert paired_ratio(base, noisy * 1.5).slower


def test_a_slower_pass_is_rolled_back(tmp_path, fake_passes):
    rows, final = _run(tmp_path, "slowdown:factor=1.1; fold_batchnorm")
    row = rows["slowdown:factor=1.1"]
    assert row.status == "rolled back" and _said(row.reason, "slower than before it: x") == pytest.approx(1.1, abs=0.01)
    assert row.latency_vs_before == pytest.approx(1.1, abs=0.01) and row.latency_noise == latency.MIN_MARGIN
    assert rows["fold_batchnorm"].status == "kept"
    assert "fake_ms" not in final  # the written model is the one from before the slow pass


def test_a_pass_inside_the_margin_is_kept(tmp_path, fake_passes):
    rows, final = _run(tmp_path, "slowdown:factor=1.01")
    assert rows["slowdown:factor=1.01"].status == "kept"
    assert float(final["fake_ms"]) == pytest.approx(1.01)


def test_slow_creep_is_stopped_at_the_input(tmp_path, fake_passes):
    # each step is within the margin of the one before it; the third would leave the input's margin behind
    rows, final = _run(tmp_path, "slowdown:factor=1.012; slowdown:factor=1.012,max_drop=0.5")
    first, second = rows["slowdown:factor=1.012"], rows["slowdown:factor=1.012,max_drop=0.5"]
    assert first.status == "kept" and second.status == "rolled back"
    assert _said(second.reason, "slower than the input: x") == pytest.approx(1.012 ** 2, abs=0.005)
    assert float(final["fake_ms"]) == pytest.approx(1.012)


def test_ambiguous_timings_are_repeated():
    timer = FakeTimer(lambda m: 1.0)
    probe = LatencyProbe([{}], timer=timer)
    probe.compare("a", "b")  # x1.00: clear
    assert timer.calls == 1
    timer.ms = lambda m: 1.03 if m == "b" else 1.0  # above 1, within twice the margin: timed again
    timing = probe.compare("a", "b")
    assert timer.calls == 3 and timing.vs_before.rounds == 2 * timer.rounds and timing.vs_before.slower


@pytest.mark.parametrize("passes,why", [("size_slowdown:factor=1.3", "the pass aims at size"),
                                        ("slowdown:factor=1.3", "--allow-slower")])
def test_slower_kept_when_asked_for(tmp_path, fake_passes, passes, why):
    rows, final = _run(tmp_path, passes, allow_slower=why == "--allow-slower")
    assert rows[passes].status == "kept" and float(final["fake_ms"]) == pytest.approx(1.3)
    note, = [n for n in rows[passes].notes if n.startswith("slower than before it")]
    assert _said(note, "slower than before it, x") == pytest.approx(1.3, abs=0.01) and note.endswith(why)


def test_guard_off_without_timing(tmp_path, fake_passes):
    timer = FakeTimer()
    out = tmp_path / "o.onnx"
    report = graphopt.optimize(str(MODEL), out, passes="slowdown:factor=2", calib=str(CALIB), data=str(TEST),
                               run=RunOptions(progress=False, latency=False, timer=timer))
    assert report.passes[-2].status == "kept" and timer.calls == 0
    assert "latency guard off" in report.passes[0].notes[-1]


def _fewer_nodes_slower(model) -> float:
    """Fake: onnxsim's model (fewer nodes) is 20% slower than without it."""
    proto = model if isinstance(model, onnx.ModelProto) else None
    return 1.2 if proto is not None and not any(n.op_type == "Reshape" for n in proto.graph.node) else 1.0


def test_cleanup_keeps_onnxsim_only_when_not_slower():
    timer = FakeTimer(_fewer_nodes_slower)
    model = onnxsim_friendly_model()
    reference = clone(model)
    result = Cleanup(context=PassContext(latency=LatencyProbe([ONNXSIM_FEEDS], timer=timer)))(model)
    sim = next(r for r in result.rows if r["step"] == "onnxsim")
    assert sim["kept"] is False and sim["latency_vs_without"] == pytest.approx(1.2, abs=0.01)
    note, = [n for n in result.notes if n.startswith("onnxsim undone")]
    assert _said(note, "onnxsim undone: slower than without it, x") == pytest.approx(1.2, abs=0.01)
    assert any(n.op_type == "Reshape" for n in model.graph)  # the model without onnxsim
    assert_same_outputs(reference, model, ONNXSIM_FEEDS, rtol=0, atol=0)
    faster = onnxsim_friendly_model()
    probe = LatencyProbe([ONNXSIM_FEEDS], timer=FakeTimer(lambda m: 1.0))
    result = Cleanup(context=PassContext(latency=probe))(faster)
    assert next(r for r in result.rows if r["step"] == "onnxsim")["kept"] is True
    assert not any(n.op_type == "Reshape" for n in faster.graph)


def test_report_shows_the_guard(tmp_path, fake_passes):
    report_path = tmp_path / "r.json"
    out = tmp_path / "o.onnx"
    graphopt.optimize(str(MODEL), out, passes="slowdown:factor=1.5", calib=str(CALIB), data=str(TEST),
                      run=RunOptions(progress=False, timer=FakeTimer()), report_path=report_path)
    data = json.loads(report_path.read_text())
    row = next(r for r in data["passes"] if r["step"] == "slowdown:factor=1.5")
    assert row["status"] == "rolled back" and row["latency_vs_before"] == pytest.approx(1.5, abs=0.01)
    assert "x before" in report_path.with_suffix(".md").read_text()


def test_allow_slower_on_the_command_line(tmp_path, capsys):
    report_path = tmp_path / "r.json"
    code = cli.main(["optimize", str(MODEL), "-o", str(tmp_path / "o.onnx"), "--data", str(TEST), "--quiet",
                     "--passes", "fold_batchnorm", "--allow-slower", "--report", str(report_path)])
    assert code == 0 and "x before" in capsys.readouterr().out
    notes = json.loads(report_path.read_text())["passes"][0]["notes"]
    assert any("--allow-slower: slower passes are kept and noted" in n for n in notes)


def test_latency_is_timed_at_batch_one_when_the_batch_axis_is_free():
    from graphopt.data.sources import InputSpec

    feeds = [{"ids": np.zeros((8, 128), np.int64), "mask": np.ones((8, 128), np.int64)}]
    free = [InputSpec("ids", np.dtype(np.int64), ("batch", "seq")), InputSpec("mask", np.dtype(np.int64), (None, 128))]
    assert [v.shape for v in latency.batch_one(free, feeds)[0].values()] == [(1, 128), (1, 128)]
    fixed = [free[0], InputSpec("mask", np.dtype(np.int64), (8, 128))]
    assert latency.batch_one(fixed, feeds) is feeds  # a fixed batch of 8 must stay 8
    assert latency.batch_one([InputSpec("ids", np.dtype(np.int64), None)], feeds) is feeds  # rank unknown
