"""Budget-seeking (graphopt.sensitivity.budget) and the passes built on it: kmeans bits=auto, prune sparsity=auto,
channel_prune ratio=auto.

The passes promise: the result keeps the run's budget on the calibration samples they judged on, also with the
output error made metrics.STRESS times larger; and they compress more than the gentlest setting when the budget
allows it."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import pytest

from graphopt import data as datamod, metrics, modelio
from graphopt.costs import count_macs
from graphopt.errors import GraphoptError, RecipeError
from graphopt.options import build_options
from graphopt.passbase import PassContext
from graphopt.passes.channels import ChannelPrune
from graphopt.passes.kmeans import KMeans
from graphopt.passes.prune import Prune
from graphopt.sensitivity import Ladder, SensitivityRow, frontier, furthest, holds
from graphopt.sensitivity.budget import chosen, seek_path, without_breaker
from tests.helpers import DIGITS

INF = math.inf


def test_frontier_takes_the_cheapest_loss_per_gain_first():
    a = Ladder("a", (1, 2), gains=(10.0, 20.0), losses=(0.1, 0.2))  # 0.01 per unit of gain at either step
    b = Ladder("b", (1, 2), gains=(10.0, 20.0), losses=(0.0, 1.0))  # free first step, then 0.1 per unit
    states = frontier([a, b])
    assert states == [(-1, -1), (-1, 0), (1, 0), (1, 1)]  # a: at equal rates the bigger step is taken


def test_frontier_jumps_a_non_convex_step_and_never_uses_unmeasured_or_useless_settings():
    # a's middle setting costs more than its last (losses never fall: it counts as 0.5 too), so the hull jumps it;
    # b's second setting was not measured, so b never takes it but jumps past it to its measured third; d's first
    # and third were not measured (a time budget spent on its middle width), so d takes only its second; c's
    # second setting gains nothing.
    a = Ladder("a", (1, 2, 3), gains=(1.0, 2.0, 30.0), losses=(0.0, 0.5, 0.3))
    b = Ladder("b", (1, 2, 3), gains=(5.0, 6.0, 7.0), losses=(0.01, INF, 0.02))
    c = Ladder("c", (1, 2), gains=(4.0, 4.0), losses=(0.0, 0.0))
    d = Ladder("d", (8, 4, 2), gains=(3.0, 6.0, 9.0), losses=(INF, 0.05, INF))
    states = frontier([a, b, c, d])
    assert all(s[1] != 1 for s in states)
    assert all(s[2] <= 0 for s in states)
    assert all(s[3] in (-1, 1) for s in states)
    assert (2, 2, 0, 1) == states[-1]
    assert not any(s[0] == 1 for s in states)
    assert chosen([a, b, c, d], states[-1]) == {"a": 3, "b": 3, "c": 1, "d": 4}


@pytest.mark.parametrize("edge", [0, 1, 5, 9, 10])
def test_furthest_finds_the_edge_of_a_monotone_check(edge):
    states = [(i,) for i in range(11)]
    seek = furthest(states, lambda s: s[0] <= edge)
    assert seek.index == edge
    assert len(seek.checks) <= 5
    assert all(held == (states[i][0] <= edge) for i, held in seek.checks)


def test_furthest_tries_everything_first_and_stops_at_max_checks():
    calls = []
    seek = furthest([(i,) for i in range(100)], lambda s: calls.append(s) or True)
    assert seek.index == 99 and calls == [(99,)]
    seek = furthest([(i,) for i in range(100)], lambda s: s[0] <= 40, max_checks=2)
    assert seek.checks == [(99, False), (49, False)] and seek.index == 0  # nothing verified: nothing changed


def test_without_breaker_keeps_every_later_step_of_the_other_layers():
    states = [(-1, -1, -1), (0, -1, -1), (0, 0, -1), (1, 0, -1), (1, 0, 0), (1, 1, 0), (1, 1, 1)]
    # the step to index 2 (layer 1 to its first setting) broke: layer 1 stays unchanged, the others go on
    assert without_breaker(states, 1) == [(0, -1, -1), (1, -1, -1), (1, -1, 0), (1, -1, 1)]


def test_seek_path_goes_past_the_layer_that_broke():
    # ladder 1's step breaks the model wherever it comes; the steps after it hold. Bisection alone stops at index 1
    # (ladders 1 and 2 unchanged); the second round takes ladder 2's step without ladder 1's
    states = [(-1, -1, -1), (0, -1, -1), (0, 0, -1), (0, 0, 0)]
    state, rounds = seek_path(states, lambda s: s[1] < 0, max_checks=10)
    assert rounds[0][0].index == 1 and state == (0, -1, 0)
    assert [r[2] for r in rounds] == [None, 1]  # the second round skipped ladder 1
    # with no check left after the bisection, the bisection's answer stands
    state, rounds = seek_path(states, lambda s: s[1] < 0, max_checks=3)
    assert state == (0, -1, -1) and len(rounds) == 1
    # a path that holds to its end needs one check and no second round
    state, rounds = seek_path(states, lambda s: True, max_checks=10)
    assert state == (0, 0, 0) and len(rounds) == 1 and rounds[0][0].checks == [(3, True)]


def _row(drop, stressed=None, snr=40.0, status="ok"):
    return SensitivityRow("k", "", None, drop, snr, None, 0.0, status, stressed_drop=stressed)


def test_holds_reads_the_drop_the_stressed_drop_or_the_snr():
    assert holds(_row(0.01), 0.01, None)
    assert not holds(_row(0.011), 0.01, None)
    assert holds(_row(0.0, stressed=0.02), 0.01, None)
    assert not holds(_row(0.0, stressed=0.02), 0.01, None, stressed=True)
    assert holds(_row(None, snr=31.5), None, 30.0) and not holds(_row(None, snr=30.5), None, 30.0)  # 1 dB margin
    assert not holds(_row(0.0, status="error"), 0.01, None)


def test_stressed_agreement_ignores_rescaling_and_sees_a_near_flip():
    ref = np.array([[3.0, 1.0, 0.0], [2.0, 1.9, 0.0]])
    scaled = 2.5 * ref + 1.0  # a per-row affine map: no arg-max can change, however much it is stressed
    cmp = metrics.compare(["y"], [[ref]], [[scaled]])
    assert cmp.agreement == 1.0 and cmp.stressed_agreement == 1.0
    near = ref + np.array([[0.0, 0.0, 0.0], [-0.04, 0.04, 0.0]])  # row 2 keeps its class by 0.02 ...
    cmp = metrics.compare(["y"], [[ref]], [[near]])
    assert cmp.agreement == 1.0 and cmp.stressed_agreement == 0.5  # ... and loses it with the error doubled
    assert cmp.drop("agreement") == 0.0 and cmp.drop("agreement", stressed=True) == 0.5
    assert metrics.STRESS == 2.0


# --- the passes on the bundled digits model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_calib():
    model = modelio.load_model(DIGITS / "digits.onnx")
    return datamod.load_data(str(DIGITS / "calib.npz"), datamod.input_specs(model))


def _context(digits_calib, max_drop):
    teacher = modelio.load_model(DIGITS / "digits.onnx")
    return PassContext(calib=digits_calib, teacher=teacher, metric="accuracy", max_drop=max_drop)


def _judged(context, model, samples):
    """The result against the teacher on the samples the pass judged on."""
    evaluator = context.calib_evaluator(samples)
    return evaluator.evaluate(model, progress=False)


@pytest.mark.parametrize("pass_cls, raw, key", [(KMeans, {"bits": "auto"}, "bits"),
                                                (Prune, {"sparsity": "auto"}, "sparsity")])
def test_auto_levels_keep_the_budget_and_compress(digits_calib, pass_cls, raw, key):
    model = modelio.load_model(DIGITS / "digits.onnx")
    context = _context(digits_calib, 0.01)
    options = build_options(pass_cls.Options, {**raw, "max_samples": 200}, pass_cls.name)
    result = pass_cls(options, context)(model)
    assert result.modified and result.rows
    levels = options.levels
    assert all(r[key] in levels or round(r[key], 2) in levels for r in result.rows)
    assert len(result.rows) >= 3
    assert any("budget:" in n and "held" in n for n in result.notes)
    cmp = _judged(context, model, 200)
    assert cmp.drop("accuracy", stressed=True) <= 0.01 + 1e-9
    if pass_cls is KMeans:  # most weights end far below 8 bits: well past the gentlest setting
        assert sum(r["bytes_after"] for r in result.rows) < sum(r["bytes_before"] for r in result.rows) / 6


@pytest.mark.parametrize("repair", [False, True])
def test_channel_ratio_auto_keeps_the_budget_and_removes_macs(digits_calib, repair):
    """Each group's ratio from the levels, checked on whole models as the pass emits them (pruned, then repaired
    when it repairs): the result keeps the stressed budget on the samples judged, and the budget buys real MACs
    (one point affords about 20% of the digits model's; all five groups at their top level cost 72 points)."""
    model = modelio.load_model(DIGITS / "digits.onnx")
    before = count_macs(model)
    context = _context(digits_calib, 0.01)
    raw = {"ratio": "auto", "max_samples": 200, "repair": repair}
    result = ChannelPrune(build_options(ChannelPrune.Options, raw, "channel_prune"), context)(model)
    assert result.modified and len(result.rows) >= 2
    assert any(n.startswith("budget:") and "held" in n for n in result.notes)
    assert count_macs(model) < 0.9 * before
    assert _judged(context, model, 200).drop("accuracy", stressed=True) <= 0.01 + 1e-9


def test_channel_ratio_auto_stops_its_path_at_max_macs(digits_calib):
    """The path ends before the first state removing more than max_macs of the MACs, whatever the budget allows
    (a 5-point budget here; at the default 0.3 the digits model loses about 18%)."""
    model = modelio.load_model(DIGITS / "digits.onnx")
    before = count_macs(model)
    raw = {"ratio": "auto", "max_samples": 200, "max_macs": 0.1}
    ChannelPrune(build_options(ChannelPrune.Options, raw, "channel_prune"), _context(digits_calib, 0.05))(model)
    assert 0.9 * before <= count_macs(model) < before


def test_channel_ratio_auto_is_per_group_so_not_global():
    with pytest.raises(RecipeError, match="ratio=auto"):
        build_options(ChannelPrune.Options, {"ratio": "auto", "scope": "global"}, "channel_prune")


def test_a_zero_budget_changes_only_what_costs_nothing(digits_calib):
    model = modelio.load_model(DIGITS / "digits.onnx")
    context = _context(digits_calib, 0.0)
    KMeans(build_options(KMeans.Options, {"bits": "auto", "max_samples": 200}, "kmeans"), context)(model)
    assert _judged(context, model, 200).drop("accuracy", stressed=True) <= 1e-9


def test_bits_by_layer_and_names_that_match_nothing(digits_calib):
    model = modelio.load_model(DIGITS / "digits.onnx")
    gemms = [n.name for n in model.graph if n.op_type == "Gemm"]
    result = KMeans(build_options(KMeans.Options, {"bits": {gemms[0]: 3, "nope": 2}}, "kmeans"))(model)
    assert [(r["layer"], r["bits"]) for r in result.rows] == [(gemms[0], 3)]
    assert any("nope" in n for n in result.notes)
    assert any(n.op_type == "Gather" for n in model.graph)


def test_auto_without_data_is_refused_before_any_pass_runs(tmp_path):
    import graphopt
    from graphopt.pipeline import RunOptions

    out = tmp_path / "out.onnx"
    with pytest.raises(GraphoptError, match="bits=auto"):
        graphopt.optimize(str(DIGITS / "digits.onnx"), out, passes="fold_batchnorm; kmeans:bits=auto",
                          run=RunOptions(latency=False, progress=False))
    assert not out.exists()


def test_seek_budget_without_a_budget_is_a_programming_error(digits_calib):
    from graphopt.sensitivity import seek_budget

    with pytest.raises(ValueError, match="budget"):
        seek_budget(PassContext(calib=digits_calib), ir.Model(ir.Graph([], [], nodes=[]), ir_version=10), [],
                    lambda layer, setting: None)
