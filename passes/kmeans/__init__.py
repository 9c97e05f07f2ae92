"""kmeans as one package: weight sharing through k-means codebooks, weight = Gather(codebook, Cast(indices)).

Modules, bottom to top (each imports only those above it in this list):
- :mod:`kmeans1d` — weighted 1-D k-means: exact on sorted distinct values, and a histogram variant for large arrays;
- :mod:`codebook` — one weight clustered into a per-layer or per-channel codebook, its reconstruction and error;
- :mod:`importance` — ``data_aware``: per-element error weights from the layer inputs on calibration data;
- :mod:`refit` — ``refit``: centroids (and bias) solved by least squares to the float layers' outputs;
- :mod:`widths` — per-layer bit widths, ``bits=auto`` inside the budget, and the refit of the chosen widths;
- :mod:`kmeans` — the pass, :class:`KMeans`: finds the weights, clusters them, rewrites each into a Gather.
"""

from __future__ import annotations

from graphopt.passes.kmeans.codebook import Codebook, quantize
from graphopt.passes.kmeans.kmeans import KMeans

__all__ = ["Codebook", "KMeans", "quantize"]
