"""Data-aware block-wise quantization, GPTQ-style (Frantar et al., 2022): the weight's input rows are quantized in
order and each row's rounding error is spread over the rows not yet quantized, weighted by the inverse Hessian of
the layer's inputs, so the layer's outputs on the calibration activations move as little as it allows.

For y = x·W, the output error of a change Δ of W is tr(Δᵀ H Δ) with H = XᵀX over the calibration rows. Rows
are taken in order k = 0..K-1; with U the upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU), quantizing row k leaves
the error e = (w_k - ŵ_k) / U[k, k], and rows j > k absorb it: w_j -= U[k, j] · e, the least-squares optimal
update of the remaining rows (optimal brain surgeon, in Cholesky form). Updates are applied lazily in chunks of
rows, a multiple of the block size, so each block's scale and zero point are chosen (:func:`blocks.block_params`)
from its rows as they stand when the block is reached, after every earlier row's compensation.

H is damped by ``damp`` · mean(diag H) on its diagonal (a singular H from few or collinear rows stays
invertible); inputs that never fire (H[k, k] = 0) get H[k, k] = 1 and a zero weight row, which no output sees.
"""

from __future__ import annotations

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.passes.nbits.blocks import BlockQuant, assemble, block_params, dequantize, quantize

LAZY_ROWS = 128  # rows whose updates are applied together (rounded up to a whole number of blocks)


def inverse_factor(h: np.ndarray, damp: float, rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(U, dead) for H [K, K] padded with dead inputs to ``rows``: the upper Cholesky factor of the damped H⁻¹
    (H⁻¹ = UᵀU), and which inputs never fire. Layers reading one input share it.

    One Cholesky factorization, of H with its order reversed: with J the exchange matrix and JHJ = LLᵀ,
    U = J L⁻¹ J is upper triangular and UᵀU = J (JHJ)⁻¹ J = H⁻¹."""
    k = h.shape[0]
    full = np.zeros((rows or k, rows or k))
    full[:k, :k] = h
    dead = np.diag(full) <= 0
    full[dead, dead] = 1.0
    live = np.diag(full)[~dead]
    full[np.diag_indices_from(full)] += damp * (float(live.mean()) if live.size else 1.0)
    try:
        lower = np.linalg.cholesky(full[::-1, ::-1])
    except np.linalg.LinAlgError as err:
        raise GraphoptError(f"the inputs' Hessian is not positive definite after damping ({err}); raise damp")
    return np.ascontiguousarray(np.linalg.inv(lower)[::-1, ::-1]), dead


def padded_rows(k: int, block_size: int) -> int:
    return -(-k // block_size) * block_size


def gptq(w: np.ndarray, factor: tuple[np.ndarray, np.ndarray], bits: int, block_size: int, symmetric: bool,
         clip_search: bool) -> BlockQuant:
    """W [K, N] quantized with ``factor`` = :func:`inverse_factor` of the inputs' XᵀX, padded to whole blocks."""
    k, n = w.shape
    upper, dead = factor
    rows = padded_rows(k, block_size)
    if upper.shape != (rows, rows):
        raise GraphoptError(f"inverse Hessian factor of shape {upper.shape} for a weight of {k} input rows")
    work = np.zeros((rows, n))
    work[:k] = w
    work[dead] = 0.0
    codes = np.zeros((rows, n))
    scales = np.zeros((rows // block_size, n), np.float32)
    zps = np.zeros((rows // block_size, n))
    lazy = -(-LAZY_ROWS // block_size) * block_size
    for start in range(0, rows, lazy):
        stop = min(start + lazy, rows)
        chunk = work[start:stop].copy()
        errors = np.zeros_like(chunk)
        u = upper[start:stop, start:stop]
        for j in range(stop - start):
            row = start + j
            if row % block_size == 0:  # a new block: its range from its rows as they stand now
                g = row // block_size
                scales[g], zps[g] = block_params(chunk[j:j + block_size].T, bits, symmetric, clip_search)
                scale, zp = scales[g], zps[g]
            codes[row] = quantize(chunk[j], scale, zp, bits)
            err = (chunk[j] - dequantize(codes[row], scale, zp)) / u[j, j]
            chunk[j + 1:] -= np.outer(u[j, j + 1:], err)
            errors[j] = err
        work[stop:] -= upper[start:stop, stop:].T @ errors
    codes = codes.T.reshape(n, -1, block_size)
    return assemble(codes, scales.T, zps.T, k, bits, block_size, symmetric)


def output_error(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> float:
    """Relative output error on the calibration rows: sqrt(tr(Δᵀ H Δ) / tr(Wᵀ H W)), Δ = Ŵ - W."""
    delta = w_hat.astype(np.float64) - w
    num = float(np.sum((h @ delta) * delta))
    den = float(np.sum((h @ w) * w))
    return float(np.sqrt(max(num, 0.0) / den)) if den > 0 else 0.0
