"""How many channels each dependency group loses, and which units: the plan the pass then rewrites.

Three scopes: ``layer`` (a ratio per group, or per producer name), ``global`` (one threshold over scores
normalized by each group's mean) and ``sensitivity`` (each group pruned alone at a few levels is measured on
calibration data; :func:`graphopt.sensitivity.allocate` spends a MAC budget on the cheapest losses). ``ratio=auto``
measures the same way and lets :func:`graphopt.sensitivity.seek_budget` keep the most MACs the run's accuracy
budget allows, checked on whole models. Widths are
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
from graphopt.passes.channels.types import Group, Slot, label
from graphopt.sensitivity import Candidate, Ladder, allocate, coverage_order, measure, row_loss, seek_budget

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


@dataclass
class Measured:
    """Each group pruned alone at each level (scope=sensitivity, ratio=auto): what the plans allocate from."""

    levels: list[float]
    keys: dict[int, tuple[str, ...]]  # group id -> its producers' names (a group is found again by them)
    drops: dict[tuple[int, float], np.ndarray]  # (group id, level) -> the units that level removes
    steps: list[list[float]]  # per group, per level: the fraction of its channels really removed
    losses: list[list[float]]  # per group, per level: row_loss of the measurement (inf: not measured)
    sizes: list[int]  # per group: its members' MACs (else its channels)
    model_macs: int  # the whole model's MACs (else the sum of sizes): what ratio and max_macs are shares of


def measure_groups(context: PassContext, model: ir.Model, shapes: dict[str, tuple], groups: list[Group],
                   scores: dict[int, np.ndarray], means: dict[str, np.ndarray], costs: dict[str, int], opts: Any,
                   mark: Callable[[ir.Node], object], target: float, notes: list[str]) -> Measured:
    """Every group pruned alone at ``levels`` (sensitivity.measure; levels nearest ``target`` first), on real
    calibration data (the caller checked)."""
    levels = sorted(set(opts.levels))
    keys = {g.id: tuple(label(p) for p in g.producers) for g in groups}
    drops = {(g.id, r): drop(g, scores[g.id], r, opts).removed for g in groups for r in levels}
    candidates = [Candidate(key=f"{keys[g.id][0]}@{r:g}", layer=keys[g.id][0], setting=r,
                            apply=pruner(shapes, keys[g.id], drops[g.id, r], means, mark))
                  for r in coverage_order(levels, target) for g in groups]
    measured = measure(context, model, candidates, max_samples=opts.sensitivity_samples,
                       time_budget_s=opts.time_budget)
    notes.extend(f"sensitivity: {n}" for n in getattr(measured, "notes", []))
    notes.append(f"sensitivity: {len(candidates)} measurement(s) ({len(groups)} groups x {len(levels)} levels)")
    by_key = {row.key: row for row in measured}
    # A level's real step is the fraction of channels it removes (floor, min_channels, round_to).
    steps = [[removed_channels(g, drops[g.id, r]) / g.channels for r in levels] for g in groups]
    losses = [[row_loss(by_key.get(f"{keys[g.id][0]}@{r:g}"), TIE_NOISE) for r in levels] for g in groups]
    sizes = [sum(costs.get(m, 0) for m in g.members()) or g.channels for g in groups]
    return Measured(levels, keys, drops, steps, losses, sizes, sum(costs.values()) or sum(sizes))


def sensitivity_plan(context: PassContext, model: ir.Model, shapes: dict[str, tuple], groups: list[Group],
                     scores: dict[int, np.ndarray], means: dict[str, np.ndarray], costs: dict[str, int], opts: Any,
                     mark: Callable[[ir.Node], object], notes: list[str]) -> Plan:
    """Per-group ratios from each group's measured damage alone at ``levels``, allocated greedily by loss per
    MAC removed until about ``ratio`` of the model's MACs go."""
    m = measure_groups(context, model, shapes, groups, scores, means, costs, opts, mark, opts.ratio, notes)
    # ratio is a share of the whole model's MACs (a group's MACs: its members'; shared members count twice)
    share = min(float(opts.ratio) * m.model_macs / max(sum(m.sizes), 1), 1.0)
    chosen = allocate(m.sizes, m.steps, m.losses, share)
    plan = Plan()
    for g, r in zip(groups, chosen):
        plan.take(g, drop(g, scores[g.id], min(r, opts.max_ratio), opts))
    notes.append("sensitivity: " + _ratios_text({m.keys[g.id][0]: r for g, r in zip(groups, chosen) if r > 0}, ".2f"))
    return plan


