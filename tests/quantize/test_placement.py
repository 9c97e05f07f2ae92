"""Latency placement (with injected, deterministic timings) and the accuracy budget of quantize."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from graphopt import data as datamod
from graphopt import metrics, modelio
from graphopt.passbase import PassContext
from graphopt.passes.canonicalize import Canonicalize
from graphopt.passes.quantize import Quantize, QuantizeOptions
from graphopt.passes.quantize import placement as qp
from graphopt.passes.quantize import select as qs
from graphopt.passes.quantize import timing as qt
from tests.helpers import DIGITS, is_int8, make_proto, run_model, tensor_info, two_convs

RNG = np.random.default_rng(0)


def _w(*shape: int) -> np.ndarray:
    return (RNG.normal(size=shape) * 0.3).astype(np.float32)


def _fake_layers(times: dict[str, tuple[float, float]]):
    """A LayerTimer returning (float ms, int8 kernel ms) per node; boundaries cost nothing."""
    def timer(model, nodes, ranges, cfg, budget):
        return {n.name: qp.LayerTiming(n.name, n.op_type, *times[n.name], 0.0, 1) for n in nodes if n.name in times}
    return timer


def _run(proto, feeds, layer_timer, model_timer, **options):
    model = ir.serde.deserialize_model(proto)
    calib = datamod.load_data(feeds, datamod.input_specs(model))
    q = Quantize(QuantizeOptions(**options), PassContext(calib=calib))
    q.layer_timer, q.model_timer = layer_timer, model_timer
    return model, q(model)


def test_op_measured_slower_stays_float():
    proto, feeds = two_convs(separated=False, rng=RNG)
    timer = _fake_layers({"conv1": (1.0, 0.3), "conv2": (1.0, 1.5)})  # conv2's int8 kernel is slower
    model, result = _run(proto, feeds, timer, lambda ref, cand: 0.5)
    assert is_int8(model, "conv1") and not is_int8(model, "conv2")
    reason = next(r["reason"] for r in result.rows if r.get("node") == "conv2" and r["action"] == "float")
    assert "measured slower" in reason
    assert any("exclude_nodes=conv2" in n for n in result.notes)
    np.testing.assert_allclose(run_model(model, feeds[0])["y"], run_model(proto, feeds[0])["y"], atol=0.05)


def test_whole_model_not_faster_backs_off_to_no_change():
    proto, feeds = two_convs(separated=False, rng=RNG)
    timer = _fake_layers({"conv1": (1.0, 0.3), "conv2": (1.0, 0.3)})
    model, result = _run(proto, feeds, timer, lambda ref, cand: 1.2)  # int8 never faster as a whole
    assert not result.modified
    assert not any(n.op_type == "QuantizeLinear" for n in model.graph)
    assert any("not faster" in n for n in result.notes)


def test_back_off_drops_the_least_gain_region_first():
    proto, feeds = two_convs(separated=True, rng=RNG)
    timer = _fake_layers({"conv1": (1.0, 0.2), "conv2": (1.0, 0.9)})  # conv1 gains 0.8 ms, conv2 0.1 ms

    def model_timer(ref: ir.Model, cand: ir.Model) -> float:  # conv2 in int8 costs more than it saves
        return 1.05 if is_int8(cand, "conv2") else 0.8

    model, result = _run(proto, feeds, timer, model_timer)
    assert is_int8(model, "conv1") and not is_int8(model, "conv2")
    assert any("least-gain region" in n for n in result.notes)


def test_region_that_does_not_pay_for_its_boundaries_stays_float():
    proto, feeds = two_convs(separated=True, rng=RNG)

    def timer(model, nodes, ranges, cfg, budget):  # kernels gain 0.5 ms; a Q or DQ costs 1 µs per element
        return {n.name: qp.LayerTiming(n.name, n.op_type, 1.0, 0.5, 1.0, 1000) for n in nodes}

    model, result = _run(proto, feeds, timer, lambda ref, cand: 0.5)
    assert not result.modified
    assert any("does not pay" in r.get("reason", "") for r in result.rows)


def test_target_size_does_not_time():
    proto, feeds = two_convs(separated=False, rng=RNG)

    def boom(*args):
        raise AssertionError("timed with target=size")

    model, result = _run(proto, feeds, boom, boom, target="size")
    assert is_int8(model, "conv1") and is_int8(model, "conv2")


def _act_type(model: ir.Model) -> str | None:
    """The activation type of the model's QuantizeLinear nodes (None: no QuantizeLinear)."""
    types = {n.inputs[2].const_value.numpy().dtype.name for n in model.graph if n.op_type == "QuantizeLinear"}
    assert len(types) <= 1, types
    return next(iter(types), None)


