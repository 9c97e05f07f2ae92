"""graphopt's rewrite passes, one module per family, and the registry of their names."""

from __future__ import annotations

from graphopt.passes.canonicalize import Canonicalize
from graphopt.passes.channels import ChannelPrune
from graphopt.passes.cleanup import Cleanup
from graphopt.passes.compact import Compact
from graphopt.passes.fold_batchnorm import FoldBatchNorm
from graphopt.passes.distill import Distill
from graphopt.passes.fuse import Fuse
from graphopt.passes.gap import Gap
from graphopt.passes.kmeans import KMeans
from graphopt.passes.lowrank import LowRank
from graphopt.passes.nbits import NBits
from graphopt.passes.prune import Prune
from graphopt.passes.quantize import BiasCorrect, Quantize, QuantizeDynamic

# The one registry: recipe names → pass classes. A new pass family adds its classes here.
REGISTRY = {
    cls.name: cls
    for cls in (
        Canonicalize,
        FoldBatchNorm,
        Fuse,
        Prune,
        KMeans,
        ChannelPrune,
        LowRank,
        Gap,
        Distill,
        Quantize,
        QuantizeDynamic,
        NBits,
        BiasCorrect,
        Compact,
        Cleanup,
    )
}

__all__ = ["REGISTRY"]
