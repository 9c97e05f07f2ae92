"""lowrank: exactness at full rank for every scheme and conv geometry, rank/MACs arithmetic, data-aware vs plain,
layers that would grow left alone, the global budget, option validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import helper

from graphopt.costs import layer_costs
from graphopt.data.dataset import Dataset
from graphopt.errors import RecipeError
from graphopt.options import build_options
from graphopt.passbase import PassContext
from graphopt.passes.lowrank import Choice, LowRank, allocate
from tests.helpers import assert_same_outputs, clone, make_model, op_types, randn, run_model, tensor_info

FULL = 1_000_000  # a rank above every full rank: clipped to full


def _run(model, **options):
    opts = build_options(LowRank.Options, options, "lowrank")
    return LowRank(opts)(model)


def conv_model(c=6, n=8, k=(3, 3), hw=(11, 13), bias=True, seed=0, **attrs):
    w = randn((n, c, *k), seed) * 0.3
    inits = {"W": w}
    inputs = ["x", "W"]
    if bias:
        inits["B"] = randn((n,), seed + 1)
        inputs.append("B")
    node = helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)
    relu = helper.make_node("Relu", ["y"], ["z"], name="relu")
    return make_model([node, relu], [tensor_info("x", np.float32, (2, c, *hw))], ["z"], inits)


GEOMETRIES = {
    "plain": {},
    "padded": {"pads": [1, 2, 0, 1]},
    "strided": {"strides": [2, 3], "pads": [1, 1, 1, 1]},
    "dilated": {"dilations": [2, 1], "pads": [2, 0, 1, 1]},
    "same_upper_strided": {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    "same_lower": {"auto_pad": "SAME_LOWER", "strides": [3, 1]},
    "valid": {"auto_pad": "VALID", "strides": [1, 2]},
}


@pytest.mark.parametrize("scheme", ["basis", "tucker", "spatial", "svd"])
@pytest.mark.parametrize("geo", list(GEOMETRIES))
def test_full_rank_conv_reproduces_outputs(scheme, geo):
    model = conv_model(k=(3, 2) if scheme == "spatial" else (3, 3), **GEOMETRIES[geo])
    ref = clone(model)
    result = _run(model, scheme=scheme, rank=FULL, min_saving=-10, min_size=0)
    assert len(result.rows) == 1 and result.rows[0]["scheme"] == ("basis" if scheme == "svd" else scheme)
    assert op_types(model).count("Conv") == (3 if scheme == "tucker" else 2)
    feeds = {"x": randn((2, 6, 11, 13), 5)}
    out_ref, out = run_model(ref, feeds)["z"], run_model(model, feeds)["z"]
    assert np.linalg.norm(out - out_ref) / np.linalg.norm(out_ref) < 1e-4
    assert_same_outputs(ref, model, feeds, rtol=1e-4, atol=1e-4)


def test_full_rank_1x1_conv_and_conv1d():
    model = conv_model(c=12, n=10, k=(1, 1), bias=False, strides=[2, 2], pads=[1, 0, 0, 1])
    ref = clone(model)
    result = _run(model, rank=FULL, min_saving=-10, min_size=0)
    assert result.rows[0]["scheme"] == "svd" and op_types(model).count("Conv") == 2
    assert_same_outputs(ref, model, {"x": randn((2, 12, 11, 13), 1)}, rtol=1e-4, atol=1e-4)
    w = randn((8, 5, 3), 2)
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="c1d", strides=[2], pads=[1, 2], dilations=[2])
    model = make_model([node], [tensor_info("x", np.float32, (1, 5, 30))], ["y"], {"W": w})
    ref = clone(model)
    for scheme in ("tucker", "basis"):
        m = clone(ref)
        assert _run(m, scheme=scheme, rank=FULL, min_saving=-10, min_size=0).rows
        assert_same_outputs(ref, m, {"x": randn((1, 5, 30), 3)}, rtol=1e-4, atol=1e-4)
    assert not _run(clone(ref), scheme="spatial", rank=FULL, min_saving=-10, min_size=0).rows  # 2-D only


def gemm_model(trans_b=1, alpha=0.7, beta=1.3, d_in=40, d_out=30, seed=0, rows=5):
    w = randn((d_out, d_in) if trans_b else (d_in, d_out), seed)
    node = helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="fc", transB=trans_b, alpha=alpha, beta=beta)
    return make_model([node], [tensor_info("x", np.float32, (rows, d_in))], ["y"], {"W": w, "C": randn((d_out,), 9)})


@pytest.mark.parametrize("trans_b", [0, 1])
def test_full_rank_gemm_keeps_bias_alpha_beta(trans_b):
    model = gemm_model(trans_b)
    ref = clone(model)
    result = _run(model, rank=FULL, min_saving=-10, min_size=0)
    assert result.rows[0]["scheme"] == "svd" and op_types(model) == ["MatMul", "Gemm"]
    assert_same_outputs(ref, model, {"x": randn((5, 40), 4)}, rtol=1e-4, atol=1e-4)


def test_full_rank_matmul_with_bias_add_rank3_input():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Add", ["h", "b"], ["y"])]
    model = make_model(nodes, [tensor_info("x", np.float32, (2, 7, 24))], ["y"],
                       {"W": randn((24, 20), 1), "b": randn((20,), 2)})
    ref = clone(model)
    assert _run(model, rank=FULL, min_saving=-10, min_size=0).rows
    assert op_types(model) == ["MatMul", "MatMul", "Add"]
    assert_same_outputs(ref, model, {"x": randn((2, 7, 24), 3)}, rtol=1e-4, atol=1e-4)


def _spectrum_matrix(d_in, d_out, s, seed=0):
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.standard_normal((d_in, len(s))))[0]
    v = np.linalg.qr(rng.standard_normal((d_out, len(s))))[0]
    return (u * s) @ v.T


def test_rank_and_macs_arithmetic_gemm_and_energy():
    s = np.array([8.0, 4.0, 2.0, 1.0, 0.5, 0.25])
    w = _spectrum_matrix(64, 48, s).astype(np.float32)
    model = make_model([helper.make_node("Gemm", ["x", "W"], ["y"], name="fc")],
                       [tensor_info("x", np.float32, (3, 64))], ["y"], {"W": w})
    ref = clone(model)
    row = _run(model, rank=2, min_size=0).rows[0]
    assert row["rank"] == 2 and row["params_before"] == 64 * 48 and row["params_after"] == 2 * (64 + 48)
    assert row["macs_before"] == 3 * 64 * 48 and row["macs_after"] == 3 * 2 * (64 + 48)
    assert row["rel_error"] == pytest.approx(math.sqrt(np.sum(s[2:] ** 2) / np.sum(s ** 2)), rel=1e-4)
    # Rewritten graph's MACs (counted by graphopt.costs from shapes) agree with the row.
    assert sum(c.macs for c in layer_costs(model)) == row["macs_after"]
    # energy: smallest rank whose kept energy reaches the fraction: (64+16)/(64+16+4+1+...) >= 0.94 -> rank 2
    energy = np.cumsum(s ** 2) / np.sum(s ** 2)
    for e in (0.5, 0.94, 0.99):
        m = clone(ref)
        assert _run(m, energy=e, min_size=0).rows[0]["rank"] == int(np.argmax(energy >= e - 1e-12)) + 1
    # ratio of params: at most 25% of 3072 -> rank <= 6 (6*112 = 672 <= 768), least error = the largest rank
    assert _run(clone(ref), ratio=0.25, ratio_of="params", min_size=0).rows[0]["rank"] == 6


def test_conv_macs_per_scheme():
    model = conv_model(c=16, n=32, hw=(20, 20), pads=[1, 1, 1, 1])
    rows = {}
    for scheme in ("basis", "spatial", "tucker"):
        m = clone(model)
        rows[scheme] = _run(m, scheme=scheme, rank=4, min_size=0).rows[0]
        assert sum(c.macs for c in layer_costs(m)) == rows[scheme]["macs_after"]
    hw = 2 * 20 * 20  # batch 2
    assert rows["basis"]["macs_before"] == 32 * 16 * 9 * hw
    assert rows["basis"]["macs_after"] == 4 * (16 * 9 + 32) * hw
    assert rows["spatial"]["macs_after"] == 4 * 16 * 3 * hw + 32 * 4 * 3 * hw
    assert rows["tucker"]["macs_after"] == 4 * 16 * hw + 4 * 4 * 9 * hw + 32 * 4 * hw
    assert rows["tucker"]["params_after"] == 4 * 16 + 4 * 4 * 9 + 32 * 4 and rows["tucker"]["rank"] == [4, 4]
    auto = _run(clone(model), scheme="auto", rank=4, min_size=0).rows[0]  # auto: the most MACs saved at rank 4
    assert auto["macs_after"] == min(r["macs_after"] for r in rows.values())


def test_layers_that_would_grow_are_left_alone():
    model = gemm_model(d_in=64, d_out=8)  # rank 8: 8*(64+8) = 576 > 512 MACs per row
    ref = clone(model)
    result = _run(model, rank=8, min_size=0)
    assert not result.rows and not result.modified and op_types(model) == ["Gemm"]
    assert any("left alone" in n for n in result.notes)
    assert_same_outputs(ref, model, {"x": randn((5, 64), 1)})
    # rank 6 saves 1 - 432/512 = 15.6%: taken with the default 10% margin, refused with a 20% margin
    assert _run(clone(ref), rank=6, min_size=0).rows
    assert not _run(clone(ref), rank=6, min_size=0, min_saving=0.2).rows


def _correlated(n, d, seed):
    mix = np.random.default_rng(99).standard_normal((d, d)) * np.geomspace(3.0, 0.01, d)[:, None]
    return (np.random.default_rng(seed).standard_normal((n, d)) @ mix + 0.5).astype(np.float32)


def _output_error(ref, model, feeds):
    errs, norms = 0.0, 0.0
    for feed in feeds:
        a, b = run_model(ref, feed), run_model(model, feed)
        for k in a:
            errs += float(np.sum((a[k] - b[k]).astype(np.float64) ** 2))
            norms += float(np.sum(a[k].astype(np.float64) ** 2))
    return math.sqrt(errs / norms)


def test_data_aware_beats_plain_gemm_and_conv():
    feeds = [{"x": _correlated(50, 40, i)} for i in range(4)]
    ref = gemm_model(d_in=40, d_out=30, rows=50)
    context = PassContext(calib=Dataset(feeds=feeds))
    errors = {}
    for aware in (False, True):
        m = clone(ref)
        opts = build_options(LowRank.Options, {"rank": 5, "data_aware": aware, "min_size": 0, "max_samples": 1000}, "lowrank")
        row = LowRank(opts, context)(m).rows[0]
        errors[aware] = _output_error(ref, m, feeds)
        assert row["error_space"] == ("data" if aware else "weight")
        if aware:  # the reported data-space error is the measured one (same calibration rows)
            assert row["rel_error"] == pytest.approx(errors[True], rel=0.05, abs=1e-3)
    assert errors[True] < 0.7 * errors[False]

    rng = np.random.default_rng(0)
    base = rng.standard_normal((8, 1, 12, 12)).astype(np.float32)  # channels share one smooth image: correlated
    cfeeds = [{"x": np.concatenate([base[i:i + 2] * a for a in (1.0, 0.5, -0.3, 0.1, 2.0, 0.7)], axis=1)
               + 0.05 * rng.standard_normal((2, 6, 12, 12)).astype(np.float32)} for i in range(0, 8, 2)]
    cref = conv_model(pads=[1, 1, 1, 1], hw=(12, 12))
    cerr = {}
    for aware in (False, True):
        m = clone(cref)
        opts = build_options(LowRank.Options, {"rank": 3, "scheme": "basis", "data_aware": aware, "min_size": 0},
                             "lowrank")
        assert LowRank(opts, PassContext(calib=Dataset(feeds=cfeeds)))(m).rows
        cerr[aware] = _output_error(cref, m, cfeeds)
    assert cerr[True] <= cerr[False]


def test_global_budget_spreads_rank_by_error():
    decaying = _spectrum_matrix(64, 64, np.geomspace(10, 0.01, 64), 1).astype(np.float32)
    flat = _spectrum_matrix(64, 64, np.ones(64), 2).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"], name="decaying"),
             helper.make_node("MatMul", ["h", "B"], ["y"], name="flat")]
    model = make_model(nodes, [tensor_info("x", np.float32, (4, 64))], ["y"], {"A": decaying, "B": flat})
    result = _run(model, macs=0.5, min_size=0)
    rows = {r["layer"]: r for r in result.rows}
    total = 2 * 4 * 64 * 64
    kept = sum(r["macs_after"] for r in rows.values()) + sum(4 * 64 * 64 for n in ("decaying", "flat") if n not in rows)
    assert kept <= 0.5 * total
    assert "decaying" in rows and rows["decaying"]["rank"] < 16  # the cheap layer pays for the budget
    # decaying alone cannot save half the MACs, so both layers are factorized; the budget's rest goes to the flat
    # spectrum, where every rank dropped costs far more error than on the decaying one
    assert "flat" in rows and rows["flat"]["rank"] > rows["decaying"]["rank"]


def test_allocate_by_hand():
    # layer 0: base 100; saving 50 costs 0.1, saving 80 costs 0.5. layer 1: base 100; saving 50 costs 0.01.
    a = [Choice("svd", (5,), 50, 0, 0.1), Choice("svd", (2,), 20, 0, 0.5)]
    b = [Choice("svd", (5,), 50, 0, 0.01)]
    assert allocate([a, b], [100, 100], 0.75) == [None, b[0]]  # save 50: the cheap layer alone
    assert allocate([a, b], [100, 100], 0.5) == [a[0], b[0]]  # save 100
    assert allocate([a, b], [100, 100], 0.35) == [a[1], b[0]]  # save 130
    assert allocate([a, b], [100, 100], 0.9) == [None, b[0]]


@pytest.mark.parametrize("raw", [{"scheme": "cp"}, {"rank": 0}, {"energy": 1.5}, {"energy": 0}, {"macs": 0},
                                 {"macs": 1.0}, {"rank": 4, "macs": 0.5}, {"energy": 0.9, "ratio": 0.5},
                                 {"ratio_of": "bytes"}, {"data_aware": "maybe"}, {"min_saving": 1.0},
                                 {"rank_of": 3}])
def test_bad_options_rejected_at_parse_time(raw):
    with pytest.raises(RecipeError, match="lowrank"):
        build_options(LowRank.Options, raw, "lowrank")


def test_data_aware_needs_calibration():
    from graphopt.errors import GraphoptError

    with pytest.raises(GraphoptError, match="calibration"):
        _run(gemm_model(), rank=4, data_aware=True, min_size=0)


def test_ratio_auto_cuts_where_measured_cheap_and_keeps_the_budget():
    # Two layers of the same size: one with a fast-decaying spectrum (most ranks cost nothing), one flat (every
    # rank dropped costs 1/64 of the output). With a 30 dB floor on the worst channel, ratio=auto must cut the
    # first and leave the second alone, and the whole model must hold the floor.
    decaying = _spectrum_matrix(64, 64, np.geomspace(10, 1e-8, 64), 1).astype(np.float32)
    flat = _spectrum_matrix(64, 64, np.ones(64), 2).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"], name="decaying"),
             helper.make_node("MatMul", ["h", "B"], ["y"], name="flat")]
    model = make_model(nodes, [tensor_info("x", np.float32, ("N", 64))], ["y"], {"A": decaying, "B": flat})
    feeds = [{"x": randn((32, 64), seed)} for seed in range(4)]
    context = PassContext(calib=Dataset(feeds=feeds), teacher=clone(model), metric="snr", min_snr=30.0)
    opts = build_options(LowRank.Options, {"ratio": "auto", "ratio_of": "params", "min_size": 0}, "lowrank")
    result = LowRank(opts, context)(model)
    rows = {r["layer"]: r for r in result.rows}
    assert list(rows) == ["decaying"] and rows["decaying"]["params_after"] <= 0.5 * 64 * 64, result.notes
    assert any(n.startswith("budget: 1 of 2 layer(s) changed") for n in result.notes), result.notes
    ref = np.concatenate([run_model(context.teacher, f)["y"] for f in feeds])
    got = np.concatenate([run_model(model, f)["y"] for f in feeds])
    worst = min(10 * np.log10(np.sum(ref[:, c] ** 2) / np.sum((ref[:, c] - got[:, c]) ** 2)) for c in range(64))
    assert worst >= 30.0


def test_ratio_auto_on_digits_stays_inside_the_budget(tmp_path):
    import graphopt
    from graphopt.pipeline import RunOptions
    from tests.helpers import DIGITS

    report = graphopt.optimize(str(DIGITS / "digits.onnx"), tmp_path / "o.onnx", calib=DIGITS / "calib.npz",
                               data=DIGITS / "calib.npz", max_drop=0.01, run=RunOptions(latency=False, progress=False),
                               passes="lowrank:ratio=auto,ratio_of=params,data_aware=true,max_samples=256")
    row = next(r for r in report.passes if r.step.startswith("lowrank"))
    assert row.status == "kept" and report.passed and row.rows, row.notes
    assert sum(r["params_after"] for r in row.rows) < 0.5 * sum(r["params_before"] for r in row.rows)
    assert report.final["reference_accuracy"] - report.final["accuracy"] <= 0.01 + 1e-9
    assert report.passes[-1].params < report.passes[0].params


def test_ratio_auto_needs_data():
    assert LowRank.needs_data(build_options(LowRank.Options, {"ratio": "auto"}, "lowrank"))
    assert LowRank.needs_data(build_options(LowRank.Options, {"ratio": 0.5}, "lowrank")) is None
