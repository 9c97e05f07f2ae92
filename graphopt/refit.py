"""Closed-form ridge refit of a linear layer from captured second moments (graphopt.capture.Moments).

    W, b = argmin ||X W + b - Y||² + λ·(trace(XᵀX)/d)·||W||²

λ is relative: it is scaled by the mean diagonal of XᵀX over the d input columns that take part, so one value
suits layers whose inputs have very different magnitudes. The bias is never penalised. The normal equations
are solved by Cholesky; when that fails or the matrix is numerically singular (duplicate or dead inputs with
λ≈0) an eigen-decomposition gives the minimum-norm solution instead, so the answer is always finite.

Moments layout: ``xtx`` is [d+1, d+1] and ``xty`` [d+1, d_out] with the bias column (ones) LAST.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphopt.capture import Moments
from graphopt.errors import GraphoptError
from graphopt.linear import LinearLayer

# Cholesky pivots smaller than this fraction of the largest mean a condition number beyond ~1e14.
_PIVOT_RATIO = 1e-7
_EIGEN_RCOND = 1e-12


def _solve_spd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a⁻¹ b for a symmetric positive semi-definite a; minimum-norm pseudo-inverse when singular."""
    if a.shape[0] == 0:
        return np.zeros((0, b.shape[1]))
    try:
        low = np.linalg.cholesky(a)
        pivots = np.diag(low)
        if pivots.min() > _PIVOT_RATIO * pivots.max():
            sol = np.linalg.solve(low.T, np.linalg.solve(low, b))
            if np.all(np.isfinite(sol)):
                return sol
    except np.linalg.LinAlgError:
        pass
    vals, vecs = np.linalg.eigh((a + a.T) / 2)
    top = vals.max() if vals.size else 0.0
    if top <= 0:
        return np.zeros((a.shape[0], b.shape[1]))
    ok = vals > _EIGEN_RCOND * top
    v = vecs[:, ok]
    return v @ ((v.T @ b) / vals[ok, None])


def _columns(keep: np.ndarray | None, d: int) -> np.ndarray:
    if keep is None:
        return np.arange(d)
    keep = np.asarray(keep)
    cols = np.flatnonzero(keep) if keep.dtype == bool else np.unique(keep.astype(np.int64))
    if cols.size and (cols[0] < 0 or cols[-1] >= d):
        raise GraphoptError(f"ridge: keep holds column {cols[-1] if cols[-1] >= d else cols[0]} "
                            f"outside 0..{d - 1}")
    return cols


