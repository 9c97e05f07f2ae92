"""Cosine similarity per vector, streamed feed by feed: how embeddings and hidden states are compared.

A vector is a row of the last axis for outputs of rank 2 and 3 (an embedding [N, D], a token's hidden state
[N, T, D]), the whole sample for other ranks (a map). Each sample's cosine is the mean over its vectors. Kept: the
mean over all vectors and the worst sample's. Conventions as graphopt.metrics.channels.cosine: 1 when both vectors
are zero, 0 when one is, 0 for a vector whose candidate is not finite where the reference is.
"""

from __future__ import annotations

import numpy as np

__all__ = ["VectorCosines"]


class VectorCosines:
    def __init__(self) -> None:
        self.total = 0.0
        self.vectors = 0
        self.worst_sample = 1.0

    def add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        if ref.ndim == 0 or ref.size == 0:
            return
        rows = ref.shape[0] if ref.ndim > 1 else 1
        width = ref.shape[-1] if ref.ndim in (2, 3) else ref.size // rows
        r = ref.astype(np.float64, copy=False).reshape(rows, -1, width)
        c = cand.astype(np.float64, copy=False).reshape(rows, -1, width)
        broken = (~np.isfinite(c) & ~(c == r)).any(axis=-1)
        r, c = np.where(np.isfinite(r), r, 0.0), np.where(np.isfinite(c), c, 0.0)
        dot = np.einsum("ntd,ntd->nt", r, c)
        rr, cc = np.einsum("ntd,ntd->nt", r, r), np.einsum("ntd,ntd->nt", c, c)
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = np.clip(dot / np.sqrt(rr * cc), -1.0, 1.0)
        cos = np.where((rr <= 0) & (cc <= 0), 1.0, np.where((rr <= 0) | (cc <= 0), 0.0, cos))
        cos = np.where(broken | ~np.isfinite(cos), 0.0, cos)
        self.total += float(cos.sum())
        self.vectors += cos.size
        self.worst_sample = min(self.worst_sample, float(cos.mean(axis=1).min()))

    def result(self) -> tuple[float, float] | None:
        """(mean cosine over vectors, the worst sample's mean cosine); None before any vector."""
        return (self.total / self.vectors, self.worst_sample) if self.vectors else None
