"""nbits as one package: MatMul weights as onnxruntime's MatMulNBits, block-wise N-bit codes kept packed in memory.

Modules, bottom to top (each imports only those above it in this list):
- :mod:`support` — which code widths the installed onnxruntime's kernels run (2 bits came after 4 and 8);
- :mod:`blocks` — block scales and zero points, round to nearest, dequantization, the MatMulNBits byte layout;
- :mod:`gptq` — the data-aware variant: rows quantized in order, errors compensated through the inverse Hessian;
- :mod:`gather` — embedding tables (Gather) as GatherBlockQuantized, rounded to nearest (option ``embeddings``);
- :mod:`hessians` — XᵀX of each layer input over the calibration feeds;
- :mod:`rewrite` — which MatMul/Gemm can become MatMulNBits, and the rewrite;
- :mod:`select` — each layer's width: all at ``bits``, or inside the run's accuracy budget;
- :mod:`nbits` — the pass, :class:`NBits`.
"""

from __future__ import annotations

from graphopt.passes.nbits.blocks import BlockQuant, round_to_nearest
from graphopt.passes.nbits.gptq import gptq
from graphopt.passes.nbits.nbits import NBits

__all__ = ["BlockQuant", "NBits", "gptq", "round_to_nearest"]
