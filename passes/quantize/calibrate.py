"""Activation ranges for static quantization, from streaming statistics.

Statistics come from :mod:`graphopt.capture` (one onnxruntime session, one feed at a time, memory flat in
the number of samples). Each tensor keeps its min/max and a signed histogram of x on [-M, M] whose range
doubles when a feed exceeds it (counts stay exact). From those:

- ``minmax``: the observed (min, max).
- ``percentile``: the p-th and (100-p)-th percentiles of x (one-sided tensors keep their exact end at 0 side).
- ``entropy``: the clipping threshold T on |x| minimising KL(P || Q) between the clipped reference
  distribution P and its quantized version Q, searched over every candidate bin edge (TensorRT's method).
- ``mse``: the threshold T on |x| minimising the expected squared error of rounding (step²/12 inside the
  range) plus clipping ((|x|-T)² outside), computed exactly on the histogram for every candidate T.

Ranges are returned raw: (lo, hi) as calibrated; emission widens them to contain 0.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx_ir as ir

from graphopt import capture
from graphopt.errors import GraphoptError

Range = tuple[float, float]
METHODS = ("minmax", "percentile", "entropy", "mse")
LEVELS = 255  # uint8/int8 asymmetric activations: 256 values, 255 steps


def range_stats(bins: int = 4096) -> capture.TensorStats:
    """Statistics for calibration: signed histogram, no per-channel sums (calibration needs none, and axis 1
    may vary between feeds: sequence models with dynamic widths put time there)."""
    return capture.TensorStats(bins, signed=True, channels=False)


def collect(model: ir.Model, names: Iterable[str], dataset, threads: int = 1, max_samples: int | None = None,
            bins: int = 4096, progress: bool = False) -> dict[str, capture.TensorStats]:
    """Running statistics of the named main-graph values over the calibration feeds; a value that holds NaN or
    Inf on some feed has none (the plan keeps its nodes float)."""
    names = list(dict.fromkeys(names))
    if not names:
        return {}
    return capture.tensor_stats(model, names, dataset, threads, max_samples, bins, signed=True, progress=progress,
                                channels=False, skip_nonfinite=True)


def abs_histogram(stats: capture.TensorStats) -> tuple[np.ndarray, np.ndarray]:
    """(counts, edges) of |x| on [0, M], folded exactly from a signed histogram (its bins mirror at 0)."""
    counts, edges = stats.histogram()
    if not stats.signed:
        return counts.astype(np.float64), edges
    half = counts.size // 2
    folded = counts[half:].astype(np.float64) + counts[:half][::-1]
    return folded, edges[half:]


def _seen(stats: capture.TensorStats) -> None:
    if stats.count == 0:
        raise GraphoptError("calibration saw no values for a tensor (empty activations on every feed)")


def minmax_range(stats: capture.TensorStats) -> Range:
    _seen(stats)
    return float(stats.min), float(stats.max)


def percentile_range(stats: capture.TensorStats, p: float) -> Range:
    """x's (100-p)-th and p-th percentiles, inside [min, max]; an end of one sign stays exact."""
    _seen(stats)
    if not stats.signed:  # |x| histogram: a symmetric threshold
        t = stats.percentile(p)
        return max(stats.min, -t), min(stats.max, t)
    lo = stats.min if stats.min >= 0 else max(stats.min, stats.percentile(100.0 - p))
    hi = stats.max if stats.max <= 0 else min(stats.max, stats.percentile(p))
    return float(min(lo, hi)), float(max(lo, hi))


def _clip_to(stats: capture.TensorStats, t: float) -> Range:
    return float(max(stats.min, -t)), float(min(stats.max, t))


