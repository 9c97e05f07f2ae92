"""Which removal units of a dependency group go: widths counted in channels, units chosen by score per channel.

A group's units are single channels, or (grouped convs / channel shuffle, ``Group.unit_sizes``) fixed channel
sets of different sizes. Ratios, ``min_channels`` and ``round_to`` speak of channels, so the kept width is
decided in channels first (:func:`legal_keep`) and then the cheapest set of units removing exactly that many
channels is found (0/1 knapsack on the units' scores: the score per channel times its size). When no unit
set reaches a kept width that is a multiple of ``round_to``, the largest removal within the budget is taken and
the caller is told (``Choice.round_met``). A tensor that carries only part of the group (a Concat input, the
weight of the layer producing it) always keeps one unit: emptied, it would leave a layer with no outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from graphopt.passes.channels.types import Group

MAX_TABLE = 20_000_000  # knapsack cells (units x channels); beyond it units are taken greedily by score


def legal_keep(n: int, keep: int, min_channels: int, round_to: int) -> int:
    """Kept width: at least ``min_channels`` (or n), rounded up to a multiple of ``round_to``, at most n."""
    keep = max(keep, min(n, min_channels), 1)
    if round_to > 1:
        keep = math.ceil(keep / round_to) * round_to
    return min(n, keep)


@dataclass
class Choice:
    removed: np.ndarray  # unit indices, sorted
    channels: int  # channels they hold
    round_met: bool  # the kept channel count is a multiple of round_to (or all channels are kept)
    spared: int = 0  # units kept because each was the last one of a tensor carrying part of the group


def sizes_of(group: Group) -> np.ndarray:
    return np.ones(group.size, dtype=np.int64) if group.unit_sizes is None else np.asarray(group.unit_sizes, np.int64)


def removed_channels(group: Group, removed: np.ndarray) -> int:
    return int(sizes_of(group)[np.asarray(removed, dtype=np.int64)].sum()) if len(removed) else 0


def partial_tensors(group: Group) -> list[np.ndarray]:
    """The units of each slot or value that carries only part of ``group``."""
    masks: dict[int, np.ndarray] = {}
    for key, link in [(id(k.slot), k) for k in group.links] + [(id(v), k) for v, k in group.values]:
        masks.setdefault(key, np.zeros(group.size, bool))[link.start:link.start + link.length] = True
    return [np.flatnonzero(m) for m in masks.values() if not m.all()]


def choose(group: Group, scores: np.ndarray, keep: int, min_channels: int, round_to: int) -> Choice:
    """Units of ``group`` to remove so that about ``keep`` channels stay (never fewer once made legal), none
    the last of a partial tensor. ``scores``: one per unit, per channel (higher = keep)."""
    sizes = sizes_of(group)
    total = int(sizes.sum())
    budget = total - legal_keep(total, keep, min_channels, round_to)
    partial = partial_tensors(group) if budget > 0 else []
    free = np.ones(len(sizes), bool)
    while True:  # each round keeps the best unit of every tensor the last choice emptied: at most len(partial)
        choice = _choose(group, sizes, scores, budget, round_to, np.flatnonzero(free))
        emptied = [units for units in partial if np.isin(units, choice.removed).all()]
        if not emptied:
            choice.spared = int((~free).sum())
            return choice
        for units in emptied:
            free[units[np.argmax(scores[units])]] = False


def _choose(group: Group, sizes: np.ndarray, scores: np.ndarray, budget: int, round_to: int,
            free: np.ndarray) -> Choice:
    """The cheapest units among ``free`` removing at most ``budget`` channels."""
    total = int(sizes.sum())
    order = free[np.argsort(scores[free], kind="stable")]
    if group.unit_sizes is None:  # single channels: the lowest-scored ones
        return _choice_of(np.sort(order[:budget]), sizes, total, round_to)
    if budget <= 0:
        return Choice(np.zeros(0, np.int64), 0, True)
    if len(free) * (budget + 1) > MAX_TABLE:
        return _greedy(order, sizes, budget, total, round_to)
    best, take = _knapsack(sizes[free], np.maximum(scores[free], 0.0) * sizes[free], budget)
    reach = np.flatnonzero(np.isfinite(best))
    ok = reach[((total - reach) % round_to == 0) | (reach == 0)] if round_to > 1 else reach
    target = int(ok.max()) if ok.size and ok.max() > 0 else int(reach.max())
    return _choice_of(free[_backtrack(take, sizes[free], target)], sizes, total, round_to)


def _choice_of(removed: np.ndarray | list[int], sizes: np.ndarray, total: int, round_to: int) -> Choice:
    removed = np.asarray(removed, dtype=np.int64)
    done = int(sizes[removed].sum())
    return Choice(removed, done, round_to <= 1 or done == 0 or (total - done) % round_to == 0)


def _knapsack(sizes: np.ndarray, costs: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """best[r]: least cost removing exactly r channels; take[i, r]: unit i is in that set (items 0..i)."""
    best = np.full(budget + 1, np.inf)
    best[0] = 0.0
    take = np.zeros((len(sizes), budget + 1), dtype=bool)
    for i, (s, c) in enumerate(zip(sizes.tolist(), costs.tolist())):
        if s > budget:
            continue
        cand = np.full(budget + 1, np.inf)
        cand[s:] = best[:budget + 1 - s] + c
        better = cand < best
        take[i] = better
        best = np.where(better, cand, best)
    return best, take


def _backtrack(take: np.ndarray, sizes: np.ndarray, r: int) -> np.ndarray:
    chosen = []
    for i in range(len(sizes) - 1, -1, -1):
        if r > 0 and take[i, r]:
            chosen.append(i)
            r -= int(sizes[i])
    return np.array(sorted(chosen), dtype=np.int64)


def _greedy(order: np.ndarray, sizes: np.ndarray, budget: int, total: int, round_to: int) -> Choice:
    chosen, done = [], 0
    for u in order.tolist():
        if done + sizes[u] <= budget:
            chosen.append(u)
            done += int(sizes[u])
    return _choice_of(sorted(chosen), sizes, total, round_to)


def global_wanted(groups: list[Group], scores: dict[int, np.ndarray], ratio: float) -> tuple[dict[int, int], int]:
    """scope=global: channels each group would lose under one threshold over scores normalized by each
    group's channel-weighted mean score (a unit of k channels counts k times); also the channels in all."""
    pool = []
    for g in groups:
        sizes = sizes_of(g)
        s = scores[g.id]
        mean = float(np.average(s, weights=sizes)) if s.size else 0.0
        pool.append((g, s / (mean or 1.0), sizes))
    flat = np.concatenate([np.repeat(n, k) for _, n, k in pool]) if pool else np.zeros(0)
    target = int(math.floor(ratio * flat.size))
    if target == 0:
        return {}, flat.size
    threshold = np.sort(flat)[target - 1]
    return {g.id: int(sizes[norm <= threshold].sum()) for g, norm, sizes in pool}, flat.size
