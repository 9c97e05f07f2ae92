"""kmeans' codebooks: cluster one weight into at most 2^bits values, per layer or per output channel.

A :class:`Codebook` is the codebook ([K], or [O, K] with rows along ``out_axis``) and uint8 codes shaped like the
weight. Exact zeros (pruned weights) keep a reserved zero code (code 0) and do not pull centroids when they are
at least a code's share of the weight (1/2^bits); rarer zeros are clustered like the other values: an embedding
table's all-zero padding row (768 of BERT-base's 23.4M word-table values) would otherwise take one of 16 codes, and
the relative error at 4 bits rose from 0.098 to 0.104. bits=1 is sign × a scale per output channel. Groups above
``HIST_MIN_SIZE`` elements go through the histogram k-means (no sort, no full-size float64 copies), the others
through the exact sorted one.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from graphopt.passes.kmeans.kmeans1d import HIST_MIN_SIZE, kmeans1d, kmeans1d_hist


@dataclasses.dataclass
class Codebook:
    """codebook [K] (per layer) or [O, K] (per channel, rows along ``out_axis``); indices shaped like w."""

    codebook: np.ndarray
    indices: np.ndarray  # uint8, values < K
    out_axis: int
    zero_code: bool

    @property
    def per_channel(self) -> bool:
        return self.codebook.ndim == 2

    def reconstruct(self) -> np.ndarray:
        if not self.per_channel:
            return self.codebook[self.indices.astype(np.int64)]
        idx = np.moveaxis(self.indices.astype(np.int64), self.out_axis, 0)
        rows = np.arange(idx.shape[0]).reshape((-1,) + (1,) * (idx.ndim - 1))
        return np.moveaxis(self.codebook[rows, idx], 0, self.out_axis)


def cluster(values: np.ndarray, weights: np.ndarray | None, k: int, init: str, zero_code: bool,
             seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Centroids (code 0 = 0.0 when ``zero_code``) and uint8 codes shaped like ``values`` for one group.

    Large groups go through the histogram k-means: no sort, no full-size float64 or int64 copies."""
    if values.size > HIST_MIN_SIZE:
        cents, codes = kmeans1d_hist(values, k - int(zero_code), weights, init, seed=seed, zero_code=zero_code)
        return (np.concatenate([[0.0], cents]) if zero_code else cents), codes.astype(np.uint8, copy=False)
    flat = values.reshape(-1)
    flat_w = None if weights is None else weights.reshape(-1)
    if not zero_code:
        cents, labels = kmeans1d(flat, k, flat_w, init, seed=seed)
        return cents, labels.astype(np.uint8).reshape(values.shape)
    codes = np.zeros(flat.shape, np.uint8)
    nz = flat != 0
    cents, labels = kmeans1d(flat[nz], k - 1, None if flat_w is None else flat_w[nz], init, seed=seed)
    codes[nz] = labels + 1
    return np.concatenate([[0.0], cents]), codes.reshape(values.shape)


def quantize(w: np.ndarray, bits: int, init: str = "linear", importance: np.ndarray | None = None,
             per_channel: bool = False, out_axis: int = 0, seed: int = 0) -> Codebook:
    """Cluster ``w`` into a codebook of at most 2^bits values (importance: per-element error weights)."""
    k = 2 ** bits
    axis = out_axis % w.ndim
    if bits == 1:  # binary: sign × per-channel scale (weighted mean |w| minimizes the weighted error)
        rows = np.moveaxis(np.abs(w.astype(np.float64)), axis, 0).reshape(w.shape[axis], -1)
        h = np.ones_like(rows) if importance is None else np.moveaxis(importance, axis, 0).reshape(rows.shape)
        scale = (rows * h).sum(1) / np.maximum(h.sum(1), 1e-30)
        book = np.stack([-scale, scale], axis=1).astype(w.dtype)
        return Codebook(book, (w >= 0).astype(np.uint8), axis, False)
    zero_code = bool(np.count_nonzero(w == 0) * k >= w.size > 0)
    if not per_channel:
        cents, codes = cluster(w, importance, k, init, zero_code, seed)
        return Codebook(cents.astype(w.dtype), codes, axis, zero_code)
    rows = np.moveaxis(w, axis, 0)  # float32 as is: kmeans1d widens only its sorted distinct values
    hrows = None if importance is None else np.moveaxis(importance, axis, 0)
    book = np.zeros((rows.shape[0], k), w.dtype)
    idx = np.zeros(rows.shape, np.uint8)
    for o in range(rows.shape[0]):
        cents, codes = cluster(rows[o], None if hrows is None else hrows[o], k, init, zero_code, seed)
        book[o, :cents.size] = cents
        book[o, cents.size:] = cents[-1] if cents.size else 0  # unused codes: harmless filler
        idx[o] = codes
    return Codebook(book, np.moveaxis(idx, 0, axis), axis, zero_code)


def errors(w: np.ndarray, cb: Codebook, h: np.ndarray | None) -> tuple[float, float | None]:
    """(relative error, importance-weighted relative error) of the reconstruction, block by block.

    Float64 sums over blocks of output channels: never a full-size float64 or int64 copy of a big weight."""
    axis = cb.out_axis
    wr = np.moveaxis(w, axis, 0)
    ir_ = np.moveaxis(cb.indices, axis, 0)
    hr = None if h is None else np.moveaxis(h, axis, 0)
    step = max(1, (1 << 20) // max(1, w.size // max(1, wr.shape[0])))
    sums = np.zeros(4)  # Σd², Σw², Σh·d², Σh·w²
    for start in range(0, wr.shape[0], step):
        x = np.asarray(wr[start:start + step], np.float64)
        codes = ir_[start:start + step].astype(np.intp)
        if cb.per_channel:
            rows = np.arange(start, start + x.shape[0]).reshape((-1,) + (1,) * (x.ndim - 1))
            approx = cb.codebook[rows, codes]
        else:
            approx = cb.codebook[codes]
        d2 = (approx - x) ** 2
        x2 = x * x
        sums[:2] += d2.sum(), x2.sum()
        if hr is not None:
            hb = hr[start:start + step]
            sums[2:] += np.sum(hb * d2), np.sum(hb * x2)
    rel = float(np.sqrt(sums[0]) / (np.sqrt(sums[1]) or 1.0))
    return rel, (None if h is None else float(np.sqrt(sums[2] / (sums[3] or 1))))


def codes_used(indices: np.ndarray) -> int:
    counts = np.zeros(256, np.int64)
    flat = indices.reshape(-1)
    for start in range(0, flat.size, 1 << 20):
        counts += np.bincount(flat[start:start + (1 << 20)], minlength=256)
    return int(np.count_nonzero(counts))
