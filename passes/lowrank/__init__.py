"""lowrank as one package: Gemm/MatMul/Conv layers factorized into thinner ones (SVD, spatial, Tucker-2, basis).

Modules, bottom to top (each imports only those above it in this list):
- :mod:`geometry` — what a layer's cost depends on, and the MACs/params of each scheme at given ranks;
- :mod:`schemes` — the factorizations: candidate curves, whitening by the input covariance, the factor weights;
- :mod:`budget` — which candidate each layer takes: per layer, or one global MACs budget over convex hulls;
- :mod:`rewrite` — a layer becomes its factors (new nodes before it, the node itself the last factor);
- :mod:`lowrank` — the pass, :class:`LowRank`.
"""

from __future__ import annotations

from graphopt.passes.lowrank.budget import Choice, allocate
from graphopt.passes.lowrank.lowrank import LowRank

__all__ = ["Choice", "LowRank", "allocate"]
