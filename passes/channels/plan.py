"""How many channels each dependency group loses, and which units: the plan the pass then rewrites.

Three scopes: ``layer`` (a ratio per group, or per producer name), ``global`` (one threshold over scores
normalized by each group's mean) and ``sensitivity`` (each group pruned alone at a few levels is measured on
calibration data; :func:`graphopt.sensitivity.allocate` spends a MAC budget on the cheapest losses). Widths are
made legal by :mod:`select`; groups whose units allow no width that is a multiple of ``round_to`` are
collected in :attr:`Plan.unmet`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx_ir as ir

from graphopt.errors import GraphoptError
from graphopt.passbase import PassContext
from graphopt.passes.channels.deps import analyze
from graphopt.passes.channels.rewrite import remove_channels
from graphopt.passes.channels.select import Choice, choose, global_wanted, removed_channels
from graphopt.passes.channels.types import Group, label
from graphopt.sensitivity import Candidate, allocate, coverage_order, measure, row_loss

TIE_NOISE = 1e-3  # scope=sensitivity: the worst channel's noise only breaks ties between groups (row_loss)


@dataclass
class Plan:
    removed: dict[int, np.ndarray] = field(default_factory=dict)  # group id -> removed unit indices
    unmet: list[str] = field(default_factory=list)  # groups (first producer) whose kept width misses round_to
    spared: list[str] = field(default_factory=list)  # groups that kept the last unit of a partial tensor

    def take(self, group: Group, choice: Choice) -> None:
        self.removed[group.id] = choice.removed
        if not choice.round_met:
            self.unmet.append(label(group.producers[0]))
        if choice.spared:
            self.spared.append(label(group.producers[0]))

    @property
    def empty(self) -> bool:
        return not any(len(r) for r in self.removed.values())


def ratio_of(group: Group, ratio: float | dict[str, float]) -> float | None:
    """The group's ratio: one value, or the first of its producers named in the mapping ('*' for the rest)."""
    if not isinstance(ratio, dict):
        return float(ratio)
    for name in [label(p) for p in group.producers]:
        if name in ratio:
            return ratio[name]
    return ratio.get("*")


def drop(group: Group, scores: np.ndarray, ratio: float, opts: Any) -> Choice:
    """The units of ``group`` that a ``ratio`` of its channels removes (after min_channels/round_to)."""
    n = group.channels
    return choose(group, scores, n - int(math.floor(ratio * n + 1e-9)), opts.min_channels, opts.round_to)


def layer_plan(groups: list[Group], scores: dict[int, np.ndarray], opts: Any) -> Plan:
    """scope=layer: every group loses its ratio."""
    plan = Plan()
    for g in groups:
        r = ratio_of(g, opts.ratio)
        if r is not None:
            plan.take(g, drop(g, scores[g.id], r, opts))
    return plan


def global_plan(groups: list[Group], scores: dict[int, np.ndarray], opts: Any, notes: list[str]) -> Plan:
    """scope=global: one threshold over scores normalized by each group's mean (per channel)."""
    plan = Plan()
    wanted, total = global_wanted(groups, scores, float(opts.ratio))
    if not wanted:
        return plan
    for g in groups:
        floor = int(math.ceil((1.0 - opts.max_ratio) * g.channels))
        keep = max(g.channels - wanted[g.id], floor)
        plan.take(g, choose(g, scores[g.id], keep, opts.min_channels, opts.round_to))
    done = sum(removed_channels(g, plan.removed[g.id]) for g in groups)
    notes.append(f"global: {done} of {total} channels removed ({done / max(total, 1):.1%}; "
                 f"target {opts.ratio:g})")
    return plan


def sensitivity_plan(context: PassContext, model: ir.Model, shapes: dict[str, tuple], groups: list[Group],
                     scores: dict[int, np.ndarray], means: dict[str, np.ndarray], costs: dict[str, int], opts: Any,
                     mark: Callable[[ir.Node], object], notes: list[str]) -> Plan:
    """Per-group ratios from each group's measured damage alone (sensitivity.measure) at ``levels``,
    allocated greedily by loss per MAC removed until about ``ratio`` of the model's MACs go (``context``
    holds real calibration data: the caller checked)."""
    levels = sorted(set(opts.levels))
    keys = {g.id: tuple(label(p) for p in g.producers) for g in groups}
    drops = {(g.id, r): drop(g, scores[g.id], r, opts).removed for g in groups for r in levels}
    candidates = [Candidate(key=f"{keys[g.id][0]}@{r:g}", layer=keys[g.id][0], setting=r,
                            apply=pruner(shapes, keys[g.id], drops[g.id, r], means, mark))
                  for r in coverage_order(levels, opts.ratio) for g in groups]
    measured = measure(context, model, candidates, max_samples=opts.sensitivity_samples,
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
    plan = Plan()
    for g, r in zip(groups, chosen):
        plan.take(g, drop(g, scores[g.id], min(r, opts.max_ratio), opts))
    cut = sorted(((r, keys[g.id][0]) for g, r in zip(groups, chosen) if r > 0), reverse=True)
    notes.append(f"sensitivity: {len(candidates)} measurement(s) ({len(groups)} groups x {len(levels)} "
                 f"levels); per-group ratios " + ", ".join(f"{n} {r:.2f}" for r, n in cut[:8])
                 + (f" (+{len(cut) - 8} more)" if len(cut) > 8 else ""))
    return plan


def pruner(shapes: dict[str, tuple], producers: tuple[str, ...], removed: np.ndarray, means: dict[str, np.ndarray],
           mark: Callable[[ir.Node], object]) -> Callable[[ir.Model], None]:
    """A sensitivity candidate: on a clone, find the group by its producers' names and remove ``removed``."""
    def apply(clone: ir.Model) -> None:
        analysis, groups = analyze(clone, shapes)
        match = [g for g in groups if tuple(label(p) for p in g.producers) == producers]
        if len(match) != 1 or not match[0].prunable:
            raise GraphoptError(f"group of {producers[0]!r} not found again on the clone")
        if len(removed):
            remove_channels(clone, analysis.fixups, match, {match[0].id: removed}, means, mark, [])
    return apply
