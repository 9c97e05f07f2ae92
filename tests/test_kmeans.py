"""kmeans pass and the 1-D k-means core: exactness, zeros, reconstruction, UINT4, per channel, data, digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper

from graphopt import data as datamod
from graphopt import modelio
from graphopt.errors import RecipeError
from graphopt.options import build_options
from graphopt.passbase import PassContext
from graphopt.passes.kmeans import KMeans, quantize
from graphopt.passes.kmeans import codebook as codebook_mod
from graphopt.passes.kmeans.kmeans1d import init_centroids, kmeans1d, kmeans1d_hist, lloyd_sorted, objective
from graphopt.passes.prune import Prune
from graphopt.runtime import make_session
from tests.helpers import assert_same_outputs, clone, make_model, op_types, randn, run_model, tensor_info

DIGITS = Path(__file__).resolve().parents[1] / "models" / "digits"


def kmeans(model, context=None, **raw):
    return KMeans(build_options(KMeans.Options, raw, "kmeans"), context)(model)


def conv_gemm_model(w=None, w2=None):
    """Conv 4->8 (3x3, bias) -> Flatten -> Gemm (transB=1) -> MatMul."""
    w = randn((8, 4, 3, 3), 1) if w is None else w
    w2 = randn((16, 8 * 6 * 6), 2) if w2 is None else w2
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
             helper.make_node("Flatten", ["c"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w2"], ["g"], transB=1, name="gemm"),
             helper.make_node("MatMul", ["g", "w3"], ["y"], name="mm")]
    inits = {"w": w, "b": randn((8,), 3), "w2": w2, "w3": randn((16, 5), 4)}
    return make_model(nodes, [tensor_info("x", np.float32, [None, 4, 8, 8])], ["y"], inits)


def dense_with(original, weights):
    """``original`` (a float model) with some of its weights replaced: the reference for a codebook model."""
    import onnx_ir as ir

    ref = clone(original)
    for name, array in weights.items():
        ref.graph.initializers[name].const_value = ir.tensor(array, name=name)
    return ref


def decoded(model) -> dict[str, np.ndarray]:
    """Each shared weight as numpy decodes it from the stored codebook/indices/offsets initializers."""
    inits = {name: v.const_value.numpy() for name, v in model.graph.initializers.items()}
    out = {}
    for base in ("w", "w2", "w3"):
        if f"{base}_codebook" not in inits:
            continue
        idx = inits[f"{base}_indices"].astype(np.int64)
        if f"{base}_row_offsets" in inits:
            idx = idx + inits[f"{base}_row_offsets"]
        out[base] = inits[f"{base}_codebook"][idx]
    return out


X = randn((3, 4, 8, 8), 9)


# --- 1-D k-means core ---------------------------------------------------------------------------------------


def naive_lloyd(x, w, c, iters=500):
    """O(n·k) textbook Lloyd with argmin assignment (ties to the lower centroid), empty clusters kept."""
    c = np.sort(c.astype(np.float64))
    labels = None
    for _ in range(iters):
        new = np.argmin(np.abs(x[:, None] - c[None, :]), axis=1)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        for j in range(c.size):
            m = labels == j
            if w[m].sum() > 0:
                c[j] = np.sum(w[m] * x[m]) / w[m].sum()
        c = np.sort(c)
    return c


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("init", ["linear", "density", "kmeans++"])
def test_lloyd_on_prefix_sums_equals_textbook_lloyd(seed, init):
    rng = np.random.default_rng(seed)
    x = np.unique(rng.standard_normal(200) * rng.choice([0.1, 1.0, 3.0], 200))
    w = rng.uniform(0.1, 2.0, x.size)
    k = [2, 3, 5, 8, 16, 7][seed]
    c0 = init_centroids(x, w, k, init, seed)
    np.testing.assert_allclose(lloyd_sorted(x, w, c0, 500), naive_lloyd(x, w, c0), rtol=0, atol=1e-9)


def optimal_1d(x: np.ndarray, k: int) -> float:
    """Exact optimum of 1-D k-means by dynamic programming over sorted values (clusters are runs)."""
    x = np.sort(x)
    n = x.size
    s1 = np.concatenate([[0], np.cumsum(x)])
    s2 = np.concatenate([[0], np.cumsum(x * x)])

    def cost(i, j):  # x[i:j]
        m = j - i
        return s2[j] - s2[i] - (s1[j] - s1[i]) ** 2 / m

    best = np.full((k + 1, n + 1), np.inf)
    best[0, 0] = 0.0
    for c in range(1, k + 1):
        for j in range(c, n + 1):
            best[c, j] = min(best[c - 1, i] + cost(i, j) for i in range(c - 1, j))
    return float(best[k, n])


@pytest.mark.parametrize("seed", range(5))
def test_kmeans1d_objective_against_exact_optimum_and_sklearn(seed):
    from sklearn.cluster import KMeans as SkKMeans

    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.standard_normal(40), rng.standard_normal(20) * 0.2 + 3])
    k = 4
    best = optimal_1d(x, k)
    ours = min(objective(x, *kmeans1d(x, k, init=i)) for i in ("linear", "density", "kmeans++"))
    sk = SkKMeans(k, n_init=10, random_state=0).fit(x.reshape(-1, 1)).inertia_
    assert ours >= best - 1e-9  # nothing beats the optimum: a check of the objective itself
    assert ours <= best * 1.02 + 1e-12
    assert ours <= sk * 1.02 + 1e-12


def test_few_distinct_values_are_kept_exactly():
    values = np.repeat([-1.5, 0.25, 2.0], 5)
    cents, labels = kmeans1d(values, 4)
    np.testing.assert_array_equal(cents[labels], values)


def test_empty_clusters_are_refilled():
    # Two tight lumps far apart: a linear grid leaves the middle centroids empty; all codes must end up used.
    x = np.concatenate([np.linspace(-1.01, -0.99, 100), np.linspace(0.99, 1.01, 100)])
    cents, labels = kmeans1d(x, 8)
    assert cents.size == 8 and np.unique(labels).size == 8


def test_histogram_path_objective_within_1pct_of_exact_path():
    # 2M values: the size the pass sends through the histogram; the exact path sorts them all.
    x = np.random.default_rng(0).standard_normal(2_000_000).astype(np.float32)
    exact = objective(x, *kmeans1d(x, 16))
    cents, codes = kmeans1d_hist(x, 16)
    assert codes.dtype == np.uint8 and codes.shape == x.shape
    # codes are the nearest centroid of each value, exactly as the exact path assigns them
    np.testing.assert_array_equal(codes[:20000], np.argmin(np.abs(x[:20000, None] - cents[None, :]), axis=1))
    hist = objective(x, cents, codes.astype(np.int64))
    assert abs(hist - exact) <= 0.01 * exact


def test_histogram_path_zero_code_weights_and_few_distinct_values():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((600, 2000)).astype(np.float32)
    x[rng.random(x.shape) < 0.5] = 0
    h = np.broadcast_to(rng.uniform(0.1, 3.0, (1, 2000)), x.shape)  # lazy per-column weights, as data_aware
    cents, codes = kmeans1d_hist(x, 15, h, zero_code=True)
    nz = x != 0
    np.testing.assert_array_equal(codes == 0, ~nz)  # zeros keep code 0 and take no part
    ref_c, ref_l = kmeans1d(x[nz], 15, h[nz])
    assert objective(x[nz], cents, codes[nz] - 1, h[nz]) <= 1.01 * objective(x[nz], ref_c, ref_l, h[nz])
    # at most k distinct values closer than a bin: kept exactly, as the exact path keeps them
    levels = np.array([-3.0, 0.1, 0.1000001, 0.5], np.float32)
    y = levels[rng.integers(0, 4, 1_500_000)]
    cents, codes = kmeans1d_hist(y, 4)
    np.testing.assert_array_equal(cents[codes], y.astype(np.float64))


def test_pass_through_histogram_path_reconstructs_and_keeps_zeros(monkeypatch):
    monkeypatch.setattr(codebook_mod, "HIST_MIN_SIZE", 0)  # every layer takes the large-layer path
    model = conv_gemm_model()
    Prune(build_options(Prune.Options, {"sparsity": 0.5, "min_size": 0}, "prune"))(model)
    before = {n: model.graph.initializers[n].const_value.numpy() for n in ("w", "w2", "w3")}
    result = kmeans(model, bits=4)
    dec = decoded(model)
    for row in result.rows:
        w = before[row["weight"]]
        np.testing.assert_array_equal(dec[row["weight"]] == 0, w == 0)
        err = np.linalg.norm(dec[row["weight"]].astype(np.float64) - w) / np.linalg.norm(w.astype(np.float64))
        assert row["rel_error"] == pytest.approx(err, abs=1e-5)
        assert row["codes_used"] == np.unique(model.graph.initializers[f"{row['weight']}_indices"]
                                              .const_value.numpy().astype(np.uint8)).size


# --- the pass ----------------------------------------------------------------------------------------------


def test_bits8_on_at_most_256_distinct_values_changes_nothing():
    levels = np.linspace(-1, 1, 256).astype(np.float32)
    rng = np.random.default_rng(0)
    w = levels[rng.integers(0, 256, (8, 4, 3, 3))]
    w2 = levels[rng.integers(0, 256, (16, 288))]
    model = conv_gemm_model(w, w2)
    ref = clone(model)
    result = kmeans(model, bits=8)
    assert [r["weight"] for r in result.rows] == ["w", "w2"]  # w3 (80 values) would not get smaller: kept
    assert "Gather" in op_types(model)
    assert_same_outputs(ref, model, {"x": X}, rtol=0, atol=1e-6)


@pytest.mark.parametrize("per_channel", [False, True])
def test_codebook_and_indices_reconstruct_the_weight(per_channel):
    model = conv_gemm_model()
    original = clone(model)
    result = kmeans(model, bits=4, per_channel=per_channel, min_size=0)
    # w3 [16, 5]: 5 per-channel codebooks of 16 floats would outweigh its 320 bytes, so it stays float.
    assert [r["weight"] for r in result.rows] == (["w", "w2"] if per_channel else ["w", "w2", "w3"])
    dec = decoded(model)
    assert set(dec) == {r["weight"] for r in result.rows}
    assert_same_outputs(dense_with(original, dec), model, {"x": X}, rtol=1e-5, atol=1e-5)
    for r in result.rows:
        assert r["codes_used"] <= 16
        assert r["rel_error"] < 0.15  # 4 bits on a Gaussian: about 10 % relative error
        w = original.graph.initializers[r["weight"]].const_value.numpy()
        rel = np.linalg.norm(dec[r["weight"]] - w) / np.linalg.norm(w)
        assert abs(rel - r["rel_error"]) < 1e-4


def test_per_channel_serves_channels_of_very_different_scales():
    # Channels with scales 1000x apart: per-layer codes waste the small channels, per-channel does not.
    w2 = (randn((16, 288), 2) * np.logspace(-3, 0, 16)[:, None]).astype(np.float32)
    model_a, model_b = conv_gemm_model(w2=w2), conv_gemm_model(w2=w2)
    kmeans(model_a, bits=4, skip_nodes=["conv", "mm"])
    kmeans(model_b, bits=4, skip_nodes=["conv", "mm"], per_channel=True)
    rel = {name: np.max(np.abs(decoded(m)["w2"] - w2) / np.abs(w2).max(1, keepdims=True), axis=1)
           for name, m in (("layer", model_a), ("channel", model_b))}
    assert rel["channel"].max() < 0.2 < rel["layer"].max()
    ref = dense_with(conv_gemm_model(w2=w2), {"w2": decoded(model_b)["w2"]})
    assert_same_outputs(ref, model_b, {"x": X}, rtol=1e-5, atol=1e-5)


def test_per_channel_by_op_type_gives_convs_channel_codebooks_and_the_rest_one():
    model = conv_gemm_model()
    original = clone(model)
    result = kmeans(model, bits=4, per_channel=["Conv"], min_size=0)
    books = {r["weight"]: r["codebook"] for r in result.rows}
    assert books == {"w": [8, 16], "w2": [16], "w3": [16]}
    assert_same_outputs(dense_with(original, decoded(model)), model, {"x": X}, rtol=1e-5, atol=1e-5)


def test_pruned_zeros_stay_exactly_zero():
    model = conv_gemm_model()
    Prune(build_options(Prune.Options, {"sparsity": 0.6, "min_size": 0}, "prune"))(model)
    before = {n: model.graph.initializers[n].const_value.numpy() for n in ("w", "w2", "w3")}
    result = kmeans(model, bits=3)
    assert all(r["zero_code"] for r in result.rows)
    dec = decoded(model)
    for name, w in before.items():
        np.testing.assert_array_equal(dec[name] == 0, w == 0)
        # Zeros do not pull centroids: the non-zero codes are the k-means of the non-zeros alone.
        cents, _ = kmeans1d(w[w != 0].astype(np.float64), 7)
        book = model.graph.initializers[f"{name}_codebook"].const_value.numpy()
        np.testing.assert_allclose(np.sort(book[1:]), cents.astype(np.float32), rtol=1e-6)


def test_uint4_indices_round_trip_and_ort_folds_them(tmp_path):
    model = conv_gemm_model()
    result = kmeans(model, bits=4)
    assert model.opset_imports[""] == 21 and all(r["indices"] == "uint4" for r in result.rows)
    expected = {n: model.graph.initializers[f"{n}_indices"].const_value.numpy().astype(np.uint8)
                for n in ("w", "w2", "w3")}
    path = tmp_path / "k4.onnx"
    modelio.save_model(model, path)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    packed = {t.name: t for t in proto.graph.initializer}
    assert packed["w2_indices"].data_type == onnx.TensorProto.UINT4
    assert len(packed["w2_indices"].raw_data) == 16 * 288 // 2  # two codes per byte
    loaded = modelio.load_model(path)
    for name, idx in expected.items():
        np.testing.assert_array_equal(loaded.graph.initializers[f"{name}_indices"].const_value.numpy()
                                      .astype(np.uint8), idx)
    assert_same_outputs(dense_with(conv_gemm_model(), decoded(model)), loaded, {"x": X}, rtol=1e-5, atol=1e-5)
    # onnxruntime folds Cast+Gather at load: the optimized graph reads dense weights, like the float model.
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    assert not {"Gather", "Cast"} & {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}


def test_uint8_when_uint4_is_off_or_bits_above_4():
    model = conv_gemm_model()
    result = kmeans(model, bits=4, uint4=False)
    assert model.opset_imports[""] == 13 and all(r["indices"] == "uint8" for r in result.rows)
    model = conv_gemm_model()
    kmeans(model, bits=6)
    assert model.graph.initializers["w2_indices"].const_value.numpy().dtype == np.uint8


def test_binary_is_sign_times_channel_scale():
    model = conv_gemm_model()
    w = model.graph.initializers["w"].const_value.numpy()
    result = kmeans(model, bits=1, skip_nodes=["gemm", "mm"])
    assert result.rows[0]["codebook"] == [8, 2] and not result.rows[0]["zero_code"]
    dec = decoded_one(model, "w")
    scale = np.abs(w).reshape(8, -1).mean(1)
    np.testing.assert_allclose(dec, np.sign(w) * scale[:, None, None, None], rtol=1e-6)


def decoded_one(model, base):
    inits = {name: v.const_value.numpy() for name, v in model.graph.initializers.items()}
    return inits[f"{base}_codebook"][inits[f"{base}_indices"].astype(np.int64) + inits[f"{base}_row_offsets"]]


def test_codebook_survives_cleanup():
    from graphopt.passes.cleanup import Cleanup

    model = conv_gemm_model()
    kmeans(model, bits=4)
    ref = clone(model)
    Cleanup()(model)
    assert op_types(model).count("Gather") == 3
    assert "w2_indices" in model.graph.initializers
    assert_same_outputs(ref, model, {"x": X})


def test_data_aware_weights_errors_by_input_energy():
    # Loud inputs (energy 100) meet small weights, quiet inputs (energy 1e-4) large ones: plain k-means
    # spends its codes on the large weights, data-aware k-means on the ones the output depends on.
    rng = np.random.default_rng(0)
    scale = np.where(np.arange(64) < 16, 10.0, 0.01).astype(np.float32)
    w = randn((64, 8), 1) * np.where(np.arange(64) < 16, 0.05, 1.0).astype(np.float32)[:, None]
    nodes = [helper.make_node("Mul", ["x", "s"], ["xs"], name="scale"),
             helper.make_node("MatMul", ["xs", "w"], ["y"], name="mm")]
    make = lambda: make_model(nodes, [tensor_info("x", np.float32, [None, 64])], ["y"], {"s": scale, "w": w})  # noqa
    feeds = rng.standard_normal((256, 64)).astype(np.float32)
    model = make()
    calib = datamod.from_arrays({"x": feeds}, datamod.input_specs(model))
    plain, aware = make(), make()
    kmeans(plain, bits=3)
    result = kmeans(aware, PassContext(calib=calib), bits=3, data_aware=True)
    assert "weighted_rel_error" in result.rows[0]
    ref = run_model(model, {"x": feeds})["y"]
    err = {name: np.mean((run_model(m, {"x": feeds})["y"] - ref) ** 2) for name, m in
           (("plain", plain), ("aware", aware))}
    assert err["aware"] < 0.2 * err["plain"]


def test_data_aware_without_data_names_the_pass():
    from graphopt.errors import GraphoptError

    with pytest.raises(GraphoptError, match="kmeans"):
        kmeans(conv_gemm_model(), bits=4, data_aware=True)


@pytest.mark.parametrize("raw", [{"bits": 0}, {"bits": 9}, {"init": "random"}, {"bits": 2.5}])
def test_bad_options_rejected_at_parse_time(raw):
    with pytest.raises(RecipeError, match="kmeans"):
        build_options(KMeans.Options, raw, "kmeans")


def test_quantize_rejects_nothing_small():
    cb = quantize(np.zeros((2, 3), np.float32), 4)
    np.testing.assert_array_equal(cb.reconstruct(), 0)


def test_digits_prune50_kmeans4_keeps_accuracy():
    model = modelio.load_model(DIGITS / "digits.onnx")
    test = np.load(DIGITS / "test.npz")

    def accuracy(m):
        logits = make_session(modelio.to_proto(m)).run(None, {"input": test["input"]})[0]
        return float((logits.argmax(1) == test["labels"]).mean())

    base = accuracy(model)
    Prune(build_options(Prune.Options, {"sparsity": 0.5}, "prune"))(model)
    result = kmeans(model, bits=4)
    assert len(result.rows) == 7
    acc = accuracy(model)
    # measured: float 99.72 %, prune 50 % + kmeans 4 bits 99.44 %
    assert acc >= base - 0.01, (base, acc)


# --- half_codebook and subgraphs -------------------------------------------------------------------------------


@pytest.mark.parametrize("per_channel", [False, True])
def test_half_codebook_stores_float16_centroids_and_widens_after_the_gather(per_channel, tmp_path):
    model = conv_gemm_model()
    original = clone(model)
    result = kmeans(model, bits=4, per_channel=per_channel, half_codebook=True)
    assert result.rows and all(r["codebook_dtype"] == "float16" for r in result.rows)
    for r in result.rows:
        book = model.graph.initializers[f"{r['weight']}_codebook"].const_value.numpy()
        assert book.dtype == np.float16
        # the stored centroids are what bytes_after counts: 2 bytes each
        index_bytes = (r["elements"] + 1) // 2
        offsets = 4 * r["codebook"][0] if per_channel else 0
        assert r["bytes_after"] == index_bytes + 2 * book.size + offsets
    # each weight is Cast(Gather(codebook, ...)) to float32: the Gather form cleanup holds out, then the widening
    for node in model.graph:
        if node.op_type in ("Conv", "Gemm", "MatMul") and node.name in {r["layer"] for r in result.rows}:
            widen = node.inputs[1].producer()
            assert widen.op_type == "Cast" and widen.attributes["to"].value == ir.DataType.FLOAT
            assert widen.inputs[0].producer().op_type == "Gather"
    # reported errors and sensitivity see the float16 centroids: the float model with the decoded weights
    dec = {name: w.astype(np.float32) for name, w in decoded(model).items()}
    assert_same_outputs(dense_with(original, dec), model, {"x": X}, rtol=1e-5, atol=1e-5)
    for r in result.rows:
        w = original.graph.initializers[r["weight"]].const_value.numpy()
        rel = np.linalg.norm(dec[r["weight"]] - w) / np.linalg.norm(w)
        assert abs(rel - r["rel_error"]) < 1e-4
    from graphopt.passes.cleanup import Cleanup

    Cleanup()(model)
    assert all(f"{r['weight']}_codebook" in model.graph.initializers for r in result.rows)
    path = tmp_path / "half.onnx"
    modelio.save_model(model, path)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    assert_same_outputs(dense_with(original, dec), str(path), {"x": X}, rtol=1e-5, atol=1e-5)


def test_half_codebook_keeps_float32_when_centroids_overflow_float16():
    w2 = randn((16, 288), 2) * 1e6  # beyond float16's 65504
    model = conv_gemm_model(w2=w2)
    result = kmeans(model, bits=4, half_codebook=True)
    dtypes = {r["weight"]: r["codebook_dtype"] for r in result.rows}
    assert dtypes == {"w": "float16", "w2": "float32", "w3": "float16"}
    assert model.graph.initializers["w2_codebook"].const_value.numpy().dtype == np.float32


def if_model():
    """x → MatMul(w) → If(c): then MatMul(w_then), else MatMul(w_else) → y; each body holds its own weight."""
    def branch(tag, seed):
        mm = helper.make_node("MatMul", ["h", f"w_{tag}"], [f"y_{tag}"], name=f"mm_{tag}")
        return helper.make_graph([mm], tag, [], [helper.make_tensor_value_info(f"y_{tag}", onnx.TensorProto.FLOAT,
                                                                               None)],
                                 [onnx.numpy_helper.from_array(randn((64, 64), seed), f"w_{tag}")])

    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("If", ["c"], ["y"], then_branch=branch("then", 2), else_branch=branch("else", 3),
                              name="if")]
    return make_model(nodes, [tensor_info("x", np.float32, [None, 64]), tensor_info("c", np.bool_, [])], ["y"],
                      {"w": randn((64, 64), 1)})


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("half", [False, True])
def test_weights_inside_if_bodies_get_names_unique_in_the_model(per_channel, half):
    # unnamed, the new values of the body and of the main graph were all 'val_0', 'val_1', ... per graph, and
    # onnxruntime refused the model (not SSA)
    model = if_model()
    original = clone(model)
    result = kmeans(model, bits=4, per_channel=per_channel, half_codebook=half)
    assert sorted(r["layer"] for r in result.rows) == ["mm", "mm_else", "mm_then"]
    graphs = [model.graph, *model.graph.subgraphs()]
    names = [v.name for g in graphs for node in g for v in node.outputs]
    assert len(names) == len(set(names)) and all(names)
    weights = {}
    for g in graphs:  # decode each weight from the initializers of its own graph
        inits = {n: v.const_value.numpy() for n, v in g.initializers.items()}
        for base in ("w", "w_then", "w_else"):
            if f"{base}_codebook" in inits:
                idx = inits[f"{base}_indices"].astype(np.int64) + inits.get(f"{base}_row_offsets", 0)
                weights[base] = inits[f"{base}_codebook"].astype(np.float32)[idx]
    assert sorted(weights) == ["w", "w_else", "w_then"]
    ref = clone(original)
    for g in [ref.graph, *ref.graph.subgraphs()]:
        for name, value in g.initializers.items():
            value.const_value = ir.tensor(weights[name], name=name)
    x = randn((3, 64), 9)
    for c in (True, False):
        assert_same_outputs(ref, model, {"x": x, "c": np.array(c)}, rtol=1e-5, atol=1e-5)
