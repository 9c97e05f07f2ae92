"""Block-wise N-bit weights in onnxruntime's MatMulNBits layout: choosing each block's scale and zero point,
rounding to nearest, dequantizing, and packing the bytes.

A weight W [K, N] (MatMul's B: K inputs, N outputs) is cut along K into blocks of ``block_size`` rows per output
column; the last block is padded with zeros. Every block has a float32 scale and a code zero point:
ŵ = (code - zero_point) · scale, codes in [0, 2^bits).

- symmetric: the zero point is the kernel's default 2^(bits-1) (no zero-point tensor is stored); the scale maps
  the block's largest-magnitude value m onto code 0 (scale = m / -2^(bits-1), negative when m > 0), so that side
  gets the full 2^(bits-1) levels and the other side one fewer;
- asymmetric: the range [min(v, 0), max(v, 0)] spans the 2^bits codes and the zero point is stored per block.

``clip_search``: the range is also tried shrunk by each factor of ``CLIP_FACTORS`` and each block keeps the one with
the least squared error (outliers cost the rest of the block less).

Layout (onnxruntime's contrib op spec): B uint8 [N, n_blocks, block_size·bits/8], codes packed along K, the first
in the lowest bits of a byte; scales [N · n_blocks]; zero points packed the same way, each output column's row
padded to whole bytes: [N · ceil(n_blocks·bits/8)].
"""

from __future__ import annotations

import dataclasses

import numpy as np

CLIP_FACTORS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
BITS = (2, 4, 8)
BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits: a power of two, at least 16


@dataclasses.dataclass(frozen=True)
class BlockQuant:
    """One quantized weight: codes [N, n_blocks, block_size] uint8, scales [N, n_blocks] float32, zero points
    [N, n_blocks] uint8 (None: symmetric, the kernel's default 2^(bits-1)), for a weight of ``k`` rows."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    k: int
    bits: int
    block_size: int

    @property
    def n(self) -> int:
        return self.codes.shape[0]

    @property
    def n_blocks(self) -> int:
        return self.codes.shape[1]

    def dequantize(self) -> np.ndarray:
        """Ŵ [K, N] float32, what the kernel multiplies by."""
        zp = self.zero_points if self.zero_points is not None else np.full(self.scales.shape, 1 << (self.bits - 1))
        w = (self.codes.astype(np.float32) - zp[..., None].astype(np.float32)) * self.scales[..., None]
        return np.ascontiguousarray(w.reshape(self.n, -1)[:, :self.k].T)

    def packed(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(B [N, n_blocks, blob], scales [N·n_blocks], zero points [N·ceil(n_blocks·bits/8)] or None)."""
        b = pack(self.codes, self.bits)
        zp = None
        if self.zero_points is not None:
            per = 8 // self.bits
            padded = np.zeros((self.n, -(-self.n_blocks // per) * per), np.uint8)
            padded[:, :self.n_blocks] = self.zero_points
            zp = pack(padded, self.bits).reshape(-1)
        return b, np.ascontiguousarray(self.scales.reshape(-1)), zp

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.packed() if a is not None)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes (last axis a multiple of 8/bits) into bytes, the first code in the lowest bits."""
    per = 8 // bits
    grouped = codes.reshape(*codes.shape[:-1], -1, per).astype(np.uint8)
    out = np.zeros(grouped.shape[:-1], np.uint8)
    for i in range(per):
        out |= grouped[..., i] << np.uint8(i * bits)
    return out


def packed_bytes(k: int, n: int, bits: int, block_size: int, symmetric: bool) -> int:
    """Bytes of B, scales and zero points for a [k, n] weight, without quantizing it."""
    blocks = -(-k // block_size)
    zp = 0 if symmetric else n * -(-blocks * bits // 8)
    return n * blocks * block_size * bits // 8 + 4 * n * blocks + zp


def block_params(v: np.ndarray, bits: int, symmetric: bool, clip_search: bool
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(scale float32, zero point) per block of ``v`` [..., block] (blocks along the last axis)."""
    best = None
    for factor in CLIP_FACTORS if clip_search else CLIP_FACTORS[:1]:
        scale, zp = _range_params(v, bits, symmetric, factor)
        err = np.square(dequantize(quantize(v, scale[..., None], zp[..., None], bits), scale[..., None],
                                   zp[..., None]) - v).sum(axis=-1)
        if best is None:
            best = (scale, zp, err)
            continue
        better = err < best[2]
        best = (np.where(better, scale, best[0]), np.where(better, zp, best[1]), np.minimum(err, best[2]))
    return best[0], best[1]


def _range_params(v: np.ndarray, bits: int, symmetric: bool, factor: float) -> tuple[np.ndarray, np.ndarray]:
    top = (1 << bits) - 1
    if symmetric:
        idx = np.abs(v).argmax(axis=-1)[..., None]
        peak = np.take_along_axis(v, idx, axis=-1)[..., 0] * factor
        scale = (peak / -(1 << (bits - 1))).astype(np.float32)
        zp = np.full(scale.shape, 1 << (bits - 1), np.float64)
    else:
        lo = np.minimum(v.min(axis=-1), 0.0) * factor
        hi = np.maximum(v.max(axis=-1), 0.0) * factor
        scale = ((hi - lo) / top).astype(np.float32)
        safe = np.where(scale == 0, 1.0, scale)
        zp = np.clip(np.round(-lo / safe), 0, top)
    scale = np.where(scale == 0, np.float32(1.0), scale)  # an all-zero block: any scale, codes at the zero point
    return scale, zp


def quantize(v: np.ndarray, scale: np.ndarray, zp: np.ndarray, bits: int) -> np.ndarray:
    """Codes (float64, whole numbers in [0, 2^bits)) of ``v`` for broadcastable scale and zero point."""
    return np.clip(np.round(v / scale) + zp, 0, (1 << bits) - 1)


def dequantize(codes: np.ndarray, scale: np.ndarray, zp: np.ndarray) -> np.ndarray:
    return (codes - zp) * scale.astype(np.float64)


def blocked(w: np.ndarray, block_size: int) -> np.ndarray:
    """W [K, N] as [N, n_blocks, block_size], K padded with zeros to whole blocks."""
    k, n = w.shape
    padded = np.zeros((-(-k // block_size) * block_size, n), np.float64)
    padded[:k] = w
    return padded.T.reshape(n, -1, block_size)


def assemble(codes: np.ndarray, scales: np.ndarray, zp: np.ndarray, k: int, bits: int, block_size: int,
             symmetric: bool) -> BlockQuant:
    """A BlockQuant from codes [N, n_blocks, block], scales and zero points [N, n_blocks]."""
    return BlockQuant(codes.astype(np.uint8), scales.astype(np.float32),
                      None if symmetric else zp.astype(np.uint8), k, bits, block_size)


def round_to_nearest(w: np.ndarray, bits: int, block_size: int, symmetric: bool, clip_search: bool) -> BlockQuant:
    """Every block of W [K, N] rounded to its nearest codes."""
    v = blocked(w, block_size)
    scale, zp = block_params(v, bits, symmetric, clip_search)
    codes = quantize(v, scale[..., None], zp[..., None], bits)
    return assemble(codes, scale, zp, w.shape[0], bits, block_size, symmetric)
