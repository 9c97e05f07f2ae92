"""graphopt's rewrite passes, one module per family, and the registry of their names."""

from __future__ import annotations

from graphopt.passes.canonicalize import Canonicalize
from graphopt.passes.cleanup import Cleanup
from graphopt.passes.fold_batchnorm import FoldBatchNorm

# The one registry: recipe names → pass classes. A new pass family adds its classes here.
REGISTRY = {
    cls.name: cls
    for cls in (
        Canonicalize,
        FoldBatchNorm,
        Cleanup,
    )
}

__all__ = ["REGISTRY"]
