"""kmeans bit widths per layer: given by the user (one width, or a mapping), or ``bits=auto``: chosen inside the
run's accuracy budget.

``auto`` measures every layer alone at each width of ``levels`` on calibration data (the weight replaced by its
codebook reconstruction, which is what the Gather computes), gives each width its gain in stored bytes, and lets
:func:`graphopt.sensitivity.seek_budget` keep the furthest point of the gentle-to-aggressive path whose whole
model keeps the budget. Layers the budget cannot afford at any width stay float.
"""

from __future__ import annotations

import numpy as np

from graphopt.passbase import PassContext
from graphopt.passes.kmeans.codebook import Codebook, quantize
from graphopt.passes.kmeans.importance import importance_of
from graphopt.sensitivity import Candidate, Ladder, measure, row_loss, seek_budget
from graphopt.weight_targets import Target, per_target, weight_editor


class Books:
    """Codebooks by (layer, bits), each clustered once (auto measures a width, then the pass writes it)."""

    def __init__(self, options, energy: dict[str, np.ndarray]) -> None:
        self.options, self.energy = options, energy
        self._books: dict[tuple[str, int], Codebook] = {}
        self._half: set[tuple[str, int]] = set()  # (layer, bits) whose codebook is written as float16

    def importance(self, t: Target) -> np.ndarray | None:
        return importance_of(t, self.energy[t.layer]) if t.layer in self.energy else None

    def get(self, t: Target, bits: int) -> Codebook:
        key = (t.layer, bits)
        if key not in self._books:
            o = self.options
            book = quantize(t.array, bits, o.init, self.importance(t), o.per_channel or bits == 1, t.out_axis,
                            o.seed)
            if o.half_codebook and book.codebook.dtype == np.float32 and fits_float16(book.codebook):
                # rounded here, so sensitivity, the reported errors and the file all see the stored centroids
                book.codebook = book.codebook.astype(np.float16).astype(np.float32)
                self._half.add(key)
            self._books[key] = book
        return self._books[key]

    def is_half(self, t: Target, bits: int) -> bool:
        return (t.layer, bits) in self._half


def fits_float16(values: np.ndarray) -> bool:
    return bool(np.all(np.abs(values) <= np.finfo(np.float16).max))


def widths(context: PassContext, model, targets: list[Target], books: Books,
           notes: list[str]) -> dict[str, int]:
    """layer → bits for every target that gets a codebook."""
    bits = books.options.bits
    if isinstance(bits, dict):
        return per_target(bits, targets, notes)
    if bits != "auto":
        return {t.layer: int(bits) for t in targets}
    return _inside_budget(context, model, targets, books, notes)


def _inside_budget(context: PassContext, model, targets: list[Target], books: Books,
                   notes: list[str]) -> dict[str, int]:
    opts = books.options
    context.require_calib("kmeans")
    levels = sorted(set(opts.levels), reverse=True)  # gentlest (most bits) first
    by_layer = {t.layer: t for t in targets}

    def edit(layer: str, b: int):
        t = by_layer[layer]
        return weight_editor(t, lambda w: books.get(t, b).reconstruct().astype(w.dtype), "pass 'kmeans'")

    candidates = [Candidate(f"{t.layer}@{b}bit", t.layer, b, edit(t.layer, b)) for t in targets for b in levels]
    table = measure(context, model, candidates, max_samples=opts.max_samples, time_budget_s=opts.time_budget)
    notes.extend(f"sensitivity: {note}" for note in table.notes)
    rows = {row.key: row for row in table}
    ladders = [Ladder(t.layer, tuple(levels), tuple(t.array.size * (8 * t.array.itemsize - b) / 8 for b in levels),
                      tuple(row_loss(rows.get(f"{t.layer}@{b}bit")) for b in levels)) for t in targets]
    picked, more = seek_budget(context, model, ladders, edit, max_samples=opts.max_samples)
    notes.extend(more)
    return picked
