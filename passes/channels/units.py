"""Removal units under grouped-conv and channel-shuffle constraints (the last step of the channel analysis).

Union-find groups prune "the same channel indices" of every member. Two constraints need more:
- a grouped Conv (1 < group < C) keeps a rectangular weight and its ``group`` only if each of its input and
  output channel blocks loses the same number of channels (a *colouring*: equal counts per colour);
- a channel shuffle keeps its [a, b] grid (and the order the analysis assumed) only if channel j of every
  one of the a blocks is removed together (a *tie*).
Groups linked by such constraints form a component. Channels of blocked groups are fixed (never removed);
the others are tied into classes, each class gets a deviation vector (per colouring: count·colours − total,
zero when balanced), and classes are packed into *units* whose deviations sum to zero (a deficit-filling
greedy from every start type, then a small exhaustive search). The component becomes one :class:`Group`
whose "channels" are these units; its links map unit u to every slot position of every channel in u.
Nothing balanced → the groups stay intact, with why.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Callable

import numpy as np

from graphopt.passes.channels.types import Element, Group, Link

MAX_UNIT_CLASSES = 4096  # recipe search bound (tie classes per unit)
MAX_STARTS = 48
SEARCH_BUDGET = 20000


class _UF:
    def __init__(self) -> None:
        self.parent: dict = {}

    def find(self, x):
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a, b) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def build_groups(base: dict[int, Group], find: Callable[[int], int], colorings: list[tuple[str, list[list[Element]]]],
                 ties: list[list[Element]]) -> list[Group]:
    """Final groups: unconstrained union-find groups as they are, constrained components solved into units."""
    def resolve(elems: list[Element]) -> list[Element]:
        return [(find(a), i) for a, i in elems]

    colorings = [(name, [resolve(c) for c in colors]) for name, colors in colorings]
    ties = [resolve(t) for t in ties]
    comp = _UF()
    for root in base:
        comp.find(root)
    for elems in [e for _, colors in colorings for e in colors] + ties:
        for r, _ in elems:
            comp.union(elems[0][0], r)
    for _, colors in colorings:  # one colouring couples all its colours
        firsts = [c[0][0] for c in colors if c]
        for r in firsts:
            comp.union(firsts[0], r)
    by_comp_colorings: dict[int, list[list[list[Element]]]] = defaultdict(list)
    by_comp_ties: dict[int, list[list[Element]]] = defaultdict(list)
    by_comp_names: dict[int, list[str]] = defaultdict(list)
    for name, colors in colorings:
        first = next((c[0][0] for c in colors if c), None)
        if first is not None:
            by_comp_colorings[comp.find(first)].append(colors)
            by_comp_names[comp.find(first)].append(name)
    for tie in ties:
        if tie:
            by_comp_ties[comp.find(tie[0][0])].append(tie)
    members: dict[int, list[int]] = defaultdict(list)
    for root in base:
        members[comp.find(root)].append(root)
    out: list[Group] = []
    for key, roots in members.items():
        if key not in by_comp_colorings and key not in by_comp_ties:
            out += [base[r] for r in roots]
            continue
        names = list(dict.fromkeys(by_comp_names[key])) or ["channel shuffle"]
        out += _solve([base[r] for r in roots], by_comp_colorings[key], by_comp_ties[key], names)
    return out


def _solve(groups: list[Group], colorings: list[list[list[Element]]], ties: list[list[Element]],
           names: list[str]) -> list[Group]:
    free = {g.id: g for g in groups if g.prunable}
    uf = _UF()
    for g in free.values():
        for i in range(g.size):
            uf.find((g.id, i))
    fixed: set[Element] = set()
    for tie in ties:
        if any(r not in free for r, _ in tie):
            fixed.update(tie)
            continue
        for e in tie[1:]:
            uf.union(tie[0], e)
    classes: dict[Element, list[Element]] = defaultdict(list)
    for g in free.values():
        for i in range(g.size):
            classes[uf.find((g.id, i))].append((g.id, i))
    for e in list(fixed):
        if e[0] in free:
            fixed.update(classes.get(uf.find(e), []))
    cls = [c for c in classes.values() if not any(e in fixed for e in c)]
    index = {e: k for k, c in enumerate(cls) for e in c}
    devs = np.zeros((len(cls), sum(len(c) for c in colorings)), dtype=np.int64)
    col = 0
    for colors in colorings:
        for j, color in enumerate(colors):
            for e in color:
                if e in index:
                    devs[index[e], col + j] += len(colors)
        devs[:, col:col + len(colors)] -= devs[:, col:col + len(colors)].sum(axis=1, keepdims=True) // len(colors)
        col += len(colors)
    units = _pack(devs)
    why = (f"grouped Conv / channel shuffle constraints ({', '.join(names[:3])}{', …' if len(names) > 3 else ''}) "
           "leave no channel set that keeps equal counts per conv group")
    if not units:
        for g in free.values():
            g.reasons.append(why)
        return groups
    unit_elems = [sorted(e for k in unit for e in cls[k]) for unit in units]
    used = {e[0] for unit in unit_elems for e in unit}
    for root, g in free.items():
        if root not in used:  # all its channels are tied to fixed ones
            g.reasons.append(why)
    return [g for g in groups if not g.prunable] + [_unit_group([free[r] for r in sorted(used)], unit_elems)]


def _pack(devs: np.ndarray) -> list[list[int]]:
    """Disjoint sets of rows whose deviation vectors sum to zero, in a run-friendly order."""
    types: dict[tuple, list[int]] = defaultdict(list)
    for k, row in enumerate(devs):
        types[tuple(row.tolist())].append(k)
    units: list[list[int]] = [[k] for key, rows in types.items() if not any(key) for k in rows]
    keys = [key for key in types if any(key)]
    vec = {key: np.array(key, dtype=np.int64) for key in keys}
    avail = {key: len(types[key]) for key in keys}
    used = {key: 0 for key in keys}
    while True:
        recipe = _recipe(keys, vec, avail)
        if not recipe:
            break
        copies = min(avail[k] // n for k, n in recipe.items())
        for _ in range(copies):
            unit = []
            for k, n in recipe.items():
                unit += types[k][used[k]:used[k] + n]
                used[k] += n
                avail[k] -= n
            units.append(unit)
    return units


def _recipe(keys: list[tuple], vec: dict, avail: dict) -> dict[tuple, int] | None:
    """The smallest multiset of available types whose deviations cancel that a deficit-filling greedy finds
    from each start type (keep adding, to the most under-filled colour, the type that leaves the smallest
    deviation), else a small exhaustive search."""
    live = sorted((k for k in keys if avail[k] > 0), key=lambda k: -avail[k])
    best: dict[tuple, int] | None = None
    for start in live[:MAX_STARTS]:
        recipe = _fill(start, live, vec, avail, best)
        if recipe is not None and (best is None or sum(recipe.values()) < sum(best.values())):
            best = recipe
    if best is not None:
        return best
    steps = 0
    for size in range(2, 5):
        for combo in itertools.combinations_with_replacement(range(len(live)), size):
            steps += 1
            if steps > SEARCH_BUDGET:
                return None
            counts: dict[tuple, int] = defaultdict(int)
            for i in combo:
                counts[live[i]] += 1
            if all(avail[k] >= n for k, n in counts.items()) and not any(sum(vec[k] * n for k, n in counts.items())):
                return dict(counts)
    return None


def _fill(start: tuple, live: list[tuple], vec: dict, avail: dict, best: dict | None) -> dict[tuple, int] | None:
    limit = MAX_UNIT_CLASSES if best is None else sum(best.values())
    recipe, total = {start: 1}, vec[start].copy()
    while any(total):
        if sum(recipe.values()) >= limit:
            return None
        j = int(np.argmin(total))
        cands = [k for k in live if vec[k][j] > 0 and recipe.get(k, 0) < avail[k]]
        if not cands:
            return None
        pick = min(cands, key=lambda k: int((total + vec[k]) @ (total + vec[k])))
        recipe[pick] = recipe.get(pick, 0) + 1
        total += vec[pick]
    return recipe


def _unit_group(groups: list[Group], units: list[list[Element]]) -> Group:
    """One group whose channel u is unit u: links/values map it to every position of its channels."""
    where: dict[Element, int] = {e: u for u, unit in enumerate(units) for e in unit}
    slot_entries: dict[int, tuple[object, list[tuple[int, int]]]] = {}
    value_entries: dict[int, tuple[object, list[tuple[int, int]]]] = {}
    for g in groups:
        for kind, items in (("slot", [(k.slot, k) for k in g.links]), ("value", g.values)):
            table = slot_entries if kind == "slot" else value_entries
            for target, link in items:
                entry = table.setdefault(id(target), (target, []))
                for i in range(link.length):
                    u = where.get((g.id, link.start + i))
                    if u is not None:
                        entry[1].append((u, link.offset + i))
    links = [Link(t, off, u, n) for t, pairs in slot_entries.values() for u, off, n in _runs(pairs)]
    values = [(t, Link(None, off, u, n)) for t, pairs in value_entries.values()  # type: ignore[arg-type]
              for u, off, n in _runs(pairs)]
    followers = list(dict.fromkeys(n for g in groups for n in g.followers))
    return Group(min(g.id for g in groups), len(units), [p for g in groups for p in g.producers], links, values,
                 [], [len(u) for u in units], followers)


def _runs(pairs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(unit, position) pairs -> (first unit, first position, length) runs along diagonals."""
    by_diag: dict[int, list[int]] = defaultdict(list)
    for u, pos in set(pairs):
        by_diag[pos - u].append(u)
    out = []
    for diag, us in by_diag.items():
        us.sort()
        start = prev = us[0]
        for u in us[1:] + [None]:
            if u is not None and u == prev + 1:
                prev = u
                continue
            out.append((start, start + diag, prev - start + 1))
            if u is not None:
                start = prev = u
    return sorted(out, key=lambda r: (r[1], r[0]))