def test_every_planned_op_wins_when_the_whole_model_says_so():
    # Timed alone conv1's int8 kernel looked slower (tiny ops are noise), but the whole model with every
    # planned op int8 measures fastest: it wins over the placement.
    proto, feeds = two_convs(separated=False, rng=RNG)
    timer = _fake_layers({"conv1": (1.0, 1.5), "conv2": (1.0, 0.3)})
    seen = []

    def model_timer(ref: ir.Model, cand: ir.Model) -> float:
        seen.append((is_int8(cand, "conv1"), _act_type(cand)))
        return 0.6 if is_int8(cand, "conv1") else 0.8

    model, result = _run(proto, feeds, timer, model_timer, activation_type="uint8")
    assert sorted(seen) == [(False, "uint8"), (True, "uint8")]  # explicit uint8: no int8-activation candidate
    assert is_int8(model, "conv1") and is_int8(model, "conv2") and _act_type(model) == "uint8"
    assert any("every planned op" in n and "0.60x" in n for n in result.notes)
    assert not any("exclude_nodes=conv1" in n for n in result.notes)
    np.testing.assert_allclose(run_model(model, feeds[0])["y"], run_model(proto, feeds[0])["y"], atol=0.05)


def test_a_faster_candidate_outside_the_accuracy_budget_loses(monkeypatch):
    proto, feeds = two_convs(separated=False, rng=RNG)
    timer = _fake_layers({"conv1": (1.0, 1.5), "conv2": (1.0, 0.3)})

    def combination(context, model, fns, max_samples=64):  # conv1 in int8 costs 5 points of accuracy
        clone = model.clone()
        for fn in fns:
            fn(clone)
        drop = 0.05 if is_int8(clone, "conv1") else 0.0
        return SimpleNamespace(measured=True, drop=drop, stressed_or_drop=drop, worst_snr_db=40.0)

    monkeypatch.setattr(qp.sens, "measure_combination", combination)
    model = ir.serde.deserialize_model(proto)
    calib = datamod.load_data(feeds, datamod.input_specs(model))
    q = Quantize(QuantizeOptions(activation_type="uint8"), PassContext(calib=calib, max_drop=0.01))
    q.layer_timer = timer
    q.model_timer = lambda ref, cand: 0.6 if is_int8(cand, "conv1") else 0.8
    result = q(model)
    assert not is_int8(model, "conv1") and is_int8(model, "conv2")
    assert any("breaks the accuracy budget" in n for n in result.notes)


@pytest.mark.parametrize("faster", ["int8", "uint8"])
def test_auto_activation_type_keeps_the_faster_whole_model(faster):
    proto, feeds = two_convs(separated=False, rng=RNG)
    timer = _fake_layers({"conv1": (1.0, 0.3), "conv2": (1.0, 0.3)})
    model, result = _run(proto, feeds, timer, lambda ref, cand: 0.5 if _act_type(cand) == faster else 0.7)
    assert is_int8(model, "conv1") and is_int8(model, "conv2")
    assert _act_type(model) == faster
    assert any(f"int8 ({faster} activations" in n for n in result.notes)
    np.testing.assert_allclose(run_model(model, feeds[0])["y"], run_model(proto, feeds[0])["y"], atol=0.05)


def test_explicit_activation_type_is_never_overridden():
    proto, feeds = two_convs(separated=False, rng=RNG)
    timer = _fake_layers({"conv1": (1.0, 0.3), "conv2": (1.0, 0.3)})
    model, _ = _run(proto, feeds, timer, lambda ref, cand: 0.5 if _act_type(cand) == "uint8" else 0.7,
                    activation_type="int8")
    assert _act_type(model) == "int8"
    model, _ = _run(proto, feeds, None, None, target="size")  # auto without measuring: uint8
    assert _act_type(model) == "uint8"


def test_choose_takes_the_fastest_accepted_choice_faster_than_float():
    model = ir.serde.deserialize_model(two_convs(separated=False, rng=RNG)[0])
    choices = [qp.Choice("a", frozenset({"x"}), "uint8"), qp.Choice("b", frozenset({"y"}), "uint8", checked=False),
               qp.Choice("c", frozenset({"z"}), "int8", checked=False)]
    ratio = {"a": 0.9, "b": 0.5, "c": 0.7}
    asked = []

    def build(m: ir.Model, c: qp.Choice) -> None:
        m.graph.doc_string = c.label  # lets the fake timer see which choice it times

    placer = qp.Placement(model_timer=lambda ref, cand: ratio[cand.graph.doc_string])
    best, ratios = placer.choose(model, choices, build, None, lambda c: asked.append(c.label) or c.label == "c")
    assert best is choices[2] and ratios == [0.9, 0.5, 0.7] and asked == ["b", "c"]
    ratio.update(a=1.2, c=1.1)  # none accepted faster than float: no winner, the rejected one is not retried
    asked.clear()
    best, _ = placer.choose(model, choices, build, None, lambda c: asked.append(c.label) and False)
    assert best is None and asked == ["b"]


