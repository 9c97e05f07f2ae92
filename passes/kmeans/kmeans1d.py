"""Fast weighted 1-D k-means: sort once, then Lloyd iterations on prefix sums.

In one dimension the clusters of Lloyd's algorithm are contiguous runs of the sorted values, split at the
midpoints between neighbouring centroids. With the values sorted (and de-duplicated, their weights summed)
once, an iteration is k binary searches for the split points plus k differences of prefix sums:
O(k log n), never an n×k distance matrix. Arrays too large to sort (``kmeans1d_hist``) run the same Lloyd
iterations on a fine histogram of the values, in named steps: range, histogram, fit, codes, empty clusters.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Init = Literal["linear", "density", "kmeans++"]
INITS = ("linear", "density", "kmeans++")
# kmeans++ seeding is O(n·k); above this many distinct values it seeds on a weighted subsample.
_PLUSPLUS_SAMPLE = 65536
# Above this many values, callers use kmeans1d_hist: sorting 100M floats takes a minute and gigabytes.
HIST_MIN_SIZE = 1 << 20
HIST_BINS = 1 << 16
# Elements per block in the streaming passes: temporaries stay a few MB and in cache.
_BLOCK = 1 << 20


def _unique(values: np.ndarray, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted distinct values, their summed weights and the inverse map (the one sort)."""
    flat = np.asarray(values).reshape(-1)
    if flat.dtype not in (np.float32, np.float64):
        flat = flat.astype(np.float64)
    uniq, inverse = np.unique(flat, return_inverse=True)  # sorting float32 as is: half the memory traffic
    uniq = uniq.astype(np.float64)
    w = np.ones(flat.size) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape != flat.shape:
        raise ValueError(f"weights shape {w.shape} does not match values {flat.shape}")
    return uniq, np.bincount(inverse, weights=w, minlength=uniq.size), inverse.reshape(-1)


def init_centroids(xs: np.ndarray, ws: np.ndarray, k: int, init: str, seed: int = 0) -> np.ndarray:
    """k starting centroids for sorted distinct values ``xs`` with weights ``ws``."""
    if init == "linear":  # Deep Compression's best: spread over the range, so large weights keep a centroid
        return np.linspace(xs[0], xs[-1], k)
    if init == "density":  # weighted quantiles: dense regions get more centroids
        cdf = np.cumsum(ws)
        cdf /= cdf[-1]
        return xs[np.minimum(np.searchsorted(cdf, (np.arange(k) + 0.5) / k), xs.size - 1)]
    if init == "kmeans++":
        rng = np.random.default_rng(seed)
        px, pw = xs, ws
        if xs.size > _PLUSPLUS_SAMPLE:
            pick = rng.choice(xs.size, _PLUSPLUS_SAMPLE, replace=False, p=ws / ws.sum())
            px, pw = xs[np.sort(pick)], np.ones(_PLUSPLUS_SAMPLE)
        chosen = [px[rng.choice(px.size, p=pw / pw.sum())]]
        dist = (px - chosen[0]) ** 2
        for _ in range(1, k):
            score = dist * pw
            total = score.sum()
            if total <= 0:
                break
            chosen.append(px[rng.choice(px.size, p=score / total)])
            dist = np.minimum(dist, (px - chosen[-1]) ** 2)
        return np.sort(np.asarray(chosen))
    raise ValueError(f"unknown init {init!r}; allowed: {'|'.join(INITS)}")


def lloyd_sorted(xs: np.ndarray, ws: np.ndarray, centroids: np.ndarray, max_iter: int = 100) -> np.ndarray:
    """Weighted Lloyd iterations on sorted distinct values; returns the sorted final centroids."""
    cw = np.concatenate([[0.0], np.cumsum(ws)])
    cs = np.concatenate([[0.0], np.cumsum(ws * xs)])
    c = np.sort(np.asarray(centroids, dtype=np.float64))
    bounds = None
    for _ in range(max_iter):
        # Cluster j holds xs[b[j]:b[j+1]]: the values nearer to c[j] than to its neighbours.
        b = np.concatenate([[0], np.searchsorted(xs, (c[1:] + c[:-1]) / 2, side="right"), [xs.size]])
        if bounds is not None and np.array_equal(b, bounds):
            break
        bounds = b
        mass = cw[b[1:]] - cw[b[:-1]]
        total = cs[b[1:]] - cs[b[:-1]]
        filled = mass > 0
        c = np.where(filled, total / np.where(filled, mass, 1.0), c)  # an empty cluster keeps its centroid
        c = np.sort(c)
    return c


