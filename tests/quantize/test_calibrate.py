"""Calibration ranges against hand-computed ones; streaming over mixed shapes equals one shot."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

from graphopt import data as datamod
from graphopt.cpu import resolve_target
from graphopt.options import build_options
from graphopt.passbase import PassContext
from graphopt.passes.quantize import Quantize, QuantizeOptions
from graphopt.passes.quantize import calibrate as C
from tests.helpers import make_proto, randn, run_model, tensor_info


def _stats(*arrays: np.ndarray) -> C.capture.TensorStats:
    s = C.range_stats()
    for a in arrays:
        s.update(a)
    return s


def test_minmax_is_exact():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 4, 5)) * 3, rng.normal(size=(2, 7)) + 1
    lo, hi = C.tensor_range(_stats(a, b), "minmax")
    assert (lo, hi) == (min(a.min(), b.min()), max(a.max(), b.max()))


def test_abs_histogram_folds_exactly():
    x = np.random.default_rng(1).normal(size=20_000)
    s = _stats(x)
    counts, edges = C.abs_histogram(s)
    ref, _ = np.histogram(np.abs(x), bins=edges)
    assert counts.sum() == x.size
    # Values on a bin edge may land one bin apart (floor vs numpy's half-open rule): compare cumulatively.
    assert np.max(np.abs(np.cumsum(counts) - np.cumsum(ref))) <= 3


def test_percentile_on_known_distributions():
    rng = np.random.default_rng(2)
    u = rng.uniform(0.0, 1.0, size=400_000)
    lo, hi = C.tensor_range(_stats(u), "percentile", percentile=99.0)
    assert lo == u.min()  # one-sided: the low end stays exact
    assert hi == pytest.approx(0.99, abs=2e-3)
    g = rng.normal(size=400_000)
    lo, hi = C.tensor_range(_stats(g), "percentile", percentile=99.0)
    assert hi == pytest.approx(np.percentile(g, 99.0), abs=5e-3)
    assert lo == pytest.approx(np.percentile(g, 1.0), abs=5e-3)


def _gauss_outliers() -> np.ndarray:
    rng = np.random.default_rng(3)
    return np.concatenate([rng.normal(size=500_000), [40.0, -38.0]])  # rare: clipping them pays


def _true_mse(x: np.ndarray, t: float) -> float:
    """Mean squared error of 256-level uint8 quantization of x on [-t, t]."""
    scale = 2 * t / 255.0
    q = np.clip(np.round((x + t) / scale), 0, 255) * scale - t
    return float(np.mean((q - x) ** 2))


def test_entropy_and_mse_clip_outliers_sensibly():
    x = _gauss_outliers()
    s = _stats(x)
    for method in ("entropy", "mse"):
        lo, hi = C.tensor_range(s, method)
        assert x.min() < lo < 0 < hi < x.max(), method  # both clip the two outliers
        assert lo == pytest.approx(-hi)
    _, t = C.tensor_range(s, "entropy")
    assert 2.5 < t < 10.0  # KL keeps the Gaussian body, not the outliers at 38-40
    # mse's threshold is as good as the best one found by brute force on the samples themselves
    # (with 256 levels the rounding noise of a wide range is small, so it clips less than KL).
    _, t = C.tensor_range(s, "mse")
    best = min(_true_mse(x, g) for g in np.linspace(2.0, 40.0, 77))
    assert _true_mse(x, t) <= best * 1.05
    assert _true_mse(x, t) < _true_mse(x, 40.0) * 0.6


def test_entropy_keeps_a_uniform_distribution():
    u = np.random.default_rng(4).uniform(0.0, 5.0, size=200_000)
    _, hi = C.tensor_range(_stats(u), "entropy")
    assert hi >= 0.95 * u.max()


def test_streaming_over_mixed_shapes_equals_one_shot():
    rng = np.random.default_rng(5)
    parts = [rng.normal(size=(2, 3, 9)) * 4, rng.normal(size=(1, 6, 4)), rng.normal(size=(5,)) + 2]
    parts[0].flat[0] = 30.0  # the first feed holds the peak, so both histograms get the same range
    streamed = _stats(*parts)
    once = _stats(np.concatenate([p.reshape(-1) for p in parts]))
    for method in C.METHODS:
        assert C.tensor_range(streamed, method) == C.tensor_range(once, method), method


def test_calibrate_through_a_model_with_dynamic_widths():
    # x [N, C, W] with C and W varying between feeds -> Relu; ranges of both values over all feeds.
    proto = make_proto([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["y"])],
                       [tensor_info("x", np.float32, ["N", "C", "W"])], [tensor_info("y", np.float32, None)])
    model = ir.serde.deserialize_model(proto)
    rng = np.random.default_rng(6)
    feeds = [{"x": rng.normal(size=s).astype(np.float32)} for s in [(2, 3, 5), (1, 4, 9), (3, 3, 2)]]
    data = datamod.load_data(feeds, datamod.input_specs(model))
    ranges = C.calibrate(model, ["x", "r"], data, "minmax")
    every = np.concatenate([f["x"].reshape(-1) for f in feeds])
    assert ranges["x"] == (float(every.min()), float(every.max()))
    assert ranges["r"] == (0.0, float(every.max()))


def test_a_masked_score_stays_float_and_the_rest_is_int8():
    """An attention mask as exported by TorchScript: Where(mask, 0, -inf) added to the scores. The -inf is meant,
    so calibration gives those values no range (instead of refusing the model), the Add that carries them stays
    float with the reason, and the MatMuls around it are int8."""
    inits = {"w": randn((8, 8), 1) * 0.4, "v": randn((8, 8), 2) * 0.4, "zero": np.float32(0),
             "ninf": np.float32(-np.inf)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["scores"], name="mm"),
             helper.make_node("Where", ["keep", "zero", "ninf"], ["bias"]),
             helper.make_node("Add", ["scores", "bias"], ["masked"], name="add"),
             helper.make_node("Softmax", ["masked"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["y"], name="out")]
    proto = make_proto(nodes, [tensor_info("x", np.float32, ["N", 8]), tensor_info("keep", np.bool_, ["N", 8])],
                       [tensor_info("y", np.float32, ["N", 8])], inits, opset=17)
    rng = np.random.default_rng(3)
    feeds = [{"x": randn((4, 8), 10 + i), "keep": rng.random((4, 8)) > 0.3} for i in range(4)]
    model = ir.serde.deserialize_model(proto)
    data = datamod.load_data(feeds, datamod.input_specs(model))
    opts = build_options(QuantizeOptions, {"target": "size", "bias_correction": False}, "quantize")
    rows = Quantize(opts, PassContext(calib=data, target=resolve_target("portable")))(model).rows
    action = {r["node"]: r for r in rows}
    assert action["mm"]["action"] == "int8" and action["out"]["action"] == "int8"
    assert action["add"]["action"] == "float" and "Inf or NaN" in action["add"]["reason"]
    for feed in feeds:
        ref, got = run_model(proto, feed)["y"], run_model(model, feed)["y"]
        # int8 x, weights and probabilities over K=8 terms, twice: within 5% of the output's largest magnitude.
        np.testing.assert_allclose(got, ref, atol=0.05 * np.abs(ref).max())
