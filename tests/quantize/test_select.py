"""graphopt.passes.quantize.select, called directly with injected timings and accuracy measurements: each
selection step (dynamic by option, per-op timing, regions that do not pay for their Q/DQ, the accuracy budget,
the whole-model choice) decides what its inputs say, and select itself never edits the model."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

from graphopt import data as datamod
from graphopt import sensitivity as sens
from graphopt.graphs import infer_shapes
from graphopt.passbase import PassContext
from graphopt.passes.quantize import QuantizeOptions, qdq
from graphopt.passes.quantize import placement as qp
from graphopt.passes.quantize import select as qs
from graphopt.passes.quantize.calibrate import calibrate
from graphopt.passes.quantize.plan import plan
from tests.helpers import FakeAccuracy, is_int8, make_proto, tensor_info, two_convs


def _select(proto, feeds, layer_timer=None, model_timer=None, max_drop=None, budget_s=60.0,
            **options) -> qs.Selection:
    """plan → calibrate → select, as the quantize pass runs them; the model must come out of select unedited."""
    model = ir.serde.deserialize_model(proto)
    infer_shapes(model)
    calib = datamod.load_data(feeds, datamod.input_specs(model))
    opts, ctx = QuantizeOptions(**options), PassContext(calib=calib, max_drop=max_drop)
    ranges = calibrate(model, plan(model, opts).tensors(opts.quantize_outputs), calib)
    cfg = qdq.QdqConfig("uint8", opts.per_channel, opts.quantize_outputs, ctx.target.saturates)
    placer = qp.Placement(budget_s=budget_s, layer_timer=layer_timer, model_timer=model_timer)
    selection = qs.select(model, plan(model, opts, ranges), ranges, opts, ctx, cfg, placer)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear") for n in model.graph)
    return selection


def _timings(**times: tuple) -> qp.LayerTimer:
    """A LayerTimer: node name → LayerTiming fields after (node, op): float, int8 kernel, boundary, elems[, dynamic]."""
    def timer(model, nodes, ranges, cfg, budget):
        return {n.name: qp.LayerTiming(n.name, n.op_type, *times[n.name]) for n in nodes if n.name in times}
    return timer


def _names(nodes) -> list[str]:
    return [n.name for n in nodes]


def _reasons(selection: qs.Selection) -> dict[str, str]:
    return {n.name: r for n, r in selection.plan.skipped.items() if n.name}


def _never(*args):
    raise AssertionError("not expected to be called")


def _convs(separated: bool = False):
    return two_convs(separated, np.random.default_rng(0))


# --- per-op timing and regions --------------------------------------------------------------------------------


def test_op_whose_int8_kernel_is_slower_stays_float():
    seen = []

    def model_timer(ref: ir.Model, cand: ir.Model) -> float:  # every whole model equally fast: placement wins
        seen.append((is_int8(cand, "conv1"), is_int8(cand, "conv2"),
                     next(n.inputs[2].const_value.numpy().dtype.name for n in cand.graph if n.op_type == "QuantizeLinear")))
        return 0.5

    selection = _select(*_convs(), _timings(conv1=(1.0, 0.3, 0.0, 1), conv2=(1.0, 1.5, 0.0, 1)), model_timer)
    assert _names(selection.plan.nodes) == ["conv1"]
    assert _reasons(selection)["conv2"] == "int8 kernel measured slower: 1.500 ms vs 1.000 ms float"
    assert sorted(r["node"] for r in selection.rows if r["action"] == "timed") == ["conv1", "conv2"]
    assert "kept float by measurement (latency or accuracy): exclude_nodes=conv2" in selection.notes
    # the whole-model candidates: the placement and every planned op, each in uint8 and (auto) int8 activations
    assert sorted(seen) == sorted([(True, False, "uint8"), (True, True, "uint8"), (True, False, "int8"),
                                   (True, True, "int8")])
    assert selection.activation_type == "uint8"
    assert any(n.startswith("whole model measured at 0.50x float latency") for n in selection.notes)


@pytest.mark.parametrize("boundary_ms, elems, kept", [
    (1.0, 1000, []),  # a Q or DQ costs 1 µs per element: no region's 0.5 ms gain pays for its boundaries
    (1e-6, 1000, ["conv1", "conv2"]),  # boundaries nearly free: both regions pay
])
def test_region_that_does_not_pay_for_its_q_dq_goes_float(boundary_ms, elems, kept):
    timing = (1.0, 0.5, boundary_ms, elems)  # every kernel gains 0.5 ms
    selection = _select(*_convs(separated=True), _timings(conv1=timing, conv2=timing),
                        (lambda ref, cand: 0.5) if kept else _never)
    assert _names(selection.plan.nodes) == kept
    if not kept:
        # conv1: 0.5 ms - 1 µs x (x: 2*4*8*8 = 512 in + r1: 2*8*8*8 = 1024 out); conv2: 0.5 - 1 µs x (1024 + 1024)
        reasons = _reasons(selection)
        assert {n: reasons[n] for n in ("conv1", "conv2")} == {
            "conv1": "its int8 region does not pay for its Q/DQ (est. -1.036 ms)",
            "conv2": "its int8 region does not pay for its Q/DQ (est. -1.548 ms)"}


def _matmul():
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    proto = make_proto(nodes, [tensor_info("x", np.float32, ["N", 16])], [tensor_info("y", np.float32, None)],
                       {"W": (rng.normal(size=(16, 8)) * 0.3).astype(np.float32)})
    return proto, [{"x": rng.normal(size=(4, 16)).astype(np.float32)} for _ in range(2)]


def test_op_faster_in_dynamic_int8_goes_dynamic():
    # static: 0.9 ms kernel + 0.05 ms boundary; dynamic: 0.4 ms; float 1.0 ms
    selection = _select(*_matmul(), _timings(mm=(1.0, 0.9, 0.05, 1, 0.4)), lambda ref, cand: 0.5)
    assert _names(selection.plan.dynamic) == ["mm"] and selection.plan.nodes == []


@pytest.mark.parametrize("dynamic, static, dyn", [("on", [], ["mm"]), ("off", ["mm"], []), ("auto", ["mm"], [])])
def test_dynamic_option_without_timing(dynamic, static, dyn):
    selection = _select(*_matmul(), _never, _never, target="size", dynamic=dynamic)
    assert _names(selection.plan.nodes) == static and _names(selection.plan.dynamic) == dyn


# --- the accuracy budget --------------------------------------------------------------------------------------


def test_accuracy_budget_keeps_the_most_sensitive_op_float(monkeypatch):
    fake = FakeAccuracy({"conv1": 0.004, "conv2": 0.03})
    monkeypatch.setattr(sens, "measure", fake.measure)
    monkeypatch.setattr(sens, "measure_combination", fake.measure_combination)
    selection = _select(*_convs(), _never, _never, max_drop=0.01, target="size")
    assert _names(selection.plan.nodes) == ["conv1"]
    assert _reasons(selection)["conv2"] == "kept float for the accuracy budget (sensitive on calibration data)"
    # every op int8 breaks the budget (0.034); each op alone is screened; the worst one out holds (0.004)
    assert fake.combinations == [{"conv1", "conv2"}, {"conv1"}]
    assert sorted(fake.singles, key=sorted) == [{"conv1"}, {"conv2"}]
    ranked = [(r["node"], r["rank"]) for r in selection.rows if r["action"] == "sensitivity"]
    assert ranked == [("conv2", 1), ("conv1", 2)]
    assert ("accuracy budget: 1 of 2 ops kept float (most sensitive on calibration data, 1 combination checks); "
            "exclude_nodes=conv2") in selection.notes


def test_accuracy_budget_holds_the_stressed_drop(monkeypatch):
    # every op int8 drops 0.006 (inside 0.01), but with the output error stressed conv2 alone costs 0.02: a
    # model at the budget's edge, which graphopt auto would refuse; conv2 goes float, ranked first by it
    fake = FakeAccuracy({"conv1": 0.003, "conv2": 0.003}, stressed={"conv1": 0.004, "conv2": 0.02})
    monkeypatch.setattr(sens, "measure", fake.measure)
    monkeypatch.setattr(sens, "measure_combination", fake.measure_combination)
    selection = _select(*_convs(), _never, _never, max_drop=0.01, target="size")
    assert _names(selection.plan.nodes) == ["conv1"]
    ranked = [(r["node"], r["rank"]) for r in selection.rows if r["action"] == "sensitivity"]
    assert ranked == [("conv2", 1), ("conv1", 2)]
    assert fake.combinations == [{"conv1", "conv2"}, {"conv1"}]


@pytest.mark.parametrize("target, kept", [("size", ["conv2"]), ("latency", ["conv1"])])
def test_accuracy_budget_for_latency_gives_up_the_least_ms_per_drop(monkeypatch, target, kept):
    # Both int8 break the budget (0.014); either alone holds. conv1 is the more sensitive (0.008 vs 0.006), but
    # its int8 kernel saves 0.9 ms to conv2's 0.1: for size conv1 goes float, for latency conv2 (0.06 per ms
    # against conv1's 0.009)
    fake = FakeAccuracy({"conv1": 0.008, "conv2": 0.006})
    monkeypatch.setattr(sens, "measure", fake.measure)
    monkeypatch.setattr(sens, "measure_combination", fake.measure_combination)
    timed = (_timings(conv1=(1.0, 0.1, 0.0, 1), conv2=(1.0, 0.9, 0.0, 1)), lambda ref, cand: 0.5) \
        if target == "latency" else (_never, _never)
    selection = _select(*_convs(), *timed, max_drop=0.01, target=target)
    assert _names(selection.plan.nodes) == kept
    assert fake.combinations[:2] == [{"conv1", "conv2"}, set(kept)]


def test_accuracy_budget_that_holds_changes_nothing(monkeypatch):
    fake = FakeAccuracy({"conv1": 0.004, "conv2": 0.005})
    monkeypatch.setattr(sens, "measure", _never)  # no single-op screen when the whole set holds
    monkeypatch.setattr(sens, "measure_combination", fake.measure_combination)
    selection = _select(*_convs(), _never, _never, max_drop=0.01, target="size")
    assert _names(selection.plan.nodes) == ["conv1", "conv2"]
    assert fake.combinations == [{"conv1", "conv2"}]
    assert any(n.startswith("accuracy budget holds with every planned op int8") for n in selection.notes)


def test_without_max_drop_the_budget_is_not_applied():
    selection = _select(*_convs(), _never, _never, target="size")
    assert _names(selection.plan.nodes) == ["conv1", "conv2"]
    assert "no max_drop in the context: accuracy budget not applied (the pipeline gate still checks)" in \
        selection.notes


# --- the whole-model choice ------------------------------------------------------------------------------------


def test_whole_model_never_faster_backs_off_to_float():
    # per-op timing keeps both convs, but no whole model beats float: the regions go back, least gain first
    selection = _select(*_convs(), _timings(conv1=(1.0, 0.3, 0.0, 1), conv2=(1.0, 0.3, 0.0, 1)),
                        lambda ref, cand: 1.2, activation_type="uint8")
    assert selection.plan.nodes == [] and selection.plan.dynamic == []
    assert {_reasons(selection)[n] for n in ("conv1", "conv2")} == {
        "back to float: the whole model was not faster with it"}
    assert any(n.endswith("int8 is not faster here, nothing quantized") for n in selection.notes)


def test_spent_timing_budget_still_weighs_every_planned_op_against_the_placement():
    # per-op timing (noisy) sent conv2 to float; the whole model with it int8 measures faster and wins even when
    # the timing budget is spent (then only the base activation type is timed)
    seen = []

    def model_timer(ref: ir.Model, cand: ir.Model) -> float:
        seen.append(is_int8(cand, "conv2"))
        return 0.6 if is_int8(cand, "conv2") else 0.9

    selection = _select(*_convs(), _timings(conv1=(1.0, 0.3, 0.0, 1), conv2=(1.0, 1.5, 0.0, 1)), model_timer,
                        budget_s=0.0)
    assert sorted(seen) == [False, True]
    assert _names(selection.plan.nodes) == ["conv1", "conv2"]
    assert "whole model measured at 0.60x float latency (every planned op, uint8 activations)" in selection.notes


def test_spent_timing_budget_times_no_other_activation_type():
    # the placement is every planned op (one candidate after dedupe): only it is timed, not its int8-activation twin
    seen = []

    def model_timer(ref: ir.Model, cand: ir.Model) -> float:
        seen.append(next(n.inputs[2].const_value.numpy().dtype.name for n in cand.graph
                         if n.op_type == "QuantizeLinear"))
        return 0.6

    selection = _select(*_convs(), _timings(conv1=(1.0, 0.3, 0.0, 1), conv2=(1.0, 0.3, 0.0, 1)), model_timer,
                        budget_s=0.0)
    assert seen == ["uint8"]
    assert _names(selection.plan.nodes) == ["conv1", "conv2"]


def test_candidates_list_placement_first_and_dedupe():
    both = qs.candidates({"a"}, {"a", "b"}, "int8", both_types=True)
    assert [(c.label, sorted(c.keep), c.activation_type, c.checked) for c in both] == [
        ("placement", ["a"], "int8", True), ("every planned op", ["a", "b"], "int8", False),
        ("placement", ["a"], "uint8", False), ("every planned op", ["a", "b"], "uint8", False)]


def test_an_op_that_pays_alone_stays_int8_when_its_region_does_not():
    """x → conv1 → HardSigmoid and Mul (HardSwish, HardSigmoid stays float) → conv2 → y: the region {conv1, Mul,
    conv2} pays for a Q on x and on the HardSigmoid's output and a DQ on conv1's output (the HardSigmoid reads
    it; y, a model output, stays float); conv1 alone only for x and its output."""
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("HardSigmoid", ["c1"], ["hs"], name="hsig"),
             helper.make_node("Mul", ["c1", "hs"], ["m"], name="mul"),
             helper.make_node("Conv", ["m", "W2"], ["y"], name="conv2")]
    inits = {"W1": (rng.normal(size=(8, 4, 3, 3)) * 0.3).astype(np.float32),
             "W2": (rng.normal(size=(8, 8, 1, 1)) * 0.3).astype(np.float32)}
    proto = make_proto(nodes, [tensor_info("x", np.float32, ["N", 4, 8, 8])], [tensor_info("y", np.float32, None)],
                       inits)
    feeds = [{"x": rng.normal(size=(2, 4, 8, 8)).astype(np.float32)} for _ in range(3)]
    # a Q or DQ costs 1 µs per element; conv1 gains 2 ms, conv2 0.04 ms. x: 512 elements, c1, hs, m: 1024 each.
    # Region: 2.04 - 0.001 x (512 + 1024 + 1024) = -0.520 ms; conv1 alone: 2.0 - 0.001 x (512 + 1024) = +0.464;
    # conv2 alone: 0.04 - 0.001 x 1024 (m) < 0
    timer = _timings(conv1=(3.0, 1.0, 1.0, 1000), conv2=(1.0, 0.96, 1.0, 1000))
    selection = _select(proto, feeds, timer, lambda ref, cand: 0.5, activation_type="uint8")
    assert _names(selection.plan.nodes) == ["conv1"]
    reasons = _reasons(selection)
    assert reasons["conv2"] == reasons["mul"] == "its int8 region does not pay for its Q/DQ (est. -0.520 ms)"
    assert "1 op(s) kept int8 alone from regions that did not pay for their Q/DQ: conv1" in selection.notes