class _Prefix:
    """Prefix sums of w, w·x, w·x² over the sorted values: any run's mass, mean and SSE in O(1)."""

    def __init__(self, xs: np.ndarray, ws: np.ndarray) -> None:
        self.xs = xs
        self.w = np.concatenate([[0.0], np.cumsum(ws)])
        self.s = np.concatenate([[0.0], np.cumsum(ws * xs)])
        self.q = np.concatenate([[0.0], np.cumsum(ws * xs * xs)])

    def sse(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        mass = self.w[hi] - self.w[lo]
        total = self.s[hi] - self.s[lo]
        return np.maximum(self.q[hi] - self.q[lo] - total ** 2 / np.where(mass > 0, mass, 1.0), 0.0)

    def bounds(self, c: np.ndarray) -> np.ndarray:
        return np.concatenate([[0], np.searchsorted(self.xs, (c[1:] + c[:-1]) / 2, side="right"), [self.xs.size]])


def _swap(pre: _Prefix, c: np.ndarray) -> np.ndarray | None:
    """Centroids with the cheapest neighbouring pair merged and the worst cluster split, or None.

    Lloyd only moves centroids locally; with weights (data-aware) or gaps (pruned zeros) it leaves codes
    on cheap or empty runs. This move frees one code where it costs least and spends it where the error is."""
    if c.size < 3:
        return None
    b = pre.bounds(c)
    sse = pre.sse(b[:-1], b[1:])
    worst = int(np.argmax(sse))
    if sse[worst] <= 0 or b[worst + 1] - b[worst] < 2:
        return None
    merge = pre.sse(b[:-2], b[2:]) - sse[:-1] - sse[1:]  # merging run r with run r+1
    merge[[i for i in (worst - 1, worst) if 0 <= i < merge.size]] = np.inf
    pair = int(np.argmin(merge))
    if not np.isfinite(merge[pair]):
        return None
    lo, hi = b[pair], b[pair + 2]
    mass = pre.w[hi] - pre.w[lo]
    merged = (pre.s[hi] - pre.s[lo]) / mass if mass > 0 else c[pair]
    a, z = b[worst], b[worst + 1]
    mean = (pre.s[z] - pre.s[a]) / (pre.w[z] - pre.w[a])
    split = [(pre.xs[a] + mean) / 2, (mean + pre.xs[z - 1]) / 2]  # between the run's ends and its mean
    keep = np.delete(c, [pair, pair + 1, worst])
    return np.sort(np.concatenate([keep, [merged], split]))


def _cost(pre: _Prefix, c: np.ndarray) -> float:
    b = pre.bounds(c)
    return float(pre.sse(b[:-1], b[1:]).sum())


def _fit(xs: np.ndarray, ws: np.ndarray, k: int, init: str, max_iter: int, seed: int) -> np.ndarray:
    """Sorted centroids for sorted distinct values ``xs`` (more than k) with weights ``ws``: Lloyd + swaps."""
    ws = np.maximum(ws, 1e-30 * max(ws.max(), 1e-30))  # zero-energy values still belong somewhere
    c = lloyd_sorted(xs, ws, init_centroids(xs, ws, k, init, seed), max_iter)
    pre = _Prefix(xs, ws)
    cost = _cost(pre, c)
    for _ in range(2 * k):  # merge-and-split moves while they lower the objective
        moved = _swap(pre, c)
        if moved is None:
            break
        moved = lloyd_sorted(xs, ws, moved, max_iter)
        new_cost = _cost(pre, moved)
        if not new_cost < cost * (1 - 1e-9):
            break
        c, cost = moved, new_cost
    return c


def kmeans1d(values: np.ndarray, k: int, weights: np.ndarray | None = None, init: str = "linear",
             max_iter: int = 100, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Weighted 1-D k-means of ``values`` into at most ``k`` clusters.

    Returns (centroids sorted ascending, labels shaped like ``values``). With at most ``k`` distinct values
    the centroids are those values exactly. Unused (empty) centroids are dropped.
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    shape = np.shape(values)
    xs, ws, inverse = _unique(values, weights)
    if xs.size == 0:
        return np.zeros(0), np.zeros(shape, dtype=np.int64)
    if xs.size <= k:
        return xs, inverse.reshape(shape)
    c = _fit(xs, ws, k, init, max_iter, seed)
    labels_u = assign(xs, c)
    used = np.unique(labels_u)
    if used.size < c.size:  # drop empty clusters, renumber
        remap = np.full(c.size, -1)
        remap[used] = np.arange(used.size)
        c, labels_u = c[used], remap[labels_u]
    return c, labels_u[inverse].reshape(shape)


def assign(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest of the sorted ``centroids`` for each value (ties go to the lower one, as argmin does)."""
    mids = (centroids[1:] + centroids[:-1]) / 2
    return np.searchsorted(mids, values, side="left").astype(np.int64)


def objective(values: np.ndarray, centroids: np.ndarray, labels: np.ndarray,
              weights: np.ndarray | None = None) -> float:
    """Σ w·(x − c[label])², the quantity k-means minimizes."""
    err = (np.asarray(values, np.float64) - centroids[labels]) ** 2
    return float(np.sum(err if weights is None else err * weights))


def _blocks(values: np.ndarray, weights: np.ndarray | None, zero_code: bool):
    """(slice along axis 0, flat values, flat weights, non-zero mask) per block of about _BLOCK elements.

    Slicing along axis 0 keeps a broadcast weights view lazy: only one block is ever materialized."""
    rows = values.shape[0] if values.ndim else 1
    per_row = max(1, values.size // max(rows, 1))
    step = max(1, _BLOCK // per_row)
    for start in range(0, rows, step):
        sl = slice(start, start + step)
        x = values[sl].reshape(-1)
        h = None if weights is None else np.asarray(weights[sl], np.float64).reshape(-1)
        keep = (x != 0) if zero_code else None
        if keep is not None:
            x = x[keep]
            h = None if h is None else h[keep]
        yield sl, x, h, keep


def _few_distinct(values: np.ndarray, zero_code: bool, limit: int) -> np.ndarray | None:
    """The sorted distinct (non-zero when ``zero_code``) values if there are at most ``limit``, else None."""
    seen = np.zeros(0, values.dtype)
    for _, x, _, _ in _blocks(values, None, zero_code):
        seen = np.union1d(seen, x)
        if seen.size > limit:
            return None
    return seen.astype(np.float64)


def _value_range(values: np.ndarray, zero_code: bool) -> tuple[float, float]:
    """(min, max) of the values, of the non-zero ones with ``zero_code``; (inf, -inf) when all are zero."""
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if zero_code and values.size:  # the range of the non-zero values (only differs when all are >= 0 or <= 0)
        if lo == 0:
            lo = float(np.min(values, where=values != 0, initial=np.inf))
        if hi == 0:
            hi = float(np.max(values, where=values != 0, initial=-np.inf))
    return lo, hi


def _histogram(values: np.ndarray, weights: np.ndarray | None, zero_code: bool, lo: float, hi: float,
               bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (weighted) means and masses of the filled bins of ``bins`` equal bins over [lo, hi], in one pass."""
    scale = bins / (hi - lo) if hi > lo else 0.0
    count = np.zeros(bins)
    total = np.zeros(bins)
    wsum = np.zeros(bins) if weights is not None else None
    wtotal = np.zeros(bins) if weights is not None else None
    for _, x, h, _ in _blocks(values, weights, zero_code):
        idx = ((x - x.dtype.type(lo)) * x.dtype.type(scale)).astype(np.intp)  # monotone in x: bins stay sorted
        np.clip(idx, 0, bins - 1, out=idx)
        count += np.bincount(idx, minlength=bins)
        total += np.bincount(idx, weights=x, minlength=bins)
        if h is not None:
            wsum += np.bincount(idx, weights=h, minlength=bins)
            wtotal += np.bincount(idx, weights=h * x, minlength=bins)
        del idx
    filled = count > 0
    xs = total[filled] / count[filled]
    ws = count[filled]
    if wsum is not None:  # weighted bin means; a bin of zero weight keeps its plain mean
        sw = wsum[filled]
        xs = np.where(sw > 0, wtotal[filled] / np.where(sw > 0, sw, 1.0), xs)
        ws = sw
    order = np.argsort(xs, kind="stable")
    return xs[order], ws[order]


def _assign_codes(values: np.ndarray, c: np.ndarray, zero_code: bool, codes: np.ndarray) -> np.ndarray:
    """Write each value's nearest-centroid code into ``codes`` (1 + index with ``zero_code``, zeros 0), block by
    block; returns how many values each centroid took."""
    mids = (c[1:] + c[:-1]) / 2
    used = np.zeros(c.size, np.int64)
    for sl, x, _, keep in _blocks(values, None, zero_code):
        lab = np.zeros(x.size, codes.dtype)
        for m in mids:  # searchsorted(mids, x, side="left") == number of mids below x; k compares are faster
            lab += x > m
        used += np.bincount(lab, minlength=c.size)
        if keep is not None:
            block = np.zeros(keep.size, codes.dtype)
            block[keep] = lab + 1
            lab = block
        codes[sl] = lab.reshape(codes[sl].shape)
    return used


def _drop_empty(c: np.ndarray, codes: np.ndarray, used: np.ndarray, zero_code: bool) -> np.ndarray:
    """The centroids that took a value; ``codes`` renumbered in place to match."""
    if not np.any(used == 0):
        return c
    alive = used > 0
    remap = np.zeros(c.size + int(zero_code), codes.dtype)
    remap[int(zero_code) + np.flatnonzero(alive)] = np.arange(int(zero_code), int(zero_code) + alive.sum())
    flat = codes.reshape(-1)
    for start in range(0, codes.size, _BLOCK):
        flat[start:start + _BLOCK] = remap[flat[start:start + _BLOCK]]
    return c[alive]


def kmeans1d_hist(values: np.ndarray, k: int, weights: np.ndarray | None = None, init: str = "linear",
                  max_iter: int = 100, seed: int = 0, zero_code: bool = False,
                  bins: int = HIST_BINS) -> tuple[np.ndarray, np.ndarray]:
    """kmeans1d for large arrays: Lloyd on a fine histogram, then exact nearest-centroid codes.

    One streaming pass bins the values into ``bins`` equal bins over their range, keeping per bin the
    count and the (weighted) sum; Lloyd on the bin means is then exact for the binned data, and a bin is far
    narrower than a cluster. A second pass assigns every value to its nearest centroid. No sort and no
    full-size temporary. With ``zero_code`` exact zeros take no part and get code 0, the others 1 + index.
    Returns (centroids sorted ascending, codes shaped like ``values``, the smallest unsigned dtype).
    With at most ``k`` distinct values the centroids are those values exactly; unused centroids are dropped.
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    values = np.asarray(values)
    if values.dtype not in (np.float32, np.float64):
        values = values.astype(np.float64)
    if weights is not None and np.shape(weights) != values.shape:
        raise ValueError(f"weights shape {np.shape(weights)} does not match values {values.shape}")
    codes = np.zeros(values.shape, np.min_scalar_type(k + int(zero_code)))
    lo, hi = _value_range(values, zero_code)
    if lo == np.inf:  # nothing but zeros
        return np.zeros(0), codes
    if not np.isfinite(hi - lo):
        raise ValueError("values must be finite")
    xs, ws = _histogram(values, weights, zero_code, lo, hi, bins)
    distinct = _few_distinct(values, zero_code, k) if xs.size <= k else None
    if distinct is not None:
        c = distinct
    elif xs.size <= k:
        c = xs
    else:
        c = _fit(xs, ws, k, init, max_iter, seed)
    used = _assign_codes(values, c, zero_code, codes)
    return _drop_empty(c, codes, used, zero_code), codes
