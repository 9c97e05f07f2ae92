"""channel_prune: remove whole channels with every coupled tensor, then (with data) refit the consumers.

Pieces (as in Torch-Pruning): :mod:`deps` finds the dependency groups, :mod:`importance` scores their removal
units, :mod:`plan` decides how many channels each group loses (a ratio per layer, one global ratio over
normalized importance, per-group ratios from measured sensitivity, or with ``ratio=auto`` the most the accuracy
budget allows) and :mod:`select` which units, :mod:`rewrite` slices the tensors and :mod:`repair` refits the
consumer layers on calibration data. The pass runs them as named steps; what one call learns travels in a
:class:`Setup`, never on the pass.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir

from graphopt import costs
from graphopt.data import Dataset, feed_shapes
from graphopt.options import BaseOptions, option
from graphopt.passbase import GraphoptPass, GraphoptResult
from graphopt.passes.channels.deps import analyze
from graphopt.passes.channels.importance import KINDS, consumer_stats, criterion
from graphopt.passes.channels.plan import Plan, Repair, budget_plan, global_plan, layer_plan, sensitivity_plan
from graphopt.passes.channels.repair import channel_means, compare, repair as repair_layers
from graphopt.passes.channels.rewrite import remove_channels, removals
from graphopt.passes.channels.select import removed_channels
from graphopt.passes.channels.state import Analysis
from graphopt.passes.channels.types import Group, Slot, label

__all__ = ["ChannelPrune"]


@dataclasses.dataclass
class Setup:
    """What one call knows before it plans, handed from step to step."""

    original: ir.Model  # the model as the pass received it
    data: Dataset | None  # real calibration data
    shapes: dict[str, tuple]
    analysis: Analysis
    prunable: list[Group]
    scored: dict[int, tuple[np.ndarray, str]]  # group id -> (score per channel of each unit, criterion used)
    input_shapes: dict[str, tuple[int, ...]] | None
    costs_before: dict[str, int]  # MACs per node
    means: dict[str, np.ndarray]  # per-channel calibration means of the consumer inputs (compensation)

    @property
    def scores(self) -> dict[int, np.ndarray]:
        return {k: v[0] for k, v in self.scored.items()}


class ChannelPrune(GraphoptPass):
    """Structured pruning of Conv/ConvTranspose/Gemm/MatMul output channels with their dependency groups
    (attention heads as units of Q/K/V columns, FFN neurons through GELU)."""

    name = "channel_prune"
    summary = ("structured pruning: remove whole channels with every coupled tensor (BN, residual Add/Sum, "
               "Concat, depthwise, Flatten→Gemm, attention heads, FFN neurons); ridge repair of the next layers "
               "on calibration data")

    @dataclasses.dataclass(frozen=True)
    class Options(BaseOptions):
        ratio: float | dict[str, float] | Literal["auto"] = option(
            0.3, "fraction of each group's channels removed: one value, or a mapping producer node name → "
                 "ratio ('*' for the rest), or auto: each group's ratio (from levels, measured as with "
                 "scope=sensitivity) chosen inside max_drop (needs --calib)", low=0.0, high=1.0, high_open=True)
        scope: Literal["layer", "global", "sensitivity"] = option(
            "layer", "layer: every group loses `ratio`; global: `ratio` of all channels, the least important "
                     "by normalized score; sensitivity: each group pruned alone at `levels` is measured on "
                     "calibration data, then groups get per-group ratios (cheapest output damage per MAC first) "
                     "removing about `ratio` of the model's MACs", choices=("layer", "global", "sensitivity"))
        levels: list[float] = option([0.05, 0.1, 0.25, 0.5], "scope=sensitivity, ratio=auto: group ratios measured "
                                                        "(and the largest one a group may get)")
        max_macs: float = option(0.3, "ratio=auto: the most of the model's MACs removed (every budget check "
                                      "runs a repair; the far end of the path breaks any budget)", low=0.0,
                                 high=1.0, low_open=True)
        sensitivity_samples: int = option(16, "scope=sensitivity, ratio=auto: calibration samples per measurement",
                                          low=1)
        time_budget: float = option(600.0, "scope=sensitivity, ratio=auto: seconds for the measurements (groups not "
                                           "reached keep all channels)", low=0.0, low_open=True)
        importance: Literal["l1", "l2", "bn", "activation", "reconstruction"] = option(
            "l1", "channel score: filter L1/L2 norm, BatchNorm |gamma|, mean |activation| (data), or the "
                  "consumer-output error of removing it (data)", choices=KINDS)
        round_to: int = option(1, "kept widths are multiples of this (8/16 suit SIMD kernels)", low=1)
        min_channels: int = option(1, "never keep fewer channels in a group", low=1)
        max_ratio: float = option(0.9, "scope=global: no group loses more than this fraction", low=0.0, high=1.0,
                                  high_open=True)
        repair: bool | None = option(None, "refit consumer layers on calibration data (default: when data is "
                                           "given)")
        max_samples: int = option(256, "calibration samples for importance and repair", low=1)
        lam: float = option(1e-4, "ridge strength of the repair (relative to the mean input energy)", low=0.0)
        repair_rounds: int = option(0, "most data passes for the repair: pass k refits the layers whose "
                                       "upstream refits are done (dependency wave k); layers of later waves are "
                                       "left as pruned. 0 = as many passes as there are waves", low=0)
        holdout: float = option(0.25, "fraction of the repair's calibration samples held out: a refit that does "
                                      "not lower a layer's error on them is undone", low=0.0, high=1.0,
                                high_open=True)
        skip_nodes: list[str] = option([], "producer/member node names whose groups are never pruned")
        compensate: bool = option(True, "with calibration data, fold each removed input channel's mean "
                                        "contribution into the consumer layer's bias (removed channels are "
                                        "rarely zero: biases and affine blocks make them constants)")

        def check(self) -> None:
            if isinstance(self.ratio, dict) and self.scope != "layer":
                raise ValueError(f"scope={self.scope} takes one ratio, not a mapping")
            if self.ratio == "auto" and self.scope == "global":
                raise ValueError("ratio=auto gives each group its own ratio; scope=global takes one ratio")
            if not self.levels or any(not 0 < v < 1 for v in self.levels):
                raise ValueError("levels must be ratios between 0 and 1 (exclusive)")

    @classmethod
    def needs_data(cls, options) -> str | None:
        if criterion(options.importance).needs_data:
            return f"importance={options.importance} scores channels by their activations"
        if options.ratio == "auto":
            return "ratio=auto measures each group's damage on data"
        if options.scope == "sensitivity":
            return "scope=sensitivity measures each group's damage on data"
        return None

    # --- the steps --------------------------------------------------------------------------------------
    def call(self, model: ir.Model) -> GraphoptResult:
        notes: list[str] = []
        setup = self._prepare(model, notes)
        plan = self._plan(model, setup, notes)
        if plan.empty:
            notes.append("no channel removed")
            return self.result(model, [], notes)
        slot_removed = remove_channels(model, setup.analysis.fixups, setup.prunable, plan.removed, setup.means,
                                       self.mark, notes, self.options.compensate and self.context.calib is not None)
        costs_after = _costs(model, setup.input_shapes)
        refits = self._repair(model, setup, slot_removed, notes)
        rows = _rows(setup, plan, costs_after, refits)
        notes.append(_summary(rows, setup, costs_after))
        return self.result(model, rows, notes)

    def _prepare(self, model: ir.Model, notes: list[str]) -> Setup:
        """Dependency groups, their scores, the MACs before and (to compensate) the consumer inputs' means."""
        opts = self.options
        crit = criterion(opts.importance)
        calib = self.context.calib
        data = calib if calib is not None and not calib.synthetic else None
        if crit.needs_data:
            data = self.context.require_calib(self.name)
        original = model.clone()
        shapes = costs.value_dims(model)
        analysis, groups = analyze(model, shapes)
        prunable = [g for g in groups if g.prunable and g.size > 1]
        if opts.skip_nodes:
            skip = set(opts.skip_nodes)
            prunable = [g for g in prunable if not skip & set(g.members())]
        notes.extend(_explain(groups))
        stats = None
        if crit.needs_data:
            stats = consumer_stats(model, prunable, data, self.context.threads, opts.max_samples)
        scored = {g.id: crit.score(g, stats) for g in prunable}
        input_shapes = feed_shapes(model, data)
        costs_before = _costs(model, input_shapes)
        means: dict[str, np.ndarray] = {}
        if opts.compensate and data is not None:  # every prunable consumer input: one data pass
            everything = removals(prunable, {g.id: np.arange(g.size) for g in prunable})[0]
            means = channel_means(model, everything, data, self.context.threads, opts.max_samples)
        return Setup(original, data, shapes, analysis, prunable, scored, input_shapes, costs_before, means)

    def _plan(self, model: ir.Model, setup: Setup, notes: list[str]) -> Plan:
        """The units each group loses, by ``scope``; notes the groups where ``round_to`` could not be met."""
        opts = self.options
        if opts.ratio == "auto" or opts.scope == "sensitivity":
            self.context.require_calib(self.name)
        if opts.ratio == "auto":
            plan = budget_plan(self.context, model, setup.shapes, setup.prunable, setup.scores, setup.means,
                               setup.costs_before, opts, self.mark, self._repair_fn(setup), notes)
        elif opts.scope == "sensitivity":
            plan = sensitivity_plan(self.context, model, setup.shapes, setup.prunable, setup.scores, setup.means,
                                    setup.costs_before, opts, self.mark, notes)
        elif opts.scope == "layer":
            plan = layer_plan(setup.prunable, setup.scores, opts)
        else:
            plan = global_plan(setup.prunable, setup.scores, opts, notes)
        if plan.unmet:
            notes.append(f"round_to={opts.round_to} not met in {len(plan.unmet)} group(s) (no set of their removal "
                         f"units leaves a multiple of it; the largest removal within the ratio was taken): "
                         + ", ".join(plan.unmet[:6]) + (" ..." if len(plan.unmet) > 6 else ""))
        if plan.spared:
            notes.append(f"{len(plan.spared)} group(s) kept the last channel of a tensor carrying only part of the "
                         f"group (a Concat input; removing it would leave a layer with no outputs): "
                         + ", ".join(plan.spared[:6]) + (" ..." if len(plan.spared) > 6 else ""))
        return plan

    def _repairs(self, setup: Setup) -> bool:
        return self.options.repair if self.options.repair is not None else setup.data is not None

    def _repair_fn(self, setup: Setup) -> Repair | None:
        """The repair as budget checks run it on a pruned clone (no notes, no before/after comparison)."""
        if not self._repairs(setup) or setup.data is None:
            return None
        return lambda clone, removed: repair_layers(clone, setup.original, removed, setup.data, self.options,
                                                    self.context, self.mark, [])

    def _repair(self, model: ir.Model, setup: Setup, slot_removed: dict[Slot, np.ndarray],
                notes: list[str]) -> dict[str, tuple[float, float]]:
        """Refit the consumer layers on calibration data (when asked, by default when data is given)."""
        opts, data = self.options, setup.data
        repair = self._repairs(setup)
        if repair and data is None:
            notes.append("repair skipped: no calibration data")
        elif repair:
            unrepaired = model.clone()
            refits = repair_layers(model, setup.original, slot_removed, data, opts, self.context, self.mark, notes)
            compare(setup.original, unrepaired, model, data, self.context, opts.max_samples, notes)
            return refits
        elif data is None:
            notes.append("repair off: no calibration data given (accuracy is not restored)")
        return {}