Repair = Callable[[ir.Model, dict], None]  # refits a pruned clone's consumers, given its removed units per slot


def budget_plan(context: PassContext, model: ir.Model, shapes: dict[str, tuple], groups: list[Group],
                scores: dict[int, np.ndarray], means: dict[str, np.ndarray], costs: dict[str, int], opts: Any,
                mark: Callable[[ir.Node], object], repair: Repair | None, notes: list[str]) -> Plan:
    """ratio=auto: each group's ratio from ``levels``, the most MACs the run's budget allows
    (sensitivity.seek_budget: whole-model checks along the gentle-to-aggressive path). A check judges the model
    the pass would emit: every chosen group removed, then ``repair`` (on PP-OCRv4 det unrepaired checks stopped at
    4.9% of its MACs; repaired, the path to 20% held in one check)."""
    m = measure_groups(context, model, shapes, groups, scores, means, costs, opts, mark, min(opts.levels), notes)
    by_name = {m.keys[g.id][0]: g for g in groups}
    ladders = [Ladder(m.keys[g.id][0], tuple(m.levels), tuple(size * s for s in steps), tuple(losses))
               for g, size, steps, losses in zip(groups, m.sizes, m.steps, m.losses)]

    def edit_all(picked: dict[str, float]) -> Callable[[ir.Model], None]:
        units = {m.keys[by_name[n].id]: m.drops[by_name[n].id, r] for n, r in picked.items()}

        def apply(clone: ir.Model) -> None:
            removed = remove_on_clone(clone, shapes, units, means, mark)
            if repair is not None:
                repair(clone, removed)
        return apply

    picked, more = seek_budget(context, model, ladders, None, max_samples=opts.max_samples, edit_all=edit_all,
                               max_gain=opts.max_macs * m.model_macs)
    notes.extend(more)
    plan = Plan()
    for name, r in picked.items():
        g = by_name[name]
        plan.take(g, drop(g, scores[g.id], r, opts))
    notes.append("budget: " + _ratios_text(picked, "g"))
    return plan


def _ratios_text(ratios: dict[str, float], spec: str) -> str:
    """A note's list of per-group ratios, largest first (the first eight)."""
    cut = sorted(((r, n) for n, r in ratios.items()), reverse=True)
    return ("per-group ratios " + (", ".join(f"{n} {r:{spec}}" for r, n in cut[:8]) or "none")
            + (f" (+{len(cut) - 8} more)" if len(cut) > 8 else ""))


def pruner(shapes: dict[str, tuple], producers: tuple[str, ...], removed: np.ndarray, means: dict[str, np.ndarray],
           mark: Callable[[ir.Node], object]) -> Callable[[ir.Model], None]:
    """A sensitivity candidate: on a clone, find the group by its producers' names and remove ``removed``."""
    return lambda clone: remove_on_clone(clone, shapes, {producers: removed}, means, mark)


def remove_on_clone(clone: ir.Model, shapes: dict[str, tuple], units: dict[tuple[str, ...], np.ndarray],
                    means: dict[str, np.ndarray], mark: Callable[[ir.Node], object]) -> dict[Slot, np.ndarray]:
    """Remove, on a clone of the analysed model, each group's ``units`` (groups found again by their producers'
    names); the removed indices per slot."""
    analysis, found = analyze(clone, shapes)
    by_key = {tuple(label(p) for p in g.producers): g for g in found if g.prunable}
    missing = [k for k in units if k not in by_key]
    if missing:
        raise GraphoptError(f"group of {missing[0][0]!r} not found again on the clone")
    groups = [by_key[k] for k, u in units.items() if len(u)]
    if not groups:
        return {}
    return remove_channels(clone, analysis.fixups, groups, {by_key[k].id: u for k, u in units.items() if len(u)},
                           means, mark, [])
