"""int16 pair saturation of u8×s8 kernels: which int8 weights can overflow, and scales that cannot.

Without VNNI, onnxruntime's x86 u8×s8 GEMM (AVX2, AVX-512BW) multiplies uint8 activations by int8 weights with
``vpmaddubsw``: the products of neighbouring reduction indices k = 2j and 2j+1 are added into an int16 that
saturates at [-32768, 32767] before the int32 accumulation. int8 activations are shifted to uint8 (x + 128)
first, so they meet the same limit. Activation bytes span 0..255 (a calibrated range maps onto all of them), so a
weight pair can overflow when its same-sign magnitudes add up to more than 128 (255 × 129 > 32767).

:class:`KernelOrder` lays a weight out as the kernel reads it — one row per output channel, K in the kernel's
order — so pairs are columns (2j, 2j+1). :func:`safe_quantize` requantizes just the channels that could
overflow: a larger scale, or the overflowing pairs clamped, whichever is closer to the float weights.
Depthwise convolutions run a separate kernel that widens to int16 before multiplying: they do not saturate.
These rules were measured with onnxruntime 1.32 under ``qemu-x86_64 -cpu Haswell`` (AVX2, no VNNI).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from graphopt.graphs import attr, is_default_domain

ACT_MAX = 255  # the largest activation byte the kernel multiplies
INT16_MAX, INT16_MIN = 32767, -32768
PAIR_LIMIT = 128  # largest same-sign |q0| + |q1| that cannot overflow: 255 × 128 = 32640
_SEARCH_STEPS = 30


@dataclasses.dataclass(frozen=True)
class KernelOrder:
    """How a pairing u8×s8 kernel reads a weight: ``op`` Conv (with ``group``), Gemm (``trans_b``) or MatMul."""

    op: str
    group: int = 1
    trans_b: bool = False

    def rows(self, w: np.ndarray) -> np.ndarray:
        """[output channels, K] in the kernel's reduction order (K padded to even with zeros).

        Conv [Cout, Cin/g, kh, kw]: onnxruntime reorders the filter to channels-last, K = (kh, kw, cin) with
        the input channel fastest, one GEMM per group. Gemm/MatMul: K is the reduction axis as stored."""
        w = np.asarray(w)
        if self.op == "Conv":
            m = np.moveaxis(w, 1, -1).reshape(w.shape[0], -1)
        elif self.op == "Gemm":
            m = w if self.trans_b else w.T
        else:  # MatMul B [..., K, N]: each column of each stacked matrix
            m = np.swapaxes(w, -1, -2).reshape(-1, w.shape[-2])
        if m.shape[1] % 2:
            m = np.concatenate([m, np.zeros((m.shape[0], 1), m.dtype)], axis=1)
        return m

    def unrows(self, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """The inverse of :meth:`rows`: a weight of ``shape`` from its kernel rows."""
        if self.op == "Conv":
            k = int(np.prod(shape[1:]))
            return np.moveaxis(rows[:, :k].reshape(shape[0], *shape[2:], shape[1]), -1, 1)
        if self.op == "Gemm":
            k = shape[1] if self.trans_b else shape[0]
            return rows[:, :k] if self.trans_b else rows[:, :k].T
        k = shape[-2]
        stacked = rows[:, :k].reshape(*shape[:-2], shape[-1], k)
        return np.swapaxes(stacked, -1, -2)


def kernel_order(node: ir.Node, weight_shape: tuple[int, ...] | None = None) -> KernelOrder | None:
    """The order a default-domain Conv/Gemm/MatMul weight is read in by a pairing kernel; None when the op has
    no such kernel (ConvTranspose runs float; depthwise Conv runs a kernel that does not saturate)."""
    if not is_default_domain(node):
        return None
    op = node.op_type
    if op == "Conv":
        group = int(attr(node, "group", 1))
        if group > 1 and weight_shape is not None and weight_shape[1] == 1 and weight_shape[0] == group:
            return None  # depthwise
        return KernelOrder("Conv", group)
    if op == "Gemm":
        return KernelOrder("Gemm", trans_b=bool(attr(node, "transB", 0)))
    if op == "MatMul":
        return KernelOrder("MatMul")
    return None


def pair_magnitudes(rows: np.ndarray) -> np.ndarray:
    """[rows, pairs]: each pair's (columns 2j, 2j+1) larger same-sign sum, |q0| + |q1| when the signs agree."""
    pairs = rows.reshape(rows.shape[0], -1, 2)
    return np.maximum(np.maximum(pairs, 0).sum(axis=2), np.maximum(-pairs, 0).sum(axis=2))


