"""channel_prune: remove whole channels with every coupled tensor, then (with data) refit the consumers.

Pieces (as in Torch-Pruning): :mod:`channel_deps` finds the dependency groups, :mod:`channel_importance`
scores their removal units, :mod:`channel_select` picks the units (widths in channels: ratio, floor,
``round_to``), :mod:`channel_rewrite` slices the tensors and :mod:`channel_repair` refits the consumer layers
on calibration data. This module decides how many channels each group loses: a ratio per layer, one global
ratio over normalized importance, or per-group ratios from measured sensitivity.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Literal

import numpy as np
import onnx_ir as ir

from graphopt import bench
from graphopt.graphs import default_opset
from graphopt.capture import tensor_stats
from graphopt.data import feed_shapes
from graphopt.errors import GraphoptError
from graphopt.linear import as_linear
from graphopt.options import BaseOptions, option
from graphopt.passbase import GraphoptPass, GraphoptResult
from graphopt.passes.channel_deps import Group, Slot, analyze, label
from graphopt.passes.channel_importance import KINDS, group_scores, needed_values
from graphopt.sensitivity import allocate, row_loss
from graphopt.passes.channel_repair import channel_means, compare, repair as repair_layers
from graphopt.passes.channel_rewrite import (apply_bias_deltas, apply_fixups, apply_slots, drop_unused, forget_shapes,
                                             mean_deltas)
from graphopt.passes.channel_select import choose, global_wanted, legal_keep, removed_channels

__all__ = ["ChannelPrune", "legal_keep"]
TIE_NOISE = 1e-3  # scope=sensitivity: the worst channel's noise only breaks ties between groups (row_loss)


class ChannelPrune(GraphoptPass):
    """Structured pruning of Conv/ConvTranspose/Gemm/MatMul output channels with their dependency groups."""

    name = "channel_prune"
    summary = ("structured pruning: remove whole channels with every coupled tensor (BN, residual Add/Sum, "
               "Concat, depthwise, Flatten→Gemm); ridge repair of the next layers on calibration data")

    @dataclasses.dataclass(frozen=True)
    class Options(BaseOptions):
        ratio: float | dict[str, float] = option(
            0.3, "fraction of each group's channels removed: one value, or a mapping producer node name → "
                 "ratio ('*' for the rest)", low=0.0, high=1.0, high_open=True)
        scope: Literal["layer", "global", "sensitivity"] = option(
            "layer", "layer: every group loses `ratio`; global: `ratio` of all channels, the least important "
                     "by normalized score; sensitivity: each group pruned alone at `levels` is measured on "
                     "calibration data, then groups get per-group ratios (cheapest output damage per MAC first) "
                     "removing about `ratio` of the model's MACs", choices=("layer", "global", "sensitivity"))
        levels: list[float] = option([0.05, 0.1, 0.25, 0.5], "scope=sensitivity: group ratios measured (and the "
                                                        "largest one a group may get)")
        sensitivity_samples: int = option(16, "scope=sensitivity: calibration samples per measurement", low=1)
        time_budget: float = option(600.0, "scope=sensitivity: seconds for the measurements (groups not "
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
            if not self.levels or any(not 0 < v < 1 for v in self.levels):
                raise ValueError("levels must be ratios between 0 and 1 (exclusive)")

    # ------------------------------------------------------------------------------------------------
    def call(self, model: ir.Model) -> GraphoptResult:
        opts = self.options
        notes: list[str] = []
        calib = self.context.calib
        data = calib if calib is not None and not calib.synthetic else None
        if opts.importance in ("activation", "reconstruction"):
            data = self.context.require_calib(self.name)
        original = model.clone()
        shapes = bench.infer_shapes(model)
        analysis, groups = analyze(model, shapes)
        prunable = [g for g in groups if g.prunable and g.size > 1]
        if opts.skip_nodes:
            skip = set(opts.skip_nodes)
            prunable = [g for g in prunable if not skip & set(g.members())]
        self._explain(groups, notes)
        stats = None
        if opts.importance in ("activation", "reconstruction"):
            stats = tensor_stats(model, needed_values(prunable), data, self.context.threads, opts.max_samples)
        scored = {g.id: group_scores(g, opts.importance, stats) for g in prunable}
        input_shapes = feed_shapes(model, data)
        costs_before = _costs(model, input_shapes)
        means: dict[str, np.ndarray] = {}
        if opts.compensate and data is not None:  # every prunable consumer input: one data pass
            everything = _removals(prunable, {g.id: np.arange(g.size) for g in prunable})[0]
            means = channel_means(model, everything, data, self.context.threads, opts.max_samples)
        scores = {k: v[0] for k, v in scored.items()}
        self._unmet: list[str] = []  # groups whose unit sizes allow no kept width that is a multiple of round_to
        if opts.scope == "sensitivity":
            plan = self._sensitivity_plan(model, shapes, prunable, scores, means, costs_before, notes)
        else:
            plan = self._plan(prunable, scores, notes)
        if self._unmet:
            notes.append(f"round_to={opts.round_to} not met in {len(self._unmet)} group(s) (no set of their removal "
                         f"units leaves a multiple of it; the largest removal within the ratio was taken): "
                         + ", ".join(self._unmet[:6]) + (" ..." if len(self._unmet) > 6 else ""))
        if not any(len(r) for r in plan.values()):
            notes.append("no channel removed")
            return self.result(model, [], notes)

        slot_removed = self._rewrite(model, analysis, prunable, plan, means, notes)
        costs_after = _costs(model, input_shapes)

        refits: dict[str, tuple[float, float]] = {}
        repair = opts.repair if opts.repair is not None else data is not None
        if repair and data is None:
            notes.append("repair skipped: no calibration data")
        elif repair:
            unrepaired = model.clone()
            refits = repair_layers(model, original, slot_removed, data, opts, self.context, self.mark, notes)
            compare(original, unrepaired, model, data, self.context, opts.max_samples, notes)
        elif data is None:
            notes.append("repair off: no calibration data given (accuracy is not restored)")

        rows = []
        by_node: dict[str, list[str]] = defaultdict(list)
        for g in prunable:
            if not len(plan.get(g.id, [])):
                continue
            members = g.members()
            for m in members:
                by_node[m].append(str(g.id))
            errs = [refits[m] for m in members if m in refits]
            lost = removed_channels(g, plan[g.id])
            rows.append({
                "group": g.id, "producers": [label(p) for p in g.producers], "members": members,
                "channels_before": g.channels, "channels_after": g.channels - lost,
                "importance": scored[g.id][1],
                "macs_before": sum(costs_before.get(m, 0) for m in members),
                "macs_after": sum(costs_after.get(m, 0) for m in members),
                "refit_error_before": round(float(np.mean([e[0] for e in errs])), 5) if errs else None,
                "refit_error_after": round(float(np.mean([e[1] for e in errs])), 5) if errs else None,
            })
        total_b, total_a = sum(costs_before.values()), sum(costs_after.values())
        removed = sum(r["channels_before"] - r["channels_after"] for r in rows)  # channels, not units
        at = " at the first calibration feed's shapes" if input_shapes else ""
        notes.append(f"{len(rows)} group(s) pruned, {removed} channel(s) removed; MACs{at} {total_b:,} -> "
                     f"{total_a:,} ({1 - total_a / max(total_b, 1):.1%} fewer)")
        return self.result(model, rows, notes)

    # ------------------------------------------------------------------------------------------------
    def _explain(self, groups: list[Group], notes: list[str]) -> None:
        ok = [g for g in groups if g.prunable]
        notes.append(f"{len(groups)} dependency group(s), {len(ok)} prunable "
                     f"({sum(len(g.producers) > 1 for g in ok)} coupling several layers)")
        blocked = [g for g in groups if not g.prunable]
        for g in blocked[:8]:
            notes.append(f"group of {', '.join(label(p) for p in g.producers[:3])} left intact: {g.reasons[0]}")
        if len(blocked) > 8:
            notes.append(f"... {len(blocked) - 8} more group(s) left intact")

    def _ratio(self, group: Group) -> float | None:
        ratio = self.options.ratio
        if not isinstance(ratio, dict):
            return float(ratio)
        for name in [label(p) for p in group.producers]:
            if name in ratio:
                return ratio[name]
        return ratio.get("*")

    def _plan(self, groups: list[Group], scores: dict[int, np.ndarray], notes: list[str]) -> dict[int, np.ndarray]:
        opts = self.options
        plan: dict[int, np.ndarray] = {}
        if opts.scope == "layer":
            for g in groups:
                r = self._ratio(g)
                if r is not None:
                    plan[g.id] = self._drop(g, scores[g.id], r, final=True)
            return plan
        # global: one threshold over scores normalized by each group's mean (per channel)
        wanted, total = global_wanted(groups, scores, float(opts.ratio))
        if not wanted:
            return plan
        for g in groups:
            floor = int(math.ceil((1.0 - opts.max_ratio) * g.channels))
            plan[g.id] = self._pick(g, scores[g.id], max(g.channels - wanted[g.id], floor), True)
        done = sum(removed_channels(g, plan[g.id]) for g in groups)
        notes.append(f"global: {done} of {total} channels removed ({done / max(total, 1):.1%}; "
                     f"target {opts.ratio:g})")
        return plan

    def _rewrite(self, model: ir.Model, analysis, groups: list[Group], plan: dict[int, np.ndarray],
                 means: dict[str, np.ndarray], notes: list[str]) -> dict[Slot, np.ndarray]:
        """Remove the planned channels of ``groups`` (of ``analysis`` of this very model), with compensation."""
        slot_removed, value_removed = _removals(groups, plan)
        deltas = mean_deltas(slot_removed, means) if means else {}
        dropped = apply_slots(slot_removed, self.mark)
        apply_fixups(analysis.fixups, value_removed, _opset(model), self.mark)
        if deltas:
            out_removed = {s.node: r for s, r in slot_removed.items() if s.role == "producer" and s.index == 1}
            # apply_bias_deltas skips a MatMul whose output is a graph output (an Add would rename it);
            # linear.set_matrix inserts the Add and moves the output name onto it. Such a MatMul never loses
            # output channels (model outputs keep their shape), so its delta is whole.
            at_output = {n: deltas.pop(n) for n in list(deltas) if n.op_type == "MatMul"
                         and n.outputs[0].is_graph_output() and as_linear(n) is not None}
            changed = apply_bias_deltas(deltas, out_removed, self.mark)
            for node, delta in at_output.items():
                layer = as_linear(node)
                assert layer is not None
                layer.set_matrix(layer.matrix(), delta)
                self.mark(node)
                changed += 1
            where = f" ({len(at_output)} through a new Add before a graph output)" if at_output else ""
            notes.append(f"mean compensation: {changed} consumer layer(s) took the removed channels' mean "
                         f"contribution into their bias{where}")
        grouped = sorted({label(s.node) for s in slot_removed if s.groups > 1 and len(slot_removed[s])})
        if grouped and self.options.compensate and self.context.calib is not None:
            notes.append(f"mean compensation: not done for {len(grouped)} grouped conv consumer(s) (their "
                         f"removed input channels' mean is dropped): {', '.join(grouped[:6])}")
        forget_shapes(value_removed)
        drop_unused(model.graph, dropped)
        return slot_removed

    def _sensitivity_plan(self, model: ir.Model, shapes, groups: list[Group], scores: dict[int, np.ndarray],
                          means: dict[str, np.ndarray], costs: dict[str, int],
                          notes: list[str]) -> dict[int, np.ndarray]:
        """Per-group ratios from each group's measured damage alone (sensitivity.measure) at ``levels``,
        allocated greedily by loss per MAC removed until about ``ratio`` of the model's MACs go."""
        from graphopt.sensitivity import Candidate, measure

        opts = self.options
        self.context.require_calib(self.name)
        levels = sorted(set(opts.levels))
        keys = {g.id: tuple(label(p) for p in g.producers) for g in groups}
        drops = {(g.id, r): self._drop(g, scores[g.id], r) for g in groups for r in levels}
        candidates = [Candidate(key=f"{keys[g.id][0]}@{r:g}", layer=keys[g.id][0], setting=r,
                                apply=self._pruner(shapes, keys[g.id], drops[g.id, r], means))
                      for g in groups for r in levels]
        measured = measure(self.context, model, candidates, max_samples=opts.sensitivity_samples,
                           time_budget_s=opts.time_budget)
        notes.extend(f"sensitivity: {n}" for n in getattr(measured, "notes", []))
        by_key = {row.key: row for row in measured}
        # A level's real step is the fraction of channels it removes (floor, min_channels, round_to).
        steps = [[removed_channels(g, drops[g.id, r]) / g.channels for r in levels] for g in groups]
        losses = [[row_loss(by_key.get(f"{keys[g.id][0]}@{r:g}"), TIE_NOISE) for r in levels] for g in groups]
        sizes = [sum(costs.get(m, 0) for m in g.members()) or g.channels for g in groups]
        # ratio is a share of the whole model's MACs (a group's MACs: its members'; shared members count twice)
        total = sum(costs.values()) or sum(sizes)
        chosen = allocate(sizes, steps, losses, min(float(opts.ratio) * total / max(sum(sizes), 1), 1.0))
        plan = {g.id: self._drop(g, scores[g.id], min(r, opts.max_ratio), final=True) for g, r in zip(groups, chosen)}
        cut = sorted(((r, keys[g.id][0]) for g, r in zip(groups, chosen) if r > 0), reverse=True)
        notes.append(f"sensitivity: {len(candidates)} measurement(s) ({len(groups)} groups x {len(levels)} "
                     f"levels); per-group ratios " + ", ".join(f"{n} {r:.2f}" for r, n in cut[:8])
                     + (f" (+{len(cut) - 8} more)" if len(cut) > 8 else ""))
        return plan

    def _drop(self, group: Group, scores: np.ndarray, ratio: float, final: bool = False) -> np.ndarray:
        """The units of ``group`` that a ``ratio`` of its channels removes (after min_channels/round_to)."""
        n = group.channels
        return self._pick(group, scores, n - int(math.floor(ratio * n + 1e-9)), final)

    def _pick(self, group: Group, scores: np.ndarray, keep: int, final: bool) -> np.ndarray:
        """Units to remove so that about ``keep`` channels stay (made legal); ``final``: note a missed round_to."""
        choice = choose(group, scores, keep, self.options.min_channels, self.options.round_to)
        if final and not choice.round_met:
            self._unmet.append(label(group.producers[0]))
        return choice.removed

    def _pruner(self, shapes, producers: tuple[str, ...], removed: np.ndarray, means: dict[str, np.ndarray]):
        """A sensitivity candidate: on a clone, find the group by its producers' names and remove ``removed``."""
        def apply(clone: ir.Model) -> None:
            analysis, groups = analyze(clone, shapes)
            match = [g for g in groups if tuple(label(p) for p in g.producers) == producers]
            if len(match) != 1 or not match[0].prunable:
                raise GraphoptError(f"group of {producers[0]!r} not found again on the clone")
            if len(removed):
                self._rewrite(clone, analysis, match, {match[0].id: removed}, means, [])
        return apply


def _removals(groups: list[Group], plan: dict[int, np.ndarray]):
    """Removed indices per slot and per value, in their own (original) channel indexing."""
    slot_removed: dict[Slot, set] = defaultdict(set)
    value_removed: dict[ir.Value, set] = defaultdict(set)
    for g in groups:
        removed = plan.get(g.id)
        if removed is None or not len(removed):
            continue
        for link in g.links:
            part = removed[(removed >= link.start) & (removed < link.start + link.length)]
            slot_removed[link.slot].update((part - link.start + link.offset).tolist())
        for value, link in g.values:
            part = removed[(removed >= link.start) & (removed < link.start + link.length)]
            value_removed[value].update((part - link.start + link.offset).tolist())
    as_array = lambda s: np.array(sorted(s), dtype=np.int64)  # noqa: E731
    return ({k: as_array(v) for k, v in slot_removed.items()}, {k: as_array(v) for k, v in value_removed.items()})


def _costs(model: ir.Model, input_shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, int]:
    try:
        return {c.node: c.macs for c in bench.layer_costs(model, input_shapes)}
    except Exception:  # noqa: BLE001 - MACs are informative only
        return {}


def _opset(model: ir.Model) -> int:
    return int(default_opset(model, 13))
