"""fuse as one package: spelled-out activations, norms and attention → single ops; Conv + per-channel Mul/Add
folded.

Modules, bottom to top (each imports only those above it in this list):
- :mod:`match` — what a matcher returns (:class:`Match`, or a :class:`Miss` with its reason), the near-miss
  tally, and the small graph readers every matcher uses;
- :mod:`activations` — HardSwish, HardSigmoid, SiLU and Mish matchers and their building blocks;
- :mod:`gelu` — GELU (Erf and tanh forms) and bias + GELU, read as polynomials in x;
- :mod:`layernorm` — the LayerNorm matcher;
- :mod:`skiplayernorm` — Add (+ bias) + LayerNormalization → SkipLayerNormalization;
- :mod:`heads` — reading an attention's head split and merge: Reshape targets, dims by symbol, Shape side chains;
- :mod:`attention` — the attention subgraph → MultiHeadAttention;
- :mod:`conv_affine` — folding a Conv's Mul/Add/Sub/Div-by-constant consumer into its weight and bias;
- :mod:`fuse` — the pass, :class:`Fuse`: runs the families, checks and rewrites each match, reports near-misses.
"""

from __future__ import annotations

from graphopt.passes.fuse.fuse import DEFAULT_FAMILIES, FAMILIES, MATCHERS, Fuse
from graphopt.passes.fuse.match import Match, Miss

__all__ = ["DEFAULT_FAMILIES", "FAMILIES", "MATCHERS", "Fuse", "Match", "Miss"]
