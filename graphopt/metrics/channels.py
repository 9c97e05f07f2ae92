"""Per-channel error statistics of one output, streamed feed by feed (the sums behind graphopt.metrics).

See graphopt.metrics for the conventions: SNR clamped to [-SNR_CAP, SNR_CAP], cosine 1.0 when both sides
are zero, non-finite candidate values mark a channel broken, integer/bool/object outputs by exact match.
State is a fixed set of per-channel sums, so memory is flat in the number of feeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["SNR_CAP", "OutputAccumulator", "OutputMetrics", "cosine", "snr_db"]

SNR_CAP = 200.0
_TINY = float(np.finfo(np.float64).tiny)


@dataclass
class OutputMetrics:
    name: str
    max_abs: float
    mean_abs: float
    cosine: float
    snr_db: float
    worst_channel: int | None  # index along axis 1 of the lowest-SNR channel; None for rank 0/1 outputs
    worst_channel_snr_db: float  # that channel's SNR (the whole tensor's when there are no channels)
    worst_channel_cosine: float  # lowest cosine over channels (may be another channel than worst_channel)
    channels: int  # largest axis-1 size seen; 0 for rank 0/1 outputs
    exact_match: float | None = None  # non-float outputs only: fraction of equal elements
    vector_cosine: float | None = None  # mean cosine per vector (graphopt.metrics.vectors), float rank >= 2 outputs
    worst_sample_cosine: float | None = None  # the lowest sample's mean cosine


def snr_db(ref_energy: float, err_energy: float) -> float:
    """SNR in dB from accumulated energies, finite: clamped to [-SNR_CAP, SNR_CAP]."""
    if not (math.isfinite(ref_energy) and math.isfinite(err_energy)):
        return -SNR_CAP
    if err_energy <= 0.0:
        return SNR_CAP
    value = 10.0 * math.log10(max(ref_energy, _TINY) / err_energy)
    return min(SNR_CAP, max(-SNR_CAP, value))


def cosine(dot: float, ref_energy: float, cand_energy: float) -> float:
    if not all(math.isfinite(x) for x in (dot, ref_energy, cand_energy)):
        return 0.0
    if ref_energy <= 0.0 and cand_energy <= 0.0:
        return 1.0
    if ref_energy <= 0.0 or cand_energy <= 0.0:
        return 0.0
    return min(1.0, max(-1.0, dot / math.sqrt(ref_energy * cand_energy)))


_FIELDS = ("ref2", "err2", "dot", "cand2", "abs_sum", "max_abs", "count", "match", "broken")


class _Sums:
    """Per-row sums (row = one channel, or the whole tensor), growable in the number of rows."""

    def __init__(self, rows: int = 0) -> None:
        for name in _FIELDS:
            setattr(self, name, np.zeros(rows))

    @property
    def rows(self) -> int:
        return len(self.count)

    def grow(self, rows: int) -> None:
        if rows > self.rows:
            for name in _FIELDS:
                old = getattr(self, name)
                setattr(self, name, np.concatenate([old, np.zeros(rows - len(old))]))

    def add(self, ref: np.ndarray, cand: np.ndarray, mode: str) -> None:
        """Accumulate rows of 2-D arrays [rows, elements]; mode is 'float', 'exact' or 'object'."""
        rows, width = ref.shape
        self.grow(rows)
        sl = slice(0, rows)
        self.count[sl] += width
        if width == 0:
            return
        if mode != "float":
            same = ref == cand  # on the original values: int64 ids beyond 2**53 must not collide
            self.match[sl] += same.sum(axis=1)
            if mode == "object":  # strings, ZipMap dicts: the error of an element is 0 or 1
                self.abs_sum[sl] += width - same.sum(axis=1)
                self.max_abs[sl] = np.maximum(self.max_abs[sl], (~same).any(axis=1))
                return
        ref, cand = ref.astype(np.float64), cand.astype(np.float64)
        ok = np.isfinite(ref) & np.isfinite(cand)
        if not ok.all():
            # Equal non-finite values (-inf log-probs in both) are agreement; anything else is broken.
            same = (ref == cand) | (np.isnan(ref) & np.isnan(cand))
            self.broken[sl] += (~ok & ~same).any(axis=1)
            ref, cand = np.where(ok, ref, 0.0), np.where(ok, cand, 0.0)
        err = ref - cand
        abs_err = np.abs(err)
        self.ref2[sl] += np.einsum("ij,ij->i", ref, ref)
        self.err2[sl] += np.einsum("ij,ij->i", err, err)
        self.dot[sl] += np.einsum("ij,ij->i", ref, cand)
        self.cand2[sl] += np.einsum("ij,ij->i", cand, cand)
        self.abs_sum[sl] += abs_err.sum(axis=1)
        self.max_abs[sl] = np.maximum(self.max_abs[sl], abs_err.max(axis=1))

    def total(self) -> _Sums:
        whole = _Sums(1)
        for name in _FIELDS:
            values = getattr(self, name)
            getattr(whole, name)[0] = values.max(initial=0.0) if name == "max_abs" else values.sum()
        return whole

    def row(self, i: int, exact: bool) -> tuple[float, float, float, float]:
        """(snr_db, cosine, max_abs, mean_abs) of row i."""
        if self.broken[i]:
            return -SNR_CAP, 0.0, math.inf, math.inf
        count = self.count[i]
        mean_abs = float(self.abs_sum[i] / count) if count else 0.0
        if exact:
            frac = float(self.match[i] / count) if count else 1.0
            snr = SNR_CAP if frac >= 1.0 else min(SNR_CAP, -10.0 * math.log10(1.0 - frac))
            return snr, frac, float(self.max_abs[i]), mean_abs
        return (
            snr_db(float(self.ref2[i]), float(self.err2[i])),
            cosine(float(self.dot[i]), float(self.ref2[i]), float(self.cand2[i])),
            float(self.max_abs[i]),
            mean_abs,
        )


def _mode(array: np.ndarray) -> str:
    kind = array.dtype.kind
    return "float" if kind == "f" else "exact" if kind in "biu" else "object"


class OutputAccumulator:
    """Sums of one output: per channel (axis 1) for rank >= 2 feeds, as a whole for rank 0/1 feeds."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.whole = _Sums(1)  # rank 0/1 feeds
        self.channels = _Sums(0)  # rank >= 2 feeds, one row per index on axis 1
        self.mode: str | None = None  # fixed by the first feed's reference dtype

    def add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        if self.mode is None:
            self.mode = _mode(ref)
        mode = "object" if "object" in (self.mode, _mode(cand)) else self.mode
        if ref.ndim >= 2:
            c = ref.shape[1]
            self.channels.add(np.moveaxis(ref, 1, 0).reshape(c, -1), np.moveaxis(cand, 1, 0).reshape(c, -1), mode)
        else:
            self.whole.add(ref.reshape(1, -1), cand.reshape(1, -1), mode)

    def result(self) -> OutputMetrics:
        exact = self.mode in ("exact", "object")
        whole = self.channels.total()
        for name in _FIELDS:  # fold in feeds that had rank 0/1
            a, b = getattr(whole, name), getattr(self.whole, name)
            a[0] = max(a[0], b[0]) if name == "max_abs" else a[0] + b[0]
        snr, cos, max_abs, mean_abs = whole.row(0, exact)
        n = self.channels.rows
        worst, worst_snr, worst_cos = None, snr, cos
        if n:
            per = [self.channels.row(i, exact) for i in range(n)]
            worst = int(np.argmin([p[0] for p in per]))
            worst_snr = min(snr, per[worst][0])
            worst_cos = min(cos, min(p[1] for p in per))
        match = None
        if exact:
            match = float(whole.match[0] / whole.count[0]) if whole.count[0] else 1.0
        return OutputMetrics(self.name, max_abs, mean_abs, cos, snr, worst, worst_snr, worst_cos, n, match)