def pair_peaks(rows: np.ndarray) -> np.ndarray:
    """Per row, the largest same-sign |q0| + |q1| over its pairs of integer weights."""
    return pair_magnitudes(np.asarray(rows, np.int32)).max(axis=1, initial=0)


def overflow_rows(rows: np.ndarray) -> np.ndarray:
    """Boolean per row: some pair can leave int16 for some activation bytes in 0..255."""
    return pair_peaks(rows) > PAIR_LIMIT


def _quantize(rows: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.clip(np.round(rows / scale[:, None]), -127, 127)


def _no_clamp_scales(r: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Per row of float weights ``r`` (each overflowing at its scale ``lo``), the smallest larger float32 scale
    whose rounded int8 row has no overflowing pair."""
    peak = pair_magnitudes(r).max(axis=1)
    hi = np.maximum(lo, peak / (PAIR_LIMIT - 1.0))  # rounding adds at most 1 to a pair: this one is safe
    for _ in range(_SEARCH_STEPS):
        mid = (lo + hi) / 2
        ok = ~overflow_rows(_quantize(r, mid))
        hi = np.where(ok, mid, hi)
        lo = np.where(ok, lo, mid)
    hi32 = hi.astype(np.float32)
    while True:  # float32 rounding of the scale must not step back over the edge
        still = overflow_rows(_quantize(r, hi32.astype(np.float64)))
        if not still.any():
            break
        hi32 = np.where(still, np.nextafter(hi32 * np.float32(1.0001), np.float32(np.inf)), hi32)
    return hi32


def clamp_pairs(q: np.ndarray) -> np.ndarray:
    """Integer rows whose overflowing pairs are cut to a same-sign sum of 128, the excess split evenly
    (the least squared change); every other weight is untouched."""
    q = np.array(q, np.int32)
    pairs = q.reshape(q.shape[0], -1, 2)
    for sign in (1, -1):
        mag = np.maximum(sign * pairs, 0)
        excess = mag.sum(axis=2) - PAIR_LIMIT  # > 0 only when both members have this sign (each <= 127)
        bad = excess > 0
        if not bad.any():
            continue
        big = mag[..., 0] >= mag[..., 1]
        cut_big, cut_small = (excess + 1) // 2, excess // 2
        cut = np.stack([np.where(big, cut_big, cut_small), np.where(big, cut_small, cut_big)], axis=2)
        pairs -= sign * np.where(bad[..., None], cut, 0)
    return q


_GRID = 12  # scales tried between the plain one and the smallest one that needs no clamp


def safe_quantize(rows: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """int8 rows that cannot overflow a pair, with the least squared weight error per row.

    For each row that overflows at ``scale``, scales from there up to the smallest one that needs no clamp are
    tried, the overflowing pairs of each cut by :func:`clamp_pairs`, and the one closest to the float
    weights is kept: a channel with one large pair keeps its resolution and loses a few steps on that pair; a
    channel with many gets a larger scale. ``scale``: one per row, or a scalar shared by all rows.
    Returns (int8 rows, scales, rows changed)."""
    rows = np.asarray(rows, np.float64)
    shared = np.ndim(scale) == 0
    work = rows.reshape(1, -1) if shared else rows
    base = np.asarray(scale, np.float64).reshape(-1)
    q = _quantize(work, base)
    bad = overflow_rows(q)
    if not bad.any():
        return q.reshape(rows.shape).astype(np.int8), np.asarray(scale, np.float32), 0
    r, lo = work[bad], base[bad]
    hi = _no_clamp_scales(r, lo).astype(np.float64)
    best_q, best_s = _quantize(r, hi), hi.astype(np.float32)
    best_err = ((r - best_q * best_s[:, None].astype(np.float64)) ** 2).sum(axis=1)
    for t in np.linspace(0.0, 1.0, _GRID, endpoint=False):
        s = (lo * (hi / lo) ** t).astype(np.float32)
        cand = clamp_pairs(_quantize(r, s.astype(np.float64)))
        err = ((r - cand * s[:, None].astype(np.float64)) ** 2).sum(axis=1)
        better = err < best_err
        best_q[better], best_s[better], best_err[better] = cand[better], s[better], err[better]
    q[bad] = best_q
    out = np.asarray(scale, np.float32).reshape(-1).copy()
    out[bad] = best_s
    return q.reshape(rows.shape).astype(np.int8), (out.reshape(()) if shared else out), int(bad.sum())


def worst_pair(rows: np.ndarray) -> int:
    """The largest magnitude a pair sum of these int8 rows can reach with activation bytes in 0..255."""
    return int(pair_peaks(rows).max(initial=0)) * ACT_MAX
