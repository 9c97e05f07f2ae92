"""Budget-seeking: the most compression a measured sensitivity table allows inside the run's accuracy budget.

A pass offers each layer a ladder of settings, gentlest first, with each setting's gain (bytes or MACs saved)
and measured loss (:func:`~graphopt.sensitivity.measurement.row_loss` of its sensitivity row). :func:`frontier`
walks from nothing changed to every layer at its most aggressive measured setting, one layer step at a time,
always the step with the least added loss per unit of gain (a Lagrangian path: each state is the cheapest
measured way found to its gain). :func:`furthest` bisects that path with whole-model checks, so how layers
interact is measured, not assumed additive; only a state that was checked and held is ever returned. Losses
measured layer by layer on a few samples order the path only roughly, so when the bisection ends at a step that
broke, the checks left go on along the rest of the path without that layer (:func:`without_breaker`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from graphopt.passbase import PassContext
from graphopt.sensitivity.measurement import ApplyFn, SensitivityRow, measure_combination, rising

SNR_MARGIN_DB = 1.0  # calibration and evaluation data differ: aim 1 dB inside an snr budget
# whole-model checks per budget search: a bisection of a path of ~60 steps takes 7, the rest go past its breaker
MAX_CHECKS = 14

State = tuple[int, ...]  # per ladder, the index of its setting; -1: the layer is left as it is


@dataclass(frozen=True)
class Ladder:
    layer: str
    settings: tuple[Any, ...]  # gentlest first
    gains: tuple[float, ...]  # what each setting saves (bytes, MACs), ascending
    losses: tuple[float, ...]  # each setting's measured loss alone; inf: not measured, never used


@dataclass
class Seek:
    """What :func:`furthest` found: the index of the furthest state that held, and every check made."""

    index: int
    checks: list[tuple[int, bool]] = field(default_factory=list)  # (path index, held)


def holds(row: SensitivityRow, max_drop: float | None, min_snr_db: float | None, stressed: bool = False) -> bool:
    """Whether a measured whole-model row keeps the budget: the metric's drop within ``max_drop``, else (the snr
    metric: no drop) the worst channel at least ``min_snr_db`` plus a margin. ``stressed``: the drop with the
    output error made metrics.STRESS times larger must hold too (for searches that stop at the budget's edge)."""
    if not row.measured:
        return False
    if row.drop is not None:
        drop = row.stressed_or_drop if stressed else row.drop
        return max_drop is None or drop <= max_drop + 1e-12
    return min_snr_db is None or row.worst_snr_db >= min_snr_db + SNR_MARGIN_DB


def frontier(ladders: Sequence[Ladder]) -> list[State]:
    """States from nothing changed to the most the measured settings allow, each one step of one layer further.

    A step may jump over settings of the same layer (the lower convex hull of its loss-vs-gain curve); a loss
    never counts as smaller than a measured gentler setting's (losses are made non-decreasing), and a step that
    gains nothing is never taken. An unmeasured setting is never taken, but a layer may jump past it to a
    measured harsher one: a time budget spent on the 4-bit widths of PP-OCRv4 det (measured first) had left every
    layer's path blocked at its unmeasured 8 bits, and the pass kept nothing."""
    curves = [rising(np.asarray(ladder.losses, np.float64)) for ladder in ladders]
    pos = [-1] * len(ladders)
    states: list[State] = [tuple(pos)]
    while True:
        best: tuple[float, float, int, int] | None = None  # (rate, -gain, ladder, setting)
        for g, (ladder, curve) in enumerate(zip(ladders, curves)):
            loss_now = curve[pos[g]] if pos[g] >= 0 else 0.0
            gain_now = ladder.gains[pos[g]] if pos[g] >= 0 else 0.0
            for j in range(pos[g] + 1, len(ladder.settings)):
                step_gain = ladder.gains[j] - gain_now
                if not math.isfinite(curve[j]) or step_gain <= 0:
                    continue
                key = (max(0.0, curve[j] - loss_now) / step_gain, -step_gain, g, j)
                if best is None or key < best:
                    best = key
        if best is None:
            return states
        pos[best[2]] = best[3]
        states.append(tuple(pos))


def furthest(states: Sequence[State], check: Callable[[State], bool], max_checks: int = 10) -> Seek:
    """Bisect ``states`` for the furthest one ``check`` accepts (the first state, nothing changed, needs no check).

    The last state is tried first (when everything fits, one check decides); then the midpoint of what is left.
    With ``max_checks`` spent, the furthest state that held so far is the answer."""
    seek = Seek(0)
    lo, hi = 0, len(states) - 1
    while lo < hi and len(seek.checks) < max_checks:
        mid = hi if not seek.checks else (lo + hi + 1) // 2
        held = bool(check(states[mid]))
        seek.checks.append((mid, held))
        if held:
            lo = mid
        else:
            hi = mid - 1
    seek.index = lo
    return seek


def without_breaker(states: Sequence[State], index: int) -> list[State]:
    """The path on from ``states[index]`` (which held) when the step to ``states[index + 1]`` broke: every later
    step of the other layers, in the path's order; the layer that broke it stays where it is."""
    breaker = _moved(states[index], states[index + 1])
    pos, path = list(states[index]), [tuple(states[index])]
    for a, b in zip(states[index + 1:], states[index + 2:]):
        g = _moved(a, b)
        if g != breaker:
            pos[g] = b[g]
            path.append(tuple(pos))
    return path


def _moved(a: State, b: State) -> int:
    """The ladder one path step moves."""
    return next(g for g, (x, y) in enumerate(zip(a, b)) if x != y)


def seek_path(states: Sequence[State], check: Callable[[State], bool],
              max_checks: int) -> tuple[State, list[tuple[Seek, int, int | None]]]:
    """The furthest state found with up to ``max_checks`` checks: :func:`furthest` on the path, then, while it
    ends at a step that broke and checks are left, on the path without that step's layer. Returns the state and
    each round's (seek, its path's last index, the layer index it skipped)."""
    path, rounds, skipped, used = list(states), [], None, 0
    while True:
        seek = furthest(path, check, max_checks - used)
        rounds.append((seek, len(path) - 1, skipped))
        used += len(seek.checks)
        # done unless the step past the answer was checked and broke, and checks are left
        if (seek.index + 1, False) not in seek.checks or used >= max_checks:
            return path[seek.index], rounds
        skipped = _moved(path[seek.index], path[seek.index + 1])
        path = without_breaker(path, seek.index)
        if len(path) < 2:
            return path[0], rounds


def chosen(ladders: Sequence[Ladder], state: State) -> dict[str, Any]:
    """layer → its setting in ``state`` (layers left as they are omitted)."""
    return {ladder.layer: ladder.settings[i] for ladder, i in zip(ladders, state) if i >= 0}


def seek_budget(context: PassContext, model, ladders: Sequence[Ladder], edit: Callable[[str, Any], ApplyFn] | None,
                max_samples: int = 256, max_checks: int = MAX_CHECKS,
                edit_all: Callable[[dict[str, Any]], ApplyFn] | None = None,
                max_gain: float | None = None) -> tuple[dict[str, Any], list[str]]:
    """layer → setting: the furthest state of :func:`frontier` whose edits (``edit(layer, setting)``, applied
    together to a clone; or ``edit_all(layer → setting)``, one edit of them all, for edits that are not
    independent per layer) keep the context's budget on up to ``max_samples`` calibration samples, also with
    the output error metrics.STRESS times larger (the search stops at an edge; unseen samples lie beyond it);
    and notes. ``max_gain``: the path ends before the first state that gains more (the rest is out of reach, and
    checking it wastes time)."""
    if context.max_drop is None and context.min_snr is None:
        raise ValueError("seek_budget needs a budget in the context (max_drop, or min_snr for the snr metric)")
    if (edit is None) == (edit_all is None):
        raise ValueError("seek_budget takes one of edit (per layer) and edit_all (the whole state)")
    states = frontier(ladders)
    if max_gain is not None:  # gains only grow along the path
        states = [s for s in states if _gain(ladders, s) <= max_gain]
    rows: list[SensitivityRow] = []  # every check's row, in the order made

    def check(state: State) -> bool:
        picked = chosen(ladders, state)
        fns = [edit_all(picked)] if edit_all else [edit(layer, setting) for layer, setting in picked.items()]
        rows.append(row := measure_combination(context, model, fns, max_samples))
        return holds(row, context.max_drop, context.min_snr, stressed=True)

    state, rounds = seek_path(states, check, max_checks)
    picked = chosen(ladders, state)
    made, texts = iter(rows), []
    for seek, last, skipped in rounds:
        head = "" if skipped is None else f"then without {ladders[skipped].layer}: "
        texts.append(head + ", ".join(f"{i}/{last} {'held' if ok else 'broke'}" + check_text(next(made))
                                      for i, ok in seek.checks))
    more = f", then {len(rounds) - 1} more round(s) past the step that broke" if len(rounds) > 1 else ""
    notes = [f"budget: {len(picked)} of {len(ladders)} layer(s) changed, step {rounds[0][0].index} of the "
             f"{len(states) - 1}-step gentle-to-aggressive path{more} ({len(rows)} whole-model checks: "
             f"{'; '.join(texts)})"]
    return picked, notes


def _gain(ladders: Sequence[Ladder], state: State) -> float:
    return sum(ladder.gains[i] for ladder, i in zip(ladders, state) if i >= 0)


def check_text(row: SensitivityRow) -> str:
    """What a whole-model check measured, for notes: " (drop D, stressed S)" or the SNR, or why it failed."""
    if not row.measured:
        return f" ({row.error or row.status})"
    if row.metric == "task":
        return f" (task drop {row.drop:.4g}, stressed {row.stressed_or_drop:.4g})"
    if row.drop is not None:
        stressed = f", stressed {row.stressed_drop:.4f}" if row.stressed_drop is not None else ""
        return f" (drop {row.drop:.4f}{stressed})"
    return f" (worst SNR {row.worst_snr_db:.1f} dB)"