def test_candidates_dedupe_and_both_types():
    same = qs.candidates({"a"}, {"a"}, "uint8", both_types=False)
    assert [(c.label, c.activation_type, c.checked) for c in same] == [("placement", "uint8", True)]
    both = qs.candidates({"a"}, {"a", "b"}, "uint8", both_types=True)
    assert [(c.label, sorted(c.keep), c.activation_type, c.checked) for c in both] == [
        ("placement", ["a"], "uint8", True), ("every planned op", ["a", "b"], "uint8", False),
        ("placement", ["a"], "int8", False), ("every planned op", ["a", "b"], "int8", False)]


def test_time_candidates_interleaves_real_sessions():
    proto, feeds = two_convs(separated=False, rng=RNG)
    model = ir.serde.deserialize_model(proto)
    calib = datamod.load_data(feeds, datamod.input_specs(model))
    ratios = qt.time_candidates(model, [model.clone(), model.clone()], calib, repeats=3, min_time_s=0.01)
    assert len(ratios) == 2 and all(0.2 < r < 5.0 for r in ratios)  # the same model: near 1 even when busy


def _digits(metric: str, max_drop: float, **options):
    model = modelio.load_model(DIGITS / "digits.onnx")
    Canonicalize()(model)
    teacher = model.clone()
    calib = datamod.load_data(DIGITS / "calib.npz", datamod.input_specs(model))
    ctx = PassContext(calib=calib, teacher=teacher, metric=metric, max_drop=max_drop)
    result = Quantize(QuantizeOptions(target="size", **options), ctx)(model)
    return teacher, model, calib, result


def test_budget_tight_snr_keeps_the_most_sensitive_float():
    # The snr metric's budget is min_snr_db; 60 dB is beyond what int8 reaches on digits (about 40 dB), so the
    # pass must keep ops float and the result must honour it on the calibration data it measured.
    teacher, model, calib, result = _digits("snr", 0.0, min_snr_db=60.0)
    note = next(n for n in result.notes if n.startswith("accuracy budget:"))
    excluded = note.split("exclude_nodes=")[1].split("|")
    assert excluded and excluded[0]
    ranked = [r for r in result.rows if r["action"] == "sensitivity"]
    assert [r["rank"] for r in ranked] == list(range(1, len(ranked) + 1))
    assert ranked[0]["node"] == excluded[0]  # the most sensitive op is the first kept float
    for name in excluded:
        assert not is_int8(model, name)
    cmp = metrics.Evaluator(teacher, calib.head(256)).evaluate(model)
    assert cmp.worst_snr_db >= 60.0


def test_budget_on_digits_accuracy_within_max_drop():
    teacher, model, calib, result = _digits("accuracy", 0.01)
    assert result.modified
    cmp = metrics.Evaluator(teacher, calib.head(256)).evaluate(model)
    assert cmp.drop("accuracy") <= 0.01
    test = np.load(DIGITS / "test.npz")
    acc = {}
    for label, m in (("float", teacher), ("int8", model)):
        out = next(iter(run_model(m, {"input": test["input"]}).values()))
        acc[label] = float((out.argmax(axis=1) == test["labels"]).mean())
    assert acc["int8"] >= acc["float"] - 0.02, acc


def test_regions_are_connected_int8_groups():
    proto, _ = two_convs(separated=True, rng=RNG)
    model = ir.serde.deserialize_model(proto)
    nodes = [n for n in model.graph if n.op_type == "Conv"]
    assert sorted(len(r) for r in qp.regions(nodes)) == [1, 1]
    proto, _ = two_convs(separated=False, rng=RNG)
    model = ir.serde.deserialize_model(proto)
    assert [len(r) for r in qp.regions([n for n in model.graph if n.op_type == "Conv"])] == [2]


def test_real_timing_on_dynamic_widths_gives_a_valid_model():
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Sigmoid", ["r"], ["y"])]
    proto = make_proto(nodes, [tensor_info("x", np.float32, [1, 16, 16, "W"])], [tensor_info("y", np.float32, None)],
                       {"W": _w(32, 16, 3, 3), "B": _w(32)})
    feeds = [{"x": RNG.normal(size=(1, 16, 16, w)).astype(np.float32)} for w in (24, 40, 32)]
    model = ir.serde.deserialize_model(proto)
    calib = datamod.load_data(feeds, datamod.input_specs(model))
    result = Quantize(QuantizeOptions(latency_budget_s=5.0), PassContext(calib=calib))(model)
    onnx.checker.check_model(modelio.to_proto(model))
    # timed for real on the first feed's width (24): the one-node models take the captured shape, not "W"
    timed = [r for r in result.rows if r["action"] == "timed"]
    assert [r["node"] for r in timed] == ["conv"], result.rows
    assert timed[0]["float_ms"] > 0 and timed[0]["qdq_boundary_ms"] > 0 and timed[0]["int8_kernel_ms"] >= 0
    assert not any("not timed" in n for n in result.notes), result.notes
    for feed in feeds:
        np.testing.assert_allclose(run_model(model, feed)["y"], run_model(proto, feed)["y"], atol=0.05)


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
