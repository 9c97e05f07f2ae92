"""kmeans bit widths per layer: given by the user (one width, or a mapping), or ``bits=auto``: chosen inside the
run's accuracy budget.

``auto`` measures every layer alone at each width of ``levels`` on calibration data (the weight replaced by its
codebook reconstruction, which is what the Gather computes), gives each width its gain in stored bytes, and lets
:func:`graphopt.sensitivity.seek_budget` keep the furthest point of the gentle-to-aggressive path whose whole
model keeps the budget. Layers the budget cannot afford at any width stay float.

With ``refit`` each width is measured with its centroids refit (:class:`refit.Independent`: the layer alone, on
the float model's inputs, as the measurement has it), so the allocation sees the refit error; the whole-model
checks combine those refits. The written model is refit layer by layer on the shared model's inputs
(:func:`refit_books`), and that is kept only if a whole-model check finds it no worse than the combination the
budget search checked.
"""

from __future__ import annotations

import numpy as np

from graphopt.passbase import PassContext
from graphopt.passes.kmeans.codebook import Codebook, quantize
from graphopt.passes.kmeans.importance import importance_of
from graphopt.passes.kmeans.refit import Independent, Solution, refit_sequential, summarize
from graphopt.sensitivity import Candidate, Ladder, SensitivityRow, measure, measure_combination, row_loss, seek_budget
from graphopt.weight_targets import Target, per_target, weight_editor


class Books:
    """Codebooks by (layer, bits), each clustered once (auto measures a width, then the pass writes it)."""

    def __init__(self, options, energy: dict[str, np.ndarray]) -> None:
        self.options, self.energy = options, energy
        self._books: dict[tuple[str, int], Codebook] = {}
        self._half: set[tuple[str, int]] = set()  # (layer, bits) whose codebook is written as float16
        self.independent: Independent | None = None  # bits=auto with refit: the refits it measured

    def importance(self, t: Target) -> np.ndarray | None:
        return importance_of(t, self.energy[t.layer]) if t.layer in self.energy else None

    def get(self, t: Target, bits: int) -> Codebook:
        key = (t.layer, bits)
        if key not in self._books:
            o = self.options
            book = quantize(t.array, bits, o.init, self.importance(t), self.per_channel(t) or bits == 1, t.out_axis,
                            o.seed)
            if o.half_codebook and book.codebook.dtype == np.float32 and fits_float16(book.codebook):
                # rounded here, so sensitivity, the reported errors and the file all see the stored centroids
                book.codebook = book.codebook.astype(np.float16).astype(np.float32)
                self._half.add(key)
            self._books[key] = book
        return self._books[key]

    def per_channel(self, t: Target) -> bool:
        """One codebook per output channel for this layer (the option: every layer, or these op types)."""
        per = self.options.per_channel
        return per if isinstance(per, bool) else t.node.op_type in per

    def stored_bytes(self, t: Target, bits: int) -> int:
        """The layer's bytes once shared at ``bits``, before clustering (indices, codebooks, per-channel row
        offsets): bits=auto weighs each width's gain with it, so a codebook per channel of a small layer is
        not counted as free."""
        o, per = self.options, self.per_channel(t) or bits == 1
        indices = (t.array.size + 1) // 2 if o.uint4 and bits <= 4 else t.array.size
        rows = t.array.shape[t.out_axis] if per else 1
        book = rows * min(2 ** bits, t.array.size) * (2 if o.half_codebook else t.array.itemsize)
        return indices + book + (4 * rows if per else 0)

    def is_half(self, t: Target, bits: int) -> bool:
        return (t.layer, bits) in self._half

    def finish(self, t: Target, bits: int, codebook: np.ndarray) -> np.ndarray | None:
        """A refit codebook as it will be stored: rounded to float16 when this width's is (None: it overflows)."""
        if not self.is_half(t, bits):
            return codebook
        return codebook.astype(np.float16).astype(np.float32) if fits_float16(codebook) else None

    def replace(self, t: Target, bits: int, codebook: np.ndarray) -> None:
        """The refit centroids become the layer's codebook at that width."""
        old = self.get(t, bits)
        self._books[(t.layer, bits)] = Codebook(codebook, old.indices, old.out_axis, old.zero_code)


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
    if opts.refit:
        books.independent = Independent(context, model, targets, opts.refit_samples, books.finish)

    def edit(layer: str, b: int):
        t = by_layer[layer]
        if books.independent is not None:
            return books.independent.editor(t, b, lambda: books.get(t, b))
        return weight_editor(t, lambda w: books.get(t, b).reconstruct().astype(w.dtype), "pass 'kmeans'")

    # every layer at one width before any layer at the next, so a time budget that runs out leaves each layer
    # measured (PP-OCRv4 rec in layer order: 25 of 329 measured in 120 s, 4 of its 47 layers compressed)
    candidates = [Candidate(f"{t.layer}@{b}bit", t.layer, b, edit(t.layer, b))
                  for b in sorted(levels, key=_measure_rank) for t in targets]
    table = measure(context, model, candidates, max_samples=opts.measure_samples or opts.max_samples,
                    time_budget_s=opts.time_budget)
    notes.extend(f"sensitivity: {note}" for note in table.notes)
    rows = {row.key: row for row in table}
    ladders = [Ladder(t.layer, tuple(levels), tuple(t.array.nbytes - books.stored_bytes(t, b) for b in levels),
                      tuple(row_loss(rows.get(f"{t.layer}@{b}bit")) for b in levels)) for t in targets]
    picked, more = seek_budget(context, model, ladders, edit, max_samples=opts.max_samples)
    notes.extend(more)
    return picked


