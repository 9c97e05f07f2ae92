"""How graphopt writes numbers, tables and JSON: one of each, for reports, `inspect`, `bench` and the scripts."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np


def human(n: int | float | None, unit: str = "") -> str:
    """1234567 -> '1.23M'; bytes in decimal steps too (272048 B -> '272.05 kB'); None -> '-'."""
    if n is None:
        return "-"
    space = " " if unit == "B" else ""
    for suffix, step in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= step:
            return f"{n / step:.2f}{space}{suffix}{unit}"
    return f"{n:g}{space}{unit}" if isinstance(n, float) else f"{int(n)}{space}{unit}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], align_numbers: bool = True) -> str:
    """A plain-text table under a dashed rule: the first column left-aligned, the others right-aligned (or all
    left-aligned with ``align_numbers=False``)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, ["-" * w for w in widths], *rows]:
        cells = [str(c).ljust(w) if i == 0 or not align_numbers else str(c).rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def json_safe(obj: Any) -> Any:
    """``obj`` as plain JSON values: numpy scalars and small arrays unwrapped, NaN/inf as null, keys as strings,
    anything else as its string."""
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        return [json_safe(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray) and obj.size <= 16:
        return json_safe(obj.tolist())
    return str(obj)
