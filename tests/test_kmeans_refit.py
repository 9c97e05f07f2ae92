"""kmeans refit=true: centroids (and biases) solved so each layer's outputs match the float layer's on calibration
data; codes, zero codes and the file's form unchanged."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from graphopt import data as datamod
from graphopt import modelio
from graphopt.auto import space
from graphopt.errors import GraphoptError
from graphopt.options import build_options
from graphopt.passbase import PassContext
from graphopt.passes.kmeans import KMeans
from graphopt.passes.prune import Prune
from graphopt.runtime import make_session
from tests.helpers import DIGITS, clone, make_model, randn, run_model, tensor_info

LAYERS = ["c1", "c2", "g", "y"]  # the outputs of the four layers, each also a graph output


def four_layers(group: int = 1):
    """conv1 (bias) → Relu → conv2 (no bias; ``group``) → Relu → Flatten → Gemm (transB, alpha 0.5, bias) → Relu →
    MatMul + Add (a bias the refit reads through graphopt.linear)."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], group=group, name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Flatten", ["r2"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["g"], transB=1, alpha=0.5, name="gemm"),
             helper.make_node("Relu", ["g"], ["h"], name="relu3"),
             helper.make_node("MatMul", ["h", "w4"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "b4"], ["y"], name="bias")]
    inits = {"w1": randn((8, 4, 3, 3), 1) / 6, "b1": randn((8,), 2) * 0.1, "w2": randn((8, 8 // group, 3, 3), 3) / 8,
             "w3": randn((32, 8 * 6 * 6), 4) / 12, "b3": randn((32,), 5) * 0.1, "w4": randn((32, 10), 6) / 6,
             "b4": randn((10,), 7) * 0.1}
    return make_model(nodes, [tensor_info("x", np.float32, [None, 4, 6, 6])], LAYERS, inits)


XS = randn((96, 4, 6, 6), 8)


def calib_of(model, xs=XS):
    return datamod.from_arrays({"x": xs}, datamod.input_specs(model))


def kmeans(model, context=None, **raw):
    return KMeans(build_options(KMeans.Options, raw, "kmeans"), context)(model)


def errors(model, reference) -> dict[str, float]:
    """Each layer's output against the float model's on the calibration inputs (relative squared error)."""
    got, ref = run_model(model, {"x": XS}), run_model(reference, {"x": XS})
    return {n: float(np.sum((got[n] - ref[n]) ** 2) / np.sum(ref[n] ** 2)) for n in LAYERS}


def inits(model, suffix: str) -> dict[str, np.ndarray]:
    return {n: v.const_value.numpy() for n, v in model.graph.initializers.items() if n.endswith(suffix)}


@pytest.mark.parametrize("per_channel", [False, True])
def test_refit_lowers_each_layers_output_error_and_keeps_the_codes(per_channel):
    original = four_layers()
    plain, refit = clone(original), clone(original)
    kmeans(plain, bits=3, per_channel=per_channel, min_size=0)
    result = kmeans(refit, PassContext(calib=calib_of(original)), bits=3, per_channel=per_channel, min_size=0,
                    refit=True)
    before, after = errors(plain, original), errors(refit, original)
    assert all(after[n] <= before[n] * (1 + 1e-5) for n in LAYERS), (before, after)
    assert after["y"] < 0.8 * before["y"]
    kept = [row for row in result.rows if row["refit"]]
    assert len(kept) >= 3
    for row in kept:
        assert row["out_error_refit"] < row["out_error_kmeans"]
        assert row["held_error_refit"] <= row["held_error_kmeans"]  # judged on samples the fit did not see (rounded)
    # the first layer on white-noise inputs: the k-means centroids are already the least-squares ones, and a refit
    # that is not better on the held-out samples is not kept
    assert all("held-out" in row["refit_note"] for row in result.rows if not row["refit"])
    codes = inits(plain, "_indices")
    assert codes and all(np.array_equal(codes[n], inits(refit, "_indices")[n]) for n in codes)
    assert inits(refit, "_codebook").keys() == inits(plain, "_codebook").keys()
    proto = modelio.to_proto(refit)
    onnx.checker.check_model(proto, full_check=True)
    make_session(proto)
    gemm = next(n for n in refit.graph if n.op_type == "Gemm")
    assert gemm.attributes["alpha"].value == 1.0  # folded into the refit centroids
    assert sum(n.op_type == "Add" for n in refit.graph) == sum(n.op_type == "Add" for n in plain.graph)  # no new bias


@pytest.mark.parametrize("per_channel", [False, True])
def test_pruned_weights_stay_exactly_zero(per_channel):
    original = four_layers()
    Prune(build_options(Prune.Options, {"sparsity": 0.6, "min_size": 0}, "prune"))(original)
    pruned = {n: original.graph.initializers[n].const_value.numpy() for n in ("w1", "w2", "w3", "w4")}
    model = clone(original)
    result = kmeans(model, PassContext(calib=calib_of(original)), bits=3, per_channel=per_channel, min_size=0,
                    refit=True)
    assert result.rows and all(r["zero_code"] and r["refit"] for r in result.rows)
    got = inits(model, "")
    for name, w in pruned.items():
        idx = got[f"{name}_indices"].astype(np.int64)
        book = got[f"{name}_codebook"]
        if f"{name}_row_offsets" in got:
            assert np.all(book.reshape(-1, 8)[:, 0] == 0)
            idx = idx + got[f"{name}_row_offsets"]
        else:
            assert book[0] == 0
        np.testing.assert_array_equal(book[idx] == 0, w == 0)


def test_half_codebook_and_data_aware_round_after_the_refit():
    original = four_layers()
    plain, refit = clone(original), clone(original)
    context = PassContext(calib=calib_of(original))
    kmeans(plain, context, bits=2, min_size=0, data_aware=True, half_codebook=True)
    result = kmeans(refit, context, bits=2, min_size=0, data_aware=True, half_codebook=True, refit=True)
    assert all(r["codebook_dtype"] == "float16" and r["refit"] for r in result.rows)
    assert all(v.dtype == np.float16 for v in inits(refit, "_codebook").values())
    assert errors(refit, original)["y"] < 0.8 * errors(plain, original)["y"]


def test_layers_it_cannot_refit_keep_their_kmeans_centroids():
    original = four_layers(group=2)  # a grouped Conv is no single matrix (graphopt.linear)
    plain, refit = clone(original), clone(original)
    kmeans(plain, bits=3, min_size=0)
    result = kmeans(refit, PassContext(calib=calib_of(original)), bits=3, min_size=0, refit=True)
    assert any("not a Conv (one group)" in n and "conv2" in n for n in result.notes)
    row = next(r for r in result.rows if r["layer"] == "conv2")
    assert "refit" not in row
    np.testing.assert_array_equal(inits(refit, "_codebook")["w2_codebook"], inits(plain, "_codebook")["w2_codebook"])


def test_refit_needs_calibration_data():
    with pytest.raises(GraphoptError, match="kmeans"):
        kmeans(four_layers(), bits=3, refit=True)
    assert KMeans.needs_data(build_options(KMeans.Options, {"refit": True}, "kmeans"))


def digits_accuracy(model) -> float:
    test = np.load(DIGITS / "test.npz")
    logits = make_session(modelio.to_proto(model)).run(None, {"input": test["input"]})[0]
    return float((logits.argmax(1) == test["labels"]).mean())


def test_digits_two_bits_keep_accuracy_only_with_the_refit():
    # measured: float 99.72 %; 2-bit codebooks 91.1 % without the refit, 99.72 % with it
    model = modelio.load_model(DIGITS / "digits.onnx")
    calib = datamod.load_data(str(DIGITS / "calib.npz"), datamod.input_specs(model))
    base = digits_accuracy(model)
    plain, refit = clone(model), clone(model)
    kmeans(plain, bits=2)
    kmeans(refit, PassContext(calib=calib), bits=2, refit=True)
    assert digits_accuracy(plain) < base - 0.05
    assert digits_accuracy(refit) >= base - 0.01


def test_bits_auto_measures_widths_with_their_refit():
    model = modelio.load_model(DIGITS / "digits.onnx")
    calib = datamod.load_data(str(DIGITS / "calib.npz"), datamod.input_specs(model)).head(96)
    context = PassContext(calib=calib, teacher=clone(model), max_drop=0.01, metric="accuracy")
    result = kmeans(model, context, bits="auto", levels=[4, 2], refit=True, max_samples=96)
    assert result.rows and all("refit" in r for r in result.rows)
    assert any(n.startswith("refit: whole model with the layer by layer refits") for n in result.notes)
    assert digits_accuracy(model) >= 0.9972 - 0.01


def test_size_recipes_refit_their_codebooks():
    recipe = space.recipe({"kmeans_bits": "2"}, "size", 0.01)
    assert "kmeans:bits=2,refit=true,half_codebook=true,max_drop=0.01" in recipe
