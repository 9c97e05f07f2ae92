"""The factorizations behind `lowrank`: SVD (Gemm/MatMul/1x1 Conv), and spatial, Tucker-2 and basis for k×k Conv.

Every layer is seen through graphopt.linear's matrix view W [d_in, d_out] (conv: rows (c, k1, k2, ...)).
Error measures are relative and squared:
- weight space: ||W - Ŵ||² / ||W||²;
- data space (``Whitener``): E||x(W - Ŵ) + Δb||² / E||xW + b||² over the calibration rows (im2col rows for a
  conv), with the bias re-fitted to the input mean (Δb = μ(W - Ŵ) makes the error the centred one).
Data-aware SVD factorizes Lᵀ W (Σ = L Lᵀ the centred input covariance), keeps the top singular triplets and
unwhitens: the best rank-r output approximation (Eckart-Young in whitened coordinates). Spatial and Tucker
factors stay weight-based (their tensor structure does not whiten through one matrix); with data they still
get the bias re-fit and a data-space error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from graphopt.capture import Moments
from graphopt.passes.lowrank.geometry import Geometry

_GRID = 32  # Tucker rank pairs: at most this many values per mode
_FLOAT32_SVD_ABOVE = 4_000_000  # elements; bigger matrices are decomposed in float32 (time, not accuracy)


@dataclass
class Curve:
    """Candidate factorizations of one layer under one scheme."""

    scheme: str
    ranks: np.ndarray  # [K, 1] or [K, 2]
    macs: np.ndarray
    params: np.ndarray
    err2: np.ndarray  # relative squared error (the allocation's proxy)


class Whitener:
    """Input statistics of one layer from its calibration moments: mean, centred covariance and its Cholesky."""

    def __init__(self, moments: Moments, damping: float = 1e-5) -> None:
        n = max(moments.rows, 1)
        self.second = moments.xtx / n  # E[[x,1]ᵀ[x,1]]
        self.mean = self.second[-1, :-1].copy()
        cov = self.second[:-1, :-1] - np.outer(self.mean, self.mean)
        cov = (cov + cov.T) / 2.0
        scale = max(float(np.trace(cov)) / max(len(self.mean), 1), 1e-30)
        eye = np.eye(len(self.mean))
        for factor in (damping, damping * 100, damping * 1e4, 1.0):  # dead inputs make Σ singular
            try:
                self.chol = np.linalg.cholesky(cov + factor * scale * eye)
                break
            except np.linalg.LinAlgError:
                continue
        self.cov = self.chol @ self.chol.T

    def output_energy(self, w: np.ndarray, b: np.ndarray) -> float:
        wa = np.vstack([w, b[None, :]])
        return float(np.sum(wa * (self.second @ wa)))

    def error(self, dw: np.ndarray) -> float:
        """E||x ΔW - mean||²: the output error once the bias absorbs μΔW."""
        return float(np.sum(dw * (self.cov @ dw)))


def _svd(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if m.size > _FLOAT32_SVD_ABOVE:
        u, s, vt = np.linalg.svd(m.astype(np.float32), full_matrices=False)
        return u.astype(np.float64), s.astype(np.float64), vt.astype(np.float64)
    return np.linalg.svd(m, full_matrices=False)


def _tails(s: np.ndarray) -> np.ndarray:
    """tails[r-1] = Σ_{i>=r} s_i² for r = 1..len(s)."""
    energy = np.square(s)
    return np.maximum(energy.sum() - np.cumsum(energy), 0.0)


def _grid(full: int) -> np.ndarray:
    return np.unique(np.round(np.linspace(1, full, min(full, _GRID))).astype(np.int64))


class Factorizer:
    """All schemes of one layer: candidate curves, single points, and the factor weights."""

    def __init__(self, geom: Geometry, w: np.ndarray, b: np.ndarray, whitener: Whitener | None = None) -> None:
        self.g, self.w, self.b, self.white = geom, np.asarray(w, np.float64), np.asarray(b, np.float64), whitener
        self.norm2 = max(float(np.sum(np.square(self.w))), 1e-30)
        self.energy = max(whitener.output_energy(self.w, self.b), 1e-30) if whitener is not None else self.norm2
        self._cache: dict[str, tuple] = {}

    def data_aware(self, scheme: str) -> bool:
        return self.white is not None and scheme in ("svd", "basis")

    def weight4(self) -> np.ndarray:
        return self.w.T.reshape(self.g.d_out, self.g.channels, *self.g.kernel)

    # --- decompositions (cached) -------------------------------------------------------------------------
    def _matrix_svd(self) -> tuple:
        if "svd" not in self._cache:
            m = self.white.chol.T @ self.w if self.white is not None else self.w
            self._cache["svd"] = _svd(m)
        return self._cache["svd"]

    def _spatial_svd(self) -> tuple:
        if "spatial" not in self._cache:
            (c, n), (kh, kw) = (self.g.channels, self.g.d_out), self.g.kernel
            m = self.weight4().transpose(1, 2, 0, 3).reshape(c * kh, n * kw)  # [(c, p), (o, q)]
            self._cache["spatial"] = _svd(m)
        return self._cache["spatial"]

    def _tucker(self) -> tuple:
        """HOSVD: output- and input-mode bases and the core's cumulative energy table."""
        if "tucker" not in self._cache:
            w4 = self.weight4()
            n, c = w4.shape[:2]
            u_out = _svd(w4.reshape(n, -1))[0]
            u_in = _svd(np.moveaxis(w4, 1, 0).reshape(c, -1))[0]
            core = np.einsum("oc...,oa,cb->ab...", w4, u_out, u_in, optimize=True)
            e = np.square(core).reshape(core.shape[0], core.shape[1], -1).sum(axis=2)
            cum = np.zeros((e.shape[0] + 1, e.shape[1] + 1))
            cum[1:, 1:] = e.cumsum(0).cumsum(1)  # cum[r_out, r_in] = energy kept (orthogonal projections)
            self._cache["tucker"] = (u_out, u_in, core, cum)
        return self._cache["tucker"]

    def full_rank(self, scheme: str) -> tuple[int, ...]:
        if scheme in ("svd", "basis"):
            return (len(self._matrix_svd()[1]),)
        if scheme == "spatial":
            return (len(self._spatial_svd()[1]),)
        u_out, u_in = self._tucker()[:2]
        return (u_in.shape[1], u_out.shape[1])

    # --- candidates ----------------------------------------------------------------------------------------
    def _err2(self, scheme: str, ranks: np.ndarray) -> np.ndarray:
        if scheme in ("svd", "basis"):
            return _tails(self._matrix_svd()[1])[ranks[:, 0] - 1] / (self.energy if self.white else self.norm2)
        if scheme == "spatial":
            return _tails(self._spatial_svd()[1])[ranks[:, 0] - 1] / self.norm2
        cum = self._tucker()[3]
        return np.maximum(self.norm2 - cum[ranks[:, 1], ranks[:, 0]], 0.0) / self.norm2

    def _curve(self, scheme: str, ranks: np.ndarray) -> Curve:
        macs, params = self.g.cost(scheme, ranks)
        return Curve(scheme, ranks, macs, params, self._err2(scheme, ranks))

    def curve(self, scheme: str) -> Curve:
        """Every rank (tucker: a grid of rank pairs) of the scheme."""
        full = self.full_rank(scheme)
        if scheme == "tucker":
            r_in, r_out = np.meshgrid(_grid(full[0]), _grid(full[1]), indexing="ij")
            ranks = np.stack([r_in.reshape(-1), r_out.reshape(-1)], axis=1)
        else:
            ranks = np.arange(1, full[0] + 1).reshape(-1, 1)
        return self._curve(scheme, ranks)

    def point(self, scheme: str, rank: int) -> Curve:
        """The scheme at one fixed rank (clipped to full rank; tucker: the same rank on both modes)."""
        ranks = np.minimum(np.array([[rank] * len(self.full_rank(scheme))]), np.array([self.full_rank(scheme)]))
        return self._curve(scheme, ranks)

    # --- factors ---------------------------------------------------------------------------------------------
    def factors(self, scheme: str, ranks: tuple[int, ...]) -> tuple[list[np.ndarray], np.ndarray]:
        """(factor weights, Ŵ in the matrix view). svd: matrices A [d_in, r], B [r, d_out]; conv schemes:
        conv weights in execution order (basis: k×k then 1×1; spatial: k×1 then 1×k; tucker: 1×1, k×k, 1×1)."""
        g = self.g
        if scheme in ("svd", "basis"):
            u, s, vt = self._matrix_svd()
            r = ranks[0]
            root = np.sqrt(s[:r])
            a, b = u[:, :r] * root, root[:, None] * vt[:r]
            if self.white is not None:
                a = np.linalg.solve(self.white.chol.T, a)  # unwhiten: Ŵ = L⁻ᵀ U_r S_r V_rᵀ
            w_hat = a @ b
            if g.kind != "conv":
                return [a, b], w_hat
            ones = (1,) * len(g.kernel)
            return [a.T.reshape(r, g.channels, *g.kernel), b.T.reshape(g.d_out, r, *ones)], w_hat
        if scheme == "spatial":
            u, s, vt = self._spatial_svd()
            r, (kh, kw) = ranks[0], g.kernel
            root = np.sqrt(s[:r])
            vertical = (u[:, :r] * root).T.reshape(r, g.channels, kh, 1)
            horizontal = (root[:, None] * vt[:r]).reshape(r, g.d_out, kw).transpose(1, 0, 2)[:, :, None, :]
            w4 = np.einsum("rcp,orq->ocpq", vertical[..., 0], horizontal[:, :, 0, :])
            return [vertical, horizontal], w4.reshape(g.d_out, -1).T
        u_out, u_in, core, _ = self._tucker()
        r_in, r_out = ranks
        ones = (1,) * len(g.kernel)
        first = u_in[:, :r_in].T.reshape(r_in, g.channels, *ones)
        middle = core[:r_out, :r_in]
        last = u_out[:, :r_out].reshape(g.d_out, r_out, *ones)
        w4 = np.einsum("ab...,oa,cb->oc...", middle, u_out[:, :r_out], u_in[:, :r_in], optimize=True)
        return [first, middle, last], w4.reshape(g.d_out, -1).T

    def report_error(self, w_hat: np.ndarray) -> tuple[float, str]:
        """(relative output error, 'data'|'weight'): data space when calibration statistics exist."""
        dw = self.w - w_hat
        if self.white is not None:
            return math.sqrt(max(self.white.error(dw), 0.0) / self.energy), "data"
        return math.sqrt(float(np.sum(np.square(dw))) / self.norm2), "weight"

    def bias_correction(self, w_hat: np.ndarray) -> np.ndarray | None:
        """b + μ(W - Ŵ): the bias that keeps the mean output (data-aware only)."""
        if self.white is None:
            return None
        return self.b + self.white.mean @ (self.w - w_hat)


def pareto(curve: Curve, limit: float, by: np.ndarray | None = None) -> np.ndarray:
    """Indices of candidates with cost below ``limit`` that no cheaper candidate beats on error."""
    cost = curve.macs if by is None else by
    idx = np.flatnonzero(cost < limit)
    if idx.size == 0:
        return idx
    order = idx[np.lexsort((curve.err2[idx], cost[idx]))]  # cheapest first
    errs = curve.err2[order]
    best_before = np.concatenate([[np.inf], np.minimum.accumulate(errs)[:-1]])
    return order[errs < best_before]