def kl_threshold(counts: np.ndarray, edges: np.ndarray, quant_bins: int = 128, max_candidates: int = 1024) -> float:
    """The |x| threshold minimising KL(P || Q) (P: histogram clipped at T with outliers in its last bin;
    Q: P merged into ``quant_bins`` levels and spread back over P's non-empty bins)."""
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.size
    if n <= quant_bins or counts.sum() == 0:
        return float(edges[-1])
    nonzero = np.flatnonzero(counts)
    last = int(nonzero[-1]) + 1  # thresholds beyond the last non-empty bin change nothing
    if last <= quant_bins:
        return float(edges[last])
    step = max(1, (last - quant_bins) // max_candidates)
    candidates = list(range(quant_bins, last + 1, step))
    if candidates[-1] != last:
        candidates.append(last)
    tail = np.concatenate([np.cumsum(counts[::-1])[::-1], [0.0]])  # tail[i] = sum(counts[i:])
    best_i, best_kl = last, np.inf
    for i in candidates:
        sliced = counts[:i]
        p = sliced.copy()
        p[-1] += tail[i]
        # Which quantized level each fine bin falls in. Bin 0 (holding 0) is a level of its own: 0 is exact in
        # the asymmetric grid, and merging the zero spike of a Relu output with its neighbours would make
        # every wide threshold look bad.
        group = np.concatenate([[0], 1 + (np.arange(i - 1) * (quant_bins - 1)) // (i - 1)])
        occupied = sliced > 0
        level_sum = np.bincount(group, weights=sliced, minlength=quant_bins)
        level_n = np.bincount(group, weights=occupied.astype(np.float64), minlength=quant_bins)
        q = np.where(occupied, level_sum[group] / np.maximum(level_n[group], 1.0), 0.0)
        p_sum, q_sum = p.sum(), q.sum()
        if q_sum == 0:
            continue
        p, q = p / p_sum, q / q_sum
        mask = p > 0
        # Bins where P has mass but Q none (the outlier bin beyond any occupied fine bin) get a floor.
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return float(edges[best_i])


def mse_threshold(counts: np.ndarray, edges: np.ndarray, levels: float, max_candidates: int = 2048) -> float:
    """The |x| threshold minimising E[(x - Q(x))²] with step T/levels: rounding noise inside, clipping outside."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total == 0:
        return float(edges[-1])
    centers = (edges[:-1] + edges[1:]) / 2.0
    last = int(np.flatnonzero(counts)[-1]) + 1
    stride = max(1, last // max_candidates)
    idx = np.unique(np.append(np.arange(1, last + 1, stride), last))
    ts = edges[idx]
    # Tail sums beyond each candidate: sum n, sum n·c, sum n·c² over bins i >= idx.
    s0 = np.concatenate([np.cumsum(counts[::-1])[::-1], [0.0]])
    s1 = np.concatenate([np.cumsum((counts * centers)[::-1])[::-1], [0.0]])
    s2 = np.concatenate([np.cumsum((counts * centers**2)[::-1])[::-1], [0.0]])
    clip = s2[idx] - 2.0 * ts * s1[idx] + ts**2 * s0[idx]
    inside = (total - s0[idx]) * (ts / levels) ** 2 / 12.0
    err = clip + inside
    return float(ts[int(np.argmin(err))])


def entropy_range(stats: capture.TensorStats) -> Range:
    _seen(stats)
    counts, edges = abs_histogram(stats)
    one_sided = stats.min >= 0 or stats.max <= 0
    t = kl_threshold(counts, edges, quant_bins=LEVELS if one_sided else (LEVELS + 1) // 2)
    return _clip_to(stats, t)


def mse_range(stats: capture.TensorStats) -> Range:
    _seen(stats)
    counts, edges = abs_histogram(stats)
    one_sided = stats.min >= 0 or stats.max <= 0
    t = mse_threshold(counts, edges, levels=LEVELS if one_sided else LEVELS / 2.0)
    return _clip_to(stats, t)


def tensor_range(stats: capture.TensorStats, method: str = "minmax", percentile: float = 99.999) -> Range:
    """One tensor's calibrated (lo, hi); a range that would collapse to a point falls back to min/max."""
    if method == "minmax":
        return minmax_range(stats)
    if method == "percentile":
        lo, hi = percentile_range(stats, percentile)
    elif method == "entropy":
        lo, hi = entropy_range(stats)
    elif method == "mse":
        lo, hi = mse_range(stats)
    else:
        raise GraphoptError(f"unknown calibration method {method!r} (use one of {', '.join(METHODS)})")
    if hi - lo <= 0 < stats.max - stats.min:
        return minmax_range(stats)
    return lo, hi


def calibrate(model: ir.Model, names: Iterable[str], dataset, method: str = "minmax", percentile: float = 99.999,
              threads: int = 1, max_samples: int | None = None, progress: bool = False) -> dict[str, Range]:
    """Calibrated (lo, hi) of each named main-graph value over the dataset."""
    if method not in METHODS:
        raise GraphoptError(f"unknown calibration method {method!r} (use one of {', '.join(METHODS)})")
    stats = collect(model, names, dataset, threads, max_samples, progress=progress)
    return {name: tensor_range(s, method, percentile) for name, s in stats.items()}
