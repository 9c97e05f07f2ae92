"""How much rank each layer keeps: per layer (:func:`choose`) or under one global MACs budget (:func:`allocate`)."""

from __future__ import annotations

import dataclasses

import numpy as np

from graphopt.passes.lowrank.geometry import Geometry
from graphopt.passes.lowrank.schemes import Curve, Factorizer


@dataclasses.dataclass(frozen=True)
class Choice:
    """One candidate of one layer: scheme and ranks, with the MACs, params and error proxy they cost."""

    scheme: str
    ranks: tuple[int, ...]
    macs: int
    params: int
    err2: float


def choices(curve: Curve, idx: np.ndarray) -> list[Choice]:
    return [Choice(curve.scheme, tuple(int(r) for r in curve.ranks[i]), int(curve.macs[i]), int(curve.params[i]),
                   float(curve.err2[i])) for i in idx]


def allocate(layers: list[list[Choice]], base_macs: list[int], keep: float) -> list[Choice | None]:
    """One global budget: keep Σ MACs ≤ keep·Σ base_macs with the least summed error proxy (greedy on hulls).

    Each layer's candidates with the original (MACs base, error 0) form a lower convex hull in (MACs saved,
    error); hull segments of all layers are taken cheapest error-per-MAC-saved first. The last segment is cut
    short: that layer takes its least-error candidate that still meets the budget."""
    need = (1.0 - keep) * sum(base_macs)
    segments = []
    hulls: list[list[tuple[int, float, Choice | None]]] = []
    for l, (options, base) in enumerate(zip(layers, base_macs)):
        points = sorted([(0, 0.0, None)] + [(base - c.macs, c.err2, c) for c in options], key=lambda p: (p[0], p[1]))
        hull: list[tuple[int, float, Choice | None]] = []
        for p in points:
            while len(hull) >= 2 and ((hull[-1][0] - hull[-2][0]) * (p[1] - hull[-2][1])
                                      - (hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0])) <= 0:
                hull.pop()
            if not hull or p[0] > hull[-1][0]:
                hull.append(p)
        hulls.append(hull)
        for i in range(1, len(hull)):
            segments.append(((hull[i][1] - hull[i - 1][1]) / (hull[i][0] - hull[i - 1][0]), l, i))
    pos = [0] * len(layers)
    saved = 0.0
    chosen: list[Choice | None] = [None] * len(layers)
    for _, l, i in sorted(segments):
        if saved >= need:
            break
        if i != pos[l] + 1:  # ties in rate can list a later segment first; hull order wins
            continue
        before = hulls[l][pos[l]][0]
        pos[l] = i
        saved += hulls[l][i][0] - before
        chosen[l] = hulls[l][i][2]
        if saved > need:  # cut short: least error among this layer's candidates that still meet the budget
            floor = hulls[l][i][0] - (saved - need)
            fits = [c for c in layers[l] if base_macs[l] - c.macs >= floor - 1e-9]
            chosen[l] = min(fits, key=lambda c: (c.err2, c.macs))
            # Met (to the float rounding of ``need``): stop here. Going on when ``saved`` ends a rounding error
            # below ``need`` took every remaining segment of every layer (PP-OCRv4 rec's neck: macs=0.7 kept 51%).
            break
    return chosen


def choose(fz: Factorizer, geom: Geometry, schemes: list[str], opts, energy: float | None) -> Choice | None:
    """Per layer: the best candidate of each scheme, then the best scheme (most MACs saved; ratio: least error).

    ``opts`` are the pass options: a fixed ``rank``, else a ``ratio`` of ``ratio_of`` kept, else ``energy``."""
    best: list[Choice] = []
    for scheme in schemes:
        if opts.rank is not None:
            best += choices(fz.point(scheme, opts.rank), np.array([0]))
            continue
        curve = fz.curve(scheme)
        if opts.ratio is not None:
            cost = curve.macs / geom.macs if opts.ratio_of == "macs" else curve.params / geom.params
            idx = np.flatnonzero(cost <= opts.ratio + 1e-12)
            key = np.lexsort((curve.macs[idx], curve.err2[idx]))
        else:
            idx = np.flatnonzero(curve.err2 <= (1.0 - energy) + 1e-12)
            key = np.lexsort((curve.err2[idx], curve.macs[idx]))
        best += choices(curve, idx[key[:1]])
    if not best:
        return None
    if opts.ratio is not None:
        return min(best, key=lambda c: (c.err2, c.macs))
    return min(best, key=lambda c: (c.macs, c.err2))