def ridge(xtx: np.ndarray, xty: np.ndarray, lam: float = 1e-4, keep: np.ndarray | None = None,
          fit_bias: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(W [d_in, d_out], b [d_out]) from XᵀX [d_in+1, d_in+1] and XᵀY [d_in+1, d_out] (bias column last).

    ``keep``: indices (or a boolean mask) of the input columns that may be used; the others get zero rows.
    ``fit_bias=False``: b = 0 (the bias column is ignored)."""
    xtx, xty = np.asarray(xtx, np.float64), np.asarray(xty, np.float64)
    d = xtx.shape[0] - 1
    if xty.ndim == 1:
        xty = xty[:, None]
    cols = _columns(keep, d)
    idx = np.concatenate([cols, [d]]) if fit_bias else cols
    a = xtx[np.ix_(idx, idx)].copy()
    if cols.size:
        scale = np.trace(a[: cols.size, : cols.size]) / cols.size
        a[np.arange(cols.size), np.arange(cols.size)] += lam * (scale if scale > 0 else 1.0)
    sol = _solve_spd(a, xty[idx])
    w = np.zeros((d, xty.shape[1]))
    w[cols] = sol[: cols.size]
    b = sol[cols.size] if fit_bias else np.zeros(xty.shape[1])
    return w, b


def relative_error(moments: Moments, w: np.ndarray, b: np.ndarray) -> float:
    """||XW + b - Y||² / ||Y||² over the captured rows, computed from the moments alone."""
    if moments.xty is None or moments.yty is None:
        raise GraphoptError("relative_error needs moments captured with targets (y_rows)")
    wb = np.vstack([np.asarray(w, np.float64), np.asarray(b, np.float64).reshape(1, -1)])
    err = float(np.sum(wb * (moments.xtx @ wb)) - 2.0 * np.sum(wb * moments.xty) + moments.yty.sum())
    norm = float(moments.yty.sum())
    err = max(err, 0.0)  # cancellation can leave a tiny negative number
    return err / norm if norm > 0 else (0.0 if err == 0 else float("inf"))


# A refit needs this many calibration rows per unknown of one output (weights allowed to move, plus bias).
MIN_ROWS_PER_UNKNOWN = 2


@dataclass
class RefitResult:
    error_before: float  # relative error of the current weights, restricted to keep/mask
    error_after: float  # relative error of the refit weights
    changed: bool  # the refit weights were written into the layer
    rows: int = 0  # calibration rows the moments came from
    reason: str = ""  # why the layer was left as it was, when it was
    holdout_before: float | None = None  # relative error on held-out rows without / with the refit (holdout=)
    holdout_after: float | None = None


def refit_layer(layer: LinearLayer, moments: Moments, lam: float = 1e-4, keep: np.ndarray | None = None,
                mask: np.ndarray | None = None, fit_bias: bool | None = None,
                holdout: Moments | None = None) -> RefitResult:
    """Ridge-refit ``layer`` to the moments' targets; write it back only if the calibration error goes down.

    keep: input columns that stay (the rest become zero rows). mask: boolean [d_in, d_out] of weights allowed to
    be non-zero; each group of outputs with one mask pattern is refit on its own inputs, so pruned zeros stay
    zero (cost: one solve per distinct pattern). error_before is the error of the current weights with the
    removed/masked entries zeroed — what the layer would do without the refit.
    fit_bias: None = fit a bias when the layer has one or can take one without a new node (Gemm, Conv);
    False keeps the current bias fixed.
    holdout: moments (with targets) of rows the fit did not see; the refit is written only if it also lowers
    the error there (a lower in-sample error alone can be overfitting)."""
    d_in, d_out = layer.d_in, layer.d_out
    if moments.d_in != d_in or moments.d_out != d_out or moments.xty is None:
        raise GraphoptError(f"layer {layer.name!r}: moments are {moments.d_in}x{moments.d_out}, the layer "
                            f"{d_in}x{d_out} (or were captured without targets)")
    if fit_bias is None:
        fit_bias = layer.bias is not None or layer.kind != "matmul"
    w0, b0 = layer.matrix(), layer.bias_vector()
    allowed = np.zeros(d_in, dtype=bool)
    allowed[_columns(keep, d_in)] = True
    allowed = np.repeat(allowed[:, None], d_out, axis=1)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (d_in, d_out):
            raise GraphoptError(f"layer {layer.name!r}: mask shape {mask.shape}, expected {(d_in, d_out)}")
        allowed &= mask
    before = relative_error(moments, np.where(allowed, w0, 0.0), b0)
    unknowns = int(allowed.sum(axis=0).max(initial=0)) + int(fit_bias)
    if moments.rows < MIN_ROWS_PER_UNKNOWN * unknowns:
        # Fewer rows than unknowns fit the calibration rows exactly and generalize worse (measured: error on
        # other inputs 0.52 -> 0.79 while the calibration error fell to 3e-9), so refuse rather than overfit.
        return RefitResult(before, before, False, moments.rows,
                           f"{moments.rows} calibration rows for {unknowns} unknowns per output: not refit "
                           f"(needs {MIN_ROWS_PER_UNKNOWN}x; give more calibration samples)")

    # With the bias held fixed, fit W to Y - b0: XᵀY' = XᵀY - (Xᵀ1) b0ᵀ.
    xty = moments.xty if fit_bias else moments.xty - np.outer(moments.xtx[:, -1], b0)
    w, b = np.zeros((d_in, d_out)), b0.copy()
    patterns, groups = np.unique(allowed.T, axis=0, return_inverse=True)
    for g, pattern in enumerate(patterns):
        outs = np.flatnonzero(groups.reshape(-1) == g)
        w_g, b_g = ridge(moments.xtx, xty[:, outs], lam, keep=np.flatnonzero(pattern), fit_bias=fit_bias)
        w[:, outs] = w_g
        if fit_bias:
            b[outs] = b_g
    after = relative_error(moments, w, b)
    changed = bool(np.all(np.isfinite(w)) and after < before * (1.0 - 1e-9))
    held: tuple[float | None, float | None] = (None, None)
    reason = ""
    if changed and holdout is not None and holdout.rows:
        if holdout.d_in != d_in or holdout.d_out != d_out or holdout.xty is None:
            raise GraphoptError(f"layer {layer.name!r}: held-out moments are {holdout.d_in}x{holdout.d_out}, the "
                                f"layer {d_in}x{d_out} (or were captured without targets)")
        held = (relative_error(holdout, np.where(allowed, w0, 0.0), b0), relative_error(holdout, w, b))
        if not held[1] < held[0]:
            changed = False
            reason = f"held-out error {held[1]:.4g} with the refit, {held[0]:.4g} without: kept the current weights"
    if changed:
        layer.set_matrix(w, b if fit_bias or layer.bias is not None else None)
    return RefitResult(before, after, changed, moments.rows, reason, *held)


def dependency_waves(model: ir.Model, nodes: list[ir.Node]) -> dict[ir.Node, int]:
    """Dependency wave of each listed layer node: 1 + the largest wave of the listed layers upstream of it
    (main graph). Layers of one wave can be refit from one data pass; a later wave needs the earlier ones
    written first, else each layer learns to undo upstream damage that its repaired upstream no longer makes."""
    wanted = set(nodes)
    level: dict[ir.Value, int] = {}
    waves: dict[ir.Node, int] = {}
    for node in model.graph:
        lvl = max((level.get(v, 0) for v in node.inputs if v is not None), default=0)
        if node in wanted:
            waves[node] = lvl
            lvl += 1
        for out in node.outputs:
            level[out] = lvl
    return {n: waves.get(n, 0) for n in nodes}
