"""User-facing errors: one clear line, exit code 2 on the command line."""

from __future__ import annotations


class GraphoptError(Exception):
    """Bad input or usage. The message is one line that names what is wrong."""


class RecipeError(GraphoptError):
    """A recipe names an unknown pass, option or value."""


class DataError(GraphoptError):
    """Input data does not fit the model (names, dtypes, ranks) or cannot be read."""


def first_line(err: BaseException, limit: int | None = 300, with_type: bool = True) -> str:
    """One line for a report or an error message: ``Type: first line of the message`` (cut at ``limit``);
    ``with_type=False``: the first line alone (the type name when the message is empty)."""
    text = str(err).strip()
    line = text.splitlines()[0] if text else ""
    if not with_type:
        line = line or type(err).__name__
    else:
        line = f"{type(err).__name__}: {line}"
    return line if limit is None else line[:limit]
