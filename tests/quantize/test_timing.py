"""graphopt.passes.quantize.timing, with injected clocks and sessions: whole-model ratios (time_candidates,
time_models), the one-node timings (time_layers) and the shapes they are built from (capture_shapes)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

from graphopt import data as datamod, latency
from graphopt.passes.quantize import qdq
from graphopt.passes.quantize import timing as qt
from tests.helpers import make_model, randn, tensor_info

# --- whole models: time_candidates / time_models ------------------------------------------------------------


def _relu_model(tag: str):
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [tensor_info("x", np.float32, [2, 3])],
                       [tensor_info("y", np.float32, [2, 3])])
    model.graph.doc_string = tag
    return model


class FakeRuntime:
    """Sessions whose ``run`` advances a fake clock by a set number of ms (``ms(model tag, call index)``), and
    the clock itself (``perf_counter``). Records every run: (tag, feed)."""

    def __init__(self, ms):
        self.ms, self.now, self.runs = ms, 0.0, []

    def perf_counter(self) -> float:
        return self.now

    def make_session(self, model, threads=1):
        tag, runtime = model.graph.doc_string, self

        class Session:
            calls = 0

            def get_inputs(self):
                return [SimpleNamespace(name="x")]

            def run(self, outputs, feed):
                runtime.runs.append((tag, feed))
                runtime.now += runtime.ms(tag, self.calls) / 1000.0
                self.calls += 1
                return [feed["x"]]

        return Session()


@pytest.fixture
def feeds():
    # "other" is not a model input: each session gets only its own inputs
    return SimpleNamespace(feeds=[{"x": randn([2, 3], seed), "other": randn([1], seed)} for seed in (1, 2, 3)])


def _install(monkeypatch, runtime: FakeRuntime) -> None:
    # time_candidates times through graphopt.latency.time_rounds
    monkeypatch.setattr(latency, "runtime", SimpleNamespace(make_session=runtime.make_session))
    monkeypatch.setattr(latency, "time", SimpleNamespace(perf_counter=runtime.perf_counter))
    monkeypatch.setattr(qt, "time", SimpleNamespace(perf_counter=runtime.perf_counter))


def test_time_candidates_returns_the_timed_ratios(monkeypatch, feeds):
    runtime = FakeRuntime(lambda tag, call: {"ref": 2.0, "a": 1.0, "b": 3.0}[tag])
    _install(monkeypatch, runtime)
    ratios = qt.time_candidates(_relu_model("ref"), [_relu_model("a"), _relu_model("b")], feeds, repeats=5,
                                min_time_s=0.0)
    assert ratios == pytest.approx([0.5, 1.5], rel=1e-9)
    # two warm-up runs, then exactly `repeats` rounds (no time floor) of every model
    tags = [tag for tag, _ in runtime.runs]
    assert all(tags.count(t) == 2 + 5 for t in ("ref", "a", "b"))
    assert tags[:6] == ["ref", "a", "b", "ref", "a", "b"]  # warm-up: in order, feed 0 then feed 1
    rounds = [tags[6 + 3 * r:9 + 3 * r] for r in range(5)]
    assert all(sorted(r) == ["a", "b", "ref"] for r in rounds)  # each round runs every model once...
    assert len({tuple(r) for r in rounds}) > 1  # ...in a fresh random order
    # only the first two feeds, alternating, and only the model's own inputs
    ref_feeds = [feed for tag, feed in runtime.runs if tag == "ref"]
    assert all(list(f) == ["x"] for f in ref_feeds)
    expected = [feeds.feeds[i % 2]["x"] for i in (0, 1, 0, 1, 0, 1, 0)]
    assert all(np.array_equal(f["x"], e) for f, e in zip(ref_feeds, expected))


def test_time_candidates_is_the_median_of_paired_round_ratios(monkeypatch, feeds):
    # The reference's third timed run (a load burst) takes 10x: that round's ratios are 10x smaller, but the
    # median over rounds ignores it. (The ratio of mean times would be 5 / (4*2 + 20) = 0.18 for "a".)
    def ms(tag, call):
        base = {"ref": 2.0, "a": 1.0, "b": 3.0}[tag]
        return base * 10 if tag == "ref" and call == 4 else base  # calls 0-1 warm up: the third timed round

    _install(monkeypatch, FakeRuntime(ms))
    ratios = qt.time_candidates(_relu_model("ref"), [_relu_model("a"), _relu_model("b")], feeds, repeats=5,
                                min_time_s=0.0)
    assert ratios == pytest.approx([0.5, 1.5], rel=1e-9)


def test_time_candidates_runs_until_the_time_floor(monkeypatch, feeds):
    # repeats=1 but min_time_s=10 ms per candidate (20 ms for two): rounds of 2+1+3 = 6 fake ms -> 4 rounds
    runtime = FakeRuntime(lambda tag, call: {"ref": 2.0, "a": 1.0, "b": 3.0}[tag])
    _install(monkeypatch, runtime)
    qt.time_candidates(_relu_model("ref"), [_relu_model("a"), _relu_model("b")], feeds, repeats=1, min_time_s=0.01)
    assert [tag for tag, _ in runtime.runs].count("ref") == 2 + 4


def test_whole_models_are_timed_per_sample_when_the_batch_axis_is_free(monkeypatch):
    # Calibration feeds hold many samples (32 from an npz); a model with a free batch axis is timed on each feed's
    # first sample, as the pipeline's latency guard times it (batch 1), not on the whole feed.
    def relu(tag):
        model = make_model([helper.make_node("Relu", ["x"], ["y"])], [tensor_info("x", np.float32, ["N", 3])],
                           [tensor_info("y", np.float32, ["N", 3])])
        model.graph.doc_string = tag
        return model

    runtime = FakeRuntime(lambda tag, call: {"ref": 2.0, "a": 1.0}[tag])
    _install(monkeypatch, runtime)
    data = SimpleNamespace(feeds=[{"x": randn([32, 3], seed)} for seed in (1, 2, 3)])
    assert qt.time_candidates(relu("ref"), [relu("a")], data, repeats=3, min_time_s=0.0) == \
        pytest.approx([0.5], rel=1e-9)
    assert {feed["x"].shape for _, feed in runtime.runs} == {(1, 3)}
    assert {feed["x"].tobytes() for _, feed in runtime.runs} == {data.feeds[i]["x"][:1].tobytes() for i in (0, 1)}


def test_time_models_is_the_one_candidate_ratio(monkeypatch, feeds):
    _install(monkeypatch, FakeRuntime(lambda tag, call: {"ref": 4.0, "a": 3.0}[tag]))
    assert qt.time_models(_relu_model("ref"), _relu_model("a"), feeds, repeats=3, min_time_s=0.0) == \
        pytest.approx(0.75, rel=1e-9)


def test_heavy_models_are_timed_one_after_the_other(monkeypatch, feeds):
    # A model over verify.LARGE_BYTES: one session at a time (never the float weights beside a candidate's).
    runtime = FakeRuntime(lambda tag, call: {"ref": 2.0, "a": 1.0, "b": 3.0}[tag])
    _install(monkeypatch, runtime)
    monkeypatch.setattr(qt, "is_heavy", lambda model: True)
    ratios = qt.time_candidates(_relu_model("ref"), [_relu_model("a"), _relu_model("b")], feeds, repeats=5,
                                min_time_s=0.0)
    assert ratios == pytest.approx([0.5, 1.5], rel=1e-9)
    assert [tag for tag, _ in runtime.runs] == ["ref"] * 7 + ["a"] * 7 + ["b"] * 7


# --- one-node models: time_layers ------------------------------------------------------------------------------


def _matmul_model():
    w = randn([16, 8], 5)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
             helper.make_node("MatMul", ["m", "W2"], ["y"], name="mm2")]
    model = make_model(nodes, [tensor_info("x", np.float32, [2, 16])], [tensor_info("y", np.float32, [2, 4])],
                       {"W": w, "W2": randn([8, 4], 6)})
    return model, w


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def test_time_layers_builds_three_models_and_subtracts_the_boundary(monkeypatch):
    model, w = _matmul_model()
    seen = []

    def time_rounds(models, feeds, *args, **kwargs):  # per model its rounds: float, int8, boundary, dynamic
        seen.append((models, feeds))
        return [[ms, 9.0, ms] for ms in (1.0, 0.7, 0.2, 0.4)[:len(models)]]  # medians 1.0, 0.7, 0.2, 0.4

    monkeypatch.setattr(qt, "time_rounds", time_rounds)
    mm = next(n for n in model.graph if n.name == "mm")
    ranges = {"x": (-1.0, 1.0), "m": (-4.0, 4.0)}
    timed = qt.time_layers(model, [mm], ranges, qdq.QdqConfig(), {"x": (2, 16), "m": (2, 8)}, dynamic=True)
    t = timed["mm"]
    assert (t.node, t.op, t.float_ms, t.boundary_ms, t.dynamic_ms, t.elems) == ("mm", "MatMul", 1.0, 0.2, 0.4,
                                                                                2 * 16 + 2 * 8)
    assert t.int8_ms == pytest.approx(0.5)  # the int8 model minus its boundary: the kernel alone
    assert t.gain_ms == pytest.approx(0.5)
    assert t.row() == {"node": "mm", "op": "MatMul", "action": "timed", "float_ms": 1.0, "int8_kernel_ms": 0.5,
                       "qdq_boundary_ms": 0.2, "dynamic_ms": 0.4}
    (models, feed), = seen
    assert _ops(models[0]) == ["MatMul"]
    assert _ops(models[1]).count("QuantizeLinear") == 2 and _ops(models[1]).count("DequantizeLinear") == 3
    assert "MatMul" in _ops(models[1])
    assert sorted(_ops(models[2])) == ["DequantizeLinear", "QuantizeLinear"]
    assert "MatMulInteger" in _ops(models[3]) and "DynamicQuantizeLinear" in _ops(models[3])
    (f,) = feed
    assert f["x"].shape == (2, 16) and f["x"].min() >= -1.0 and f["x"].max() <= 1.0
    assert f["m__q"].shape == (2, 8) and f["m__q"].dtype == np.uint8
    # the model itself is untouched: no Q/DQ, the same float weight
    assert [n.op_type for n in model.graph] == ["MatMul", "MatMul"]
    np.testing.assert_array_equal(model.graph.initializers["W"].const_value.numpy(), w)


def test_time_layers_skips_unknown_shapes_and_clamps_the_kernel_at_zero(monkeypatch):
    model, _ = _matmul_model()
    # the int8 model measured faster than its boundary alone (noise): the kernel time is 0, not negative
    monkeypatch.setattr(qt, "time_rounds", lambda models, feeds, *a, **kw: [[ms] for ms in (1.0, 0.1, 0.3)])
    nodes = list(model.graph)
    ranges = {"x": (-1.0, 1.0), "m": (-4.0, 4.0), "y": (-9.0, 9.0)}
    timed = qt.time_layers(model, nodes, ranges, qdq.QdqConfig(), {"x": (2, 16), "m": (2, 8)})
    assert list(timed) == ["mm"]  # mm2's output shape was not captured: not timed
    assert timed["mm"].int8_ms == 0.0 and timed["mm"].dynamic_ms is None


def test_capture_shapes_reads_the_first_feed():
    model = make_model([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Sigmoid", ["r"], ["y"])],
                       [tensor_info("x", np.float32, ["N", 3])], [tensor_info("y", np.float32, ["N", 3])])
    data = datamod.load_data([{"x": randn([5, 3], 1)}, {"x": randn([7, 3], 2)}], datamod.input_specs(model),
                             batch_size=5)
    assert qt.capture_shapes(model, ["r", "y", "r"], data) == {"r": (5, 3), "y": (5, 3)}