def _explain(groups: list[Group]) -> list[str]:
    ok = [g for g in groups if g.prunable]
    notes = [f"{len(groups)} dependency group(s), {len(ok)} prunable "
             f"({sum(len(g.producers) > 1 for g in ok)} coupling several layers)"]
    blocked = [g for g in groups if not g.prunable]
    for g in blocked[:8]:
        notes.append(f"group of {', '.join(label(p) for p in g.producers[:3])} left intact: {g.reasons[0]}")
    if len(blocked) > 8:
        notes.append(f"... {len(blocked) - 8} more group(s) left intact")
    return notes


def _rows(setup: Setup, plan: Plan, costs_after: dict[str, int],
          refits: dict[str, tuple[float, float]]) -> list[dict]:
    """One report row per pruned group: channels, MACs and refit errors of its members."""
    rows = []
    for g in setup.prunable:
        if not len(plan.removed.get(g.id, [])):
            continue
        members = g.members()
        errs = [refits[m] for m in members if m in refits]
        lost = removed_channels(g, plan.removed[g.id])
        rows.append({
            "group": g.id, "producers": [label(p) for p in g.producers], "members": members,
            "channels_before": g.channels, "channels_after": g.channels - lost,
            "importance": setup.scored[g.id][1],
            "macs_before": sum(setup.costs_before.get(m, 0) for m in members),
            "macs_after": sum(costs_after.get(m, 0) for m in members),
            "refit_error_before": round(float(np.mean([e[0] for e in errs])), 5) if errs else None,
            "refit_error_after": round(float(np.mean([e[1] for e in errs])), 5) if errs else None,
        })
    return rows


def _summary(rows: list[dict], setup: Setup, costs_after: dict[str, int]) -> str:
    total_b, total_a = sum(setup.costs_before.values()), sum(costs_after.values())
    removed = sum(r["channels_before"] - r["channels_after"] for r in rows)  # channels, not units
    at = " at the first calibration feed's shapes" if setup.input_shapes else ""
    if not total_b:  # symbolic dims the cost model could not resolve: say so, not "100% fewer"
        return f"{len(rows)} group(s) pruned, {removed} channel(s) removed; MACs unknown (shapes not inferred)"
    return (f"{len(rows)} group(s) pruned, {removed} channel(s) removed; MACs{at} {total_b:,} -> "
            f"{total_a:,} ({1 - total_a / total_b:.1%} fewer)")


def _costs(model: ir.Model, input_shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, int]:
    try:
        return {c.node: c.macs for c in costs.layer_costs(model, input_shapes)}
    except Exception:  # noqa: BLE001 - MACs are informative only
        return {}