# the widths to measure first: 4 and 8 bits are where hand recipes put most layers (PP-OCRv4 rec: 4-bit convs and
# MatMuls, 8-bit rest, 6.15x), then the ones between and beyond
MEASURE_FIRST = (4, 8, 3, 6, 2, 5, 1)


def _measure_rank(bits: int) -> int:
    return MEASURE_FIRST.index(bits) if bits in MEASURE_FIRST else len(MEASURE_FIRST)


def refit_books(context: PassContext, model, chosen: list[tuple[Target, int]], books: Books,
                notes: list[str]) -> dict[str, Solution]:
    """layer → its refit (the layer by layer one; with bits=auto the measured independent ones instead when the
    layer by layer ones check worse on the whole model); kept refits replace the layers' codebooks in ``books``."""
    items = [(t, b, books.get(t, b)) for t, b in chosen]
    solutions, shared = refit_sequential(context, model, items, books.finish, books.options.refit_samples, notes)
    ind = books.independent
    if ind is not None and solutions:
        samples = books.options.max_samples  # as the budget search checked
        measured = measure_combination(context, model, [ind.editor(t, b, lambda cb=cb: cb) for t, b, cb in items],
                                       samples)
        sequential = measure_combination(context, shared, [], samples)
        notes.append(f"refit: whole model with the layer by layer refits {_check_text(sequential)}, with the "
                     f"measured ones {_check_text(measured)}")
        if _worse(sequential, measured):
            solutions = {t.layer: s for t, b, cb in items if (s := ind.solution(t, b, cb)) is not None}
            notes.append("refit: the measured (independent) refits kept: the layer by layer ones checked worse")
            summarize(solutions, notes, "each layer on the float model's inputs")
    for t, b, _ in items:
        sol = solutions.get(t.layer)
        if sol is not None and sol.kept:
            books.replace(t, b, sol.codebook)
    return solutions


def _key(row: SensitivityRow) -> tuple[float, float, float]:
    if not row.measured:
        return (float("inf"), float("inf"), 0.0)
    drop = row.drop if row.drop is not None else 0.0
    stressed = row.stressed_or_drop if row.drop is not None else drop
    return (stressed, drop, -row.worst_snr_db)


def _worse(a: SensitivityRow, b: SensitivityRow) -> bool:
    return _key(a) > _key(b)


def _check_text(row: SensitivityRow) -> str:
    if not row.measured:
        return f"failed ({row.error})"
    if row.drop is None:
        return f"worst SNR {row.worst_snr_db:.1f} dB"
    return f"drop {row.drop:.4f} (stressed {row.stressed_or_drop:.4f})"
