"""The quantize pass checks the model it emitted against max_drop: its budget's checks correct biases on fewer
samples than the emitted model gets, so the real model can land past the budget's edge. Accuracy is injected
(the emitted model scores EMITTED_PENALTY worse than the budget's checks saw), the model and its outputs are
real."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import helper

from graphopt import data as datamod
from graphopt import sensitivity as sens
from graphopt.passbase import PassContext
from graphopt.passes.quantize import Quantize, QuantizeOptions
from tests.helpers import FakeAccuracy, is_int8, make_proto, run_model, tensor_info

DROPS = {"conv1": 0.001, "conv2": 0.03, "conv3": 0.004}  # each conv's drop when int8 (they add up)
EMITTED_PENALTY = 0.007  # what the emitted model loses beyond what the budget's checks measured


def _three_convs(rng: np.random.Generator):
    def w(*shape: int) -> np.ndarray:
        return (rng.normal(size=shape) * 0.3).astype(np.float32)

    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "W3", "B3"], ["c3"], name="conv3"),
             helper.make_node("Sigmoid", ["c3"], ["y"], name="sig")]
    inits = {"W1": w(8, 4, 3, 3), "B1": w(8), "W2": w(8, 8, 1, 1), "B2": w(8), "W3": w(8, 8, 1, 1), "B3": w(8)}
    proto = make_proto(nodes, [tensor_info("x", np.float32, ["N", 4, 8, 8])], [tensor_info("y", np.float32, None)],
                       inits)
    feeds = [{"x": rng.normal(size=(2, 4, 8, 8)).astype(np.float32)} for _ in range(4)]
    return proto, feeds


def _quantize(monkeypatch, teacher: bool):
    fake = FakeAccuracy(DROPS, EMITTED_PENALTY)
    monkeypatch.setattr(sens, "measure", fake.measure)
    monkeypatch.setattr(sens, "measure_combination", fake.measure_combination)
    proto, feeds = _three_convs(np.random.default_rng(0))
    model = ir.serde.deserialize_model(proto)
    calib = datamod.load_data(feeds, datamod.input_specs(model))
    context = PassContext(calib=calib, max_drop=0.01,
                          teacher=ir.serde.deserialize_model(proto) if teacher else None)
    result = Quantize(QuantizeOptions(target="size"), context)(model)
    return proto, feeds, result, fake


def test_an_emitted_model_past_the_budget_sends_the_next_most_sensitive_op_to_float(monkeypatch):
    proto, feeds, result, fake = _quantize(monkeypatch, teacher=True)
    model = result.model
    # the budget kept conv2 float and held with conv1+conv3 (0.005); emitted they lose 0.012 > 0.01, so conv3 (the
    # next most sensitive) goes float too, and conv1 alone emitted holds (0.008)
    assert fake.emitted_checks == [frozenset({"conv1", "conv3"}), frozenset({"conv1"})]
    assert [n for n in DROPS if is_int8(model, n)] == ["conv1"]
    reasons = {r["node"]: r["reason"] for r in result.rows if r.get("action") == "float"}
    assert reasons["conv3"] == "kept float: the emitted model broke max_drop with it int8"
    assert reasons["conv2"] == "kept float for the accuracy budget (sensitive on calibration data)"
    assert any(n.startswith("the emitted model broke max_drop where the budget's checks held") and "conv3" in n
               for n in result.notes)
    # a real model: it runs, and it is the float model up to conv1's int8 rounding
    for feed in feeds:
        want, got = run_model(proto, feed)["y"], run_model(model, feed)["y"]
        assert np.abs(want - got).max() < 0.05  # sigmoid outputs: conv1 at 8 bits moves them by about 1e-2


def test_without_the_teacher_the_emitted_model_is_left_to_the_gate(monkeypatch):
    _, _, result, fake = _quantize(monkeypatch, teacher=False)
    assert fake.emitted_checks == []
    assert [n for n in DROPS if is_int8(result.model, n)] == ["conv1", "conv3"]
