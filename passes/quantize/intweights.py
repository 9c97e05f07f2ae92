"""int8 weights and int32 biases: symmetric per-channel (or per-tensor) quantization, pair-safe for saturating
u8×s8 kernels when given a kernel order, and reused within one pass run.

Pair-safe quantization (:func:`graphopt.saturation.safe_quantize`) searches scales row by row over float64
copies: an 8192×8192 Gemm weight took minutes and gigabytes of temporaries in one call. Rows are independent,
so they go through in blocks of :data:`BLOCK_ELEMENTS` (the same integers, a bounded working set). Quantize
builds its candidate models (sensitivity, accuracy budget, timing) on clones that share the weight tensors, so
inside :func:`reusing` each (weight tensor, axis, kernel order) is quantized once.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import onnx_ir as ir

from graphopt import saturation

BLOCK_ELEMENTS = 1 << 20  # weights per block of rows in pair-safe quantization (8 MB of float64)

_reused: dict[tuple, tuple[ir.TensorProtocol, tuple[np.ndarray, np.ndarray, int]]] | None = None


@contextlib.contextmanager
def reusing() -> Iterator[None]:
    """Within: :func:`quantize_tensor` quantizes each tensor once per axis and order (one pass run)."""
    global _reused
    outer, _reused = _reused, {} if _reused is None else _reused
    try:
        yield
    finally:
        _reused = outer


def quantize_tensor(tensor: ir.TensorProtocol, axis: int | None, order: saturation.KernelOrder | None = None
                    ) -> tuple[np.ndarray, np.ndarray, int]:
    """:func:`quantize_weight_safe` of an initializer's tensor; inside :func:`reusing`, computed once (the
    tensor is held until the scope ends, so its id cannot be reused)."""
    if _reused is None:
        return _quantize_and_unmap(tensor, axis, order)
    key = (id(tensor), axis, order)
    if key not in _reused:
        _reused[key] = (tensor, _quantize_and_unmap(tensor, axis, order))
    return _reused[key][1]


def _quantize_and_unmap(tensor: ir.TensorProtocol, axis: int | None, order: saturation.KernelOrder | None
                        ) -> tuple[np.ndarray, np.ndarray, int]:
    try:
        return quantize_weight_safe(tensor.numpy(), axis, order)
    finally:
        unmap(tensor)


def unmap(tensor: ir.TensorProtocol | None) -> None:
    """Close an external tensor's memory map once it was read: the file's pages it touched count in the process's
    resident memory until then (a 2.4 GB model's weights, once quantized), and a later read maps it again."""
    release = getattr(tensor, "release", None) if isinstance(tensor, ir.ExternalTensor) else None
    if release is not None:
        with contextlib.suppress(BufferError):  # someone still holds an array on the map: it stays
            release()


def quantize_weight(w: np.ndarray, axis: int | None, order: saturation.KernelOrder | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """int8 symmetric weights in [-127, 127] and float32 scales (one per index of ``axis``, or a scalar)."""
    q, scale, _ = quantize_weight_safe(w, axis, order)
    return q, scale


def quantize_weight_safe(w: np.ndarray, axis: int | None, order: saturation.KernelOrder | None = None
                         ) -> tuple[np.ndarray, np.ndarray, int]:
    """:func:`quantize_weight` and how many channels were made pair-safe.

    With a kernel ``order``, the channels whose neighbouring weights could overflow a saturating u8×s8 kernel's
    int16 pair sum are requantized so they cannot (:func:`graphopt.saturation.safe_quantize`)."""
    w = np.asarray(w, dtype=np.float32)
    if axis is None:
        peak = np.float32(np.abs(w).max()) if w.size else np.float32(0)
        scale = np.asarray(np.float32(peak / 127.0) if peak > 0 else np.float32(1.0), np.float32)
        shape = ()
    else:
        moved = np.moveaxis(w, axis, 0)
        peak = np.abs(moved.reshape(moved.shape[0], -1)).max(axis=1) if w.size else np.zeros(w.shape[axis])
        scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
        shape = [1] * w.ndim
        shape[axis] = -1
    if order is not None and w.size:  # each channel's kernel rows side by side: one row of pairs per scale
        rows = order.rows(w)
        q_rows, scale, changed = _safe_rows(rows.reshape(scale.size, -1), scale)
        return order.unrows(q_rows.reshape(rows.shape), w.shape).astype(np.int8), scale, changed
    q = w / scale.reshape(shape)  # one float32 temporary: in place from here
    np.clip(np.round(q, out=q), -127, 127, out=q)
    return q.astype(np.int8), scale, 0


def _safe_rows(rows: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """:func:`graphopt.saturation.safe_quantize` in blocks of rows (one scale per row: rows are independent; a
    shared scalar scale couples them, so then in one go)."""
    if scale.ndim == 0 or rows.size <= BLOCK_ELEMENTS:
        return saturation.safe_quantize(rows, scale)
    step = max(1, BLOCK_ELEMENTS // max(rows.shape[1], 1))
    q = np.empty(rows.shape, np.int8)
    out = np.empty_like(scale)
    changed = 0
    for start in range(0, rows.shape[0], step):
        end = start + step
        q[start:end], out[start:end], n = saturation.safe_quantize(rows[start:end], scale[start:end])
        changed += n
    return q, out, changed


def quantize_bias(b: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """round(b / scale) as int32 (saturating: a bias beyond 2^31 steps cannot be represented anyway)."""
    info = np.iinfo(np.int32)
    q = np.round(np.asarray(b, np.float64) / np.asarray(scale, np.float64))
    return np.clip(q, info.min, info.max).astype(np.int32)
