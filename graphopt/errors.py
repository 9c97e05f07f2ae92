"""User-facing errors: one clear line, exit code 2 on the command line."""

from __future__ import annotations


class GraphoptError(Exception):
    """Bad input or usage. The message is one line that names what is wrong."""


class RecipeError(GraphoptError):
    """A recipe names an unknown pass, option or value."""


class DataError(GraphoptError):
    """Input data does not fit the model (names, dtypes, ranks) or cannot be read."""
