"""graphopt: an ONNX graph-level model optimizer verified with onnxruntime."""

from __future__ import annotations

from graphopt.errors import DataError, GraphoptError, RecipeError

__version__ = "0.1.0"

__all__ = ["DataError", "GraphoptError", "RecipeError", "optimize", "__version__"]


def optimize(*args, **kwargs):
    """Run a recipe on a model and return the report; see graphopt.pipeline.optimize."""
    from graphopt.pipeline import optimize as _optimize

    return _optimize(*args, **kwargs)
