"""Sensitivity tables: the effect of each candidate edit alone on the model's outputs, cheapest first.

A candidate is one edit (a layer at a sparsity, a rank, a bit width, float vs int8) given as a function that
edits a model in place. :func:`measure` applies each one to a fresh clone of the model and compares the
clone with the reference (the teacher; without one, the model as it is before any candidate) on the first
``max_samples`` calibration samples: the gate metric (``context.metric``) and the worst-channel SNR. The
reference outputs are computed once per (reference, data, max_samples) and cached on the context, so a
pass calling :func:`measure`, :func:`baseline` and :func:`measure_combination` in turn runs it once.

Budgets: ``time_budget_s`` caps the wall time (the reference run included); candidates not reached are
returned last, unmeasured, and a note says so. A candidate whose edit or evaluation fails gives an error
row; it never stops the pass.

Speed (the decisions do not change): a candidate usually edits a few nodes, so the part of the model upstream of
them computes exactly what the unedited model computes. :func:`measure` therefore prepares candidates in chunks
(clone, apply, find the edited nodes and everything downstream of them), runs the unedited model once per chunk
to capture the values crossing into the edited part (the "frontier", memory capped by ``FRONTIER_BYTES``), and
runs each candidate's edited suffix alone on them (:mod:`graphopt.sensitivity.suffix`). Candidates whose suffix
cannot be cut (subgraphs, a rewired graph output) run whole as before; untyped frontier values take the
types of the captured arrays.

Clones share initializer tensors with the model (``ir.Model.clone``), so ``apply`` must give initializers
new tensors (``weights.replace_initializer``, ``LinearLayer.set_matrix``), never write into an existing
array: that would edit the original model too.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import onnx_ir as ir

from graphopt import metrics, modelio, runtime
from graphopt.sensitivity import suffix
from graphopt.errors import GraphoptError
from graphopt.formatting import json_safe
from graphopt.passbase import PassContext

SNR_FLOOR = -metrics.SNR_CAP  # the SNR recorded for rows that were not measured or failed
OK, ERROR, SKIPPED = "ok", "error", "skipped"
FRONTIER_BYTES = 256 << 20  # captured frontier values held at once (sets how many candidates a chunk takes)

ApplyFn = Callable[[ir.Model], None]


@dataclass
class Candidate:
    key: str  # unique label, e.g. "conv3@0.5"
    layer: str  # node/initializer name the edit touches ("" if several); greedy_budget keeps one per layer
    setting: Any  # the knob value (sparsity, rank, bits, "int8"...), reported as is
    apply: ApplyFn  # edits a CLONE in place (give initializers new tensors, see the module doc)


@dataclass
class SensitivityRow:
    key: str
    layer: str
    setting: Any
    drop: float | None  # metric drop vs the reference (None: snr metric, no score output, or not measured)
    worst_snr_db: float  # worst-channel SNR over all outputs; SNR_FLOOR if not measured
    value: float | None  # the metric's value (accuracy, agreement, or worst SNR)
    seconds: float
    status: str = OK  # ok | error | skipped (time budget)
    error: str | None = None
    metric: str = "agreement"  # the metric actually used (accuracy falls back to agreement without labels)
    samples: int = 0
    stressed_drop: float | None = None  # the drop with the output error metrics.STRESS times larger

    @property
    def measured(self) -> bool:
        return self.status == OK

    @property
    def stressed_or_drop(self) -> float | None:
        """The drop with the output error stressed when that is larger (a search at the budget's edge holds it
        to this), else the drop; None without a drop."""
        if self.drop is None or self.stressed_drop is None:
            return self.drop
        return max(self.drop, self.stressed_drop)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: non-finite floats become None, numpy scalars and tuples plain Python."""
        return {
            "key": self.key, "layer": self.layer, "setting": json_safe(self.setting),
            "drop": json_safe(self.drop), "worst_snr_db": json_safe(self.worst_snr_db),
            "value": json_safe(self.value), "seconds": round(self.seconds, 4), "status": self.status,
            "error": self.error, "metric": self.metric, "samples": self.samples,
            "stressed_drop": json_safe(self.stressed_drop),
        }


class SensitivityTable(list):
    """A list of SensitivityRow (cheapest first) plus notes for the pass report."""

    def __init__(self, rows: Iterable[SensitivityRow] = (), notes: list[str] | None = None) -> None:
        super().__init__(rows)
        self.notes: list[str] = notes or []

    def to_rows(self) -> list[dict[str, Any]]:
        return to_rows(self)

    def measured(self) -> list[SensitivityRow]:
        return [r for r in self if r.measured]

    def greedy_budget(self, budget: float | None, additive: bool = True,
                      min_snr_db: float | None = None) -> list[SensitivityRow]:
        return greedy_budget(self, budget, additive, min_snr_db)


def to_rows(rows: Sequence[SensitivityRow]) -> list[dict[str, Any]]:
    return [r.to_dict() for r in rows]


def sort_key(row: SensitivityRow) -> tuple:
    """Measured rows by (drop, -worst SNR); then failed rows; then rows the time budget skipped."""
    rank = {OK: 0, ERROR: 1}.get(row.status, 2)
    if rank:
        return (rank, 0.0, 0.0)
    return (0, row.drop if row.drop is not None else 0.0, -row.worst_snr_db)


# --- the reference --------------------------------------------------------------------------------------


def _metric(context: PassContext, labels: Any) -> tuple[str, str | None]:
    """The metric to use on this data, and a note when it differs from the one asked for."""
    metric = context.metric or "agreement"
    if metric not in metrics.METRICS:
        raise GraphoptError(f"unknown metric {metric!r} (use one of {', '.join(metrics.METRICS)})")
    if metric == "accuracy" and labels is None:
        return "agreement", "metric 'accuracy' needs labels and the calibration data has none: ranked by agreement"
    return metric, None


def _evaluator(context: PassContext, model: ir.Model, max_samples: int) -> tuple[metrics.Evaluator, Any]:
    """An Evaluator on (reference, the first ``max_samples`` calibration samples), and those samples: against
    the teacher (built once per context), else against the model as it is now (it will change: not kept)."""
    if context.calib is None:
        raise GraphoptError("sensitivity needs calibration data in the pass context")
    head = context.calib.head(max(1, int(max_samples)))
    if context.teacher is None:
        return metrics.Evaluator(model, head, threads=context.threads, score_output=context.score_output,
                                 map_threshold=context.map_threshold), head
    return context.calib_evaluator(int(max_samples)), head


def _row(evaluator: metrics.Evaluator, model: ir.Model, fns: Sequence[ApplyFn], metric: str,
         key: str, layer: str, setting: Any) -> SensitivityRow:
    """Clone, apply every edit, compare with the reference; any failure becomes an error row."""
    start = time.perf_counter()
    try:
        clone = model.clone()
        for fn in fns:
            fn(clone)
        cmp = evaluator.evaluate(clone, progress=False)
    except Exception as err:  # an edit that breaks the model must not stop the pass
        return _error_row(err, key, layer, setting, metric, time.perf_counter() - start)
    return SensitivityRow(key, layer, setting, cmp.drop(metric), cmp.worst_snr_db, cmp.value(metric),
                          time.perf_counter() - start, OK, None, metric, cmp.samples, cmp.drop(metric, stressed=True))


def _prepare(model: ir.Model, group: Sequence[Candidate], evaluator: metrics.Evaluator,
             over_budget: Callable[[], bool]) -> dict[int, Any]:
    """id(candidate) → its cut suffix, or the error its edit raised (then _suffix_row gives the error row);
    candidates whose suffix cannot be cut, or past the time budget, are left out (they run whole or not at all)."""
    out: dict[int, Any] = {}
    for c in group:
        if over_budget():
            break
        begin = time.perf_counter()
        try:
            cut = suffix.prepare(model, c.apply, evaluator.output_names)
        except Exception as err:  # reported as the candidate's error row
            out[id(c)] = (err, time.perf_counter() - begin)
            continue
        if cut is not None:
            cut.seconds = time.perf_counter() - begin
            out[id(c)] = cut
    return out


def _error_row(err: Exception, key: str, layer: str, setting: Any, metric: str, seconds: float) -> SensitivityRow:
    text = str(err).strip().splitlines()
    return SensitivityRow(key, layer, setting, None, SNR_FLOOR, None, seconds, ERROR,
                          f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": "), metric)


def _suffix_row(evaluator: metrics.Evaluator, cache: Any, prepared: Any, metric: str, c: Candidate,
                model: ir.Model) -> SensitivityRow:
    if isinstance(prepared, tuple):
        return _error_row(prepared[0], c.key, c.layer, c.setting, metric, prepared[1])
    start = time.perf_counter() - prepared.seconds
    try:
        cmp = suffix.evaluate(prepared, cache, evaluator)
    except Exception:  # a suffix onnxruntime refuses: measure the whole clone instead (errors reported there)
        return _row(evaluator, model, [c.apply], metric, c.key, c.layer, c.setting)
    return SensitivityRow(c.key, c.layer, c.setting, cmp.drop(metric), cmp.worst_snr_db, cmp.value(metric),
                          time.perf_counter() - start, OK, None, metric, cmp.samples, cmp.drop(metric, stressed=True))


def _skipped(c: Candidate, metric: str) -> SensitivityRow:
    return SensitivityRow(c.key, c.layer, c.setting, None, SNR_FLOOR, None, 0.0, SKIPPED,
                          "not measured: time budget reached", metric)


# --- public entry points ---------------------------------------------------------------------------------


def measure(context: PassContext, model: ir.Model, candidates: Sequence[Candidate], max_samples: int = 64,
            time_budget_s: float | None = 120.0, reuse_prefix: bool = True) -> SensitivityTable:
    """Each candidate alone on a clone of ``model``, against the reference; cheapest first (see sort_key).

    The model is never modified. A candidate is skipped when the time spent so far plus the mean time of a
    candidate would pass ``time_budget_s`` (None: no limit; 0: nothing is measured). ``reuse_prefix``: run only
    each candidate's edited suffix on captured values of the unedited model (same numbers, faster; see the
    module doc)."""
    start = time.perf_counter()
    candidates = list(candidates)
    metric, note = _metric(context, context.calib.labels if context.calib is not None else None)
    notes = [note] if note else []
    if not candidates:
        return SensitivityTable([], notes)
    if time_budget_s is not None and time_budget_s <= 0:
        rows = [_skipped(c, metric) for c in candidates]
        notes.append(f"{len(rows)} of {len(rows)} candidates not measured: time budget {time_budget_s:g} s")
        return SensitivityTable(rows, notes)
    evaluator, head = _evaluator(context, model, max_samples)
    metric, note = _metric(context, head.labels)  # the head decides: its labels are the ones used
    notes = [note] if note else []

    from tqdm.auto import tqdm

    rows: list[SensitivityRow] = []
    spent: list[float] = []
    skipped = 0
    cache = suffix.FrontierCache(model, evaluator.feeds, context.threads) if reuse_prefix else None
    bar = tqdm(total=len(candidates), desc="sensitivity", unit="edit", disable=not context.progress, leave=False)
    chunk = 1  # the first chunk sizes the frontier of a candidate; later ones take what FRONTIER_BYTES holds
    i = 0

    def over_budget() -> bool:
        typical = sum(spent) / len(spent) if spent else 0.0
        return time_budget_s is not None and time.perf_counter() - start + typical > time_budget_s

    while i < len(candidates):
        group, i = candidates[i:i + chunk], i + chunk
        prepared = _prepare(model, group, evaluator, over_budget) if cache is not None else {}
        if cache is not None:
            cache.fill([n for p in prepared.values() if isinstance(p, suffix.Suffix)
                        for n in [*p.frontier, *p.clean_outputs]])
            if cache.nbytes and prepared:  # next chunk: as many candidates as FRONTIER_BYTES holds
                per = cache.nbytes / max(1, len(prepared))
                chunk = int(max(1, min(64, FRONTIER_BYTES // max(per, 1.0))))
        for c in group:
            bar.update(1)
            if over_budget():
                rows.append(_skipped(c, metric))
                skipped += 1
                continue
            row = _suffix_row(evaluator, cache, prepared[id(c)], metric, c, model) if id(c) in prepared else \
                _row(evaluator, model, [c.apply], metric, c.key, c.layer, c.setting)
            spent.append(row.seconds)
            rows.append(row)
        if cache is not None:
            cache.clear()
    bar.close()
    rows.sort(key=sort_key)  # stable: skipped rows keep the candidates' order
    errors = sum(r.status == ERROR for r in rows)
    if errors:
        notes.append(f"{errors} candidates failed (error rows): " + "; ".join(
            f"{r.key}: {r.error}" for r in rows if r.status == ERROR)[:500])
    if skipped:
        notes.append(f"{skipped} of {len(candidates)} candidates not measured: time budget {time_budget_s:g} s")
    if metric == "snr" or all(r.drop is None for r in rows if r.measured):
        notes.append("ranked by worst-channel SNR (no metric drop available)")
    return SensitivityTable(rows, notes)


def baseline(context: PassContext, model: ir.Model, max_samples: int = 64) -> SensitivityRow:
    """The model's own row against the teacher, before any candidate (edits of earlier passes accumulate)."""
    evaluator, head = _evaluator(context, model, max_samples)
    metric, _ = _metric(context, head.labels)
    return _row(evaluator, model, [], metric, "baseline", "", None)


def measure_combination(context: PassContext, model: ir.Model, apply_fns: Sequence[ApplyFn | Candidate],
                        max_samples: int = 64) -> SensitivityRow:
    """One row for several edits applied together to one clone (to verify a chosen set, or to bisect). With the
    user's metric function in the context, the row's drop is the task's on the whole model (every whole-model
    check of every pass then keeps the user's budget, not graphopt's proxy for it)."""
    fns = [f.apply if isinstance(f, Candidate) else f for f in apply_fns]
    keys = [f.key for f in apply_fns if isinstance(f, Candidate)]
    evaluator, head = _evaluator(context, model, max_samples)
    metric, _ = _metric(context, head.labels)
    key = "+".join(keys) if len(keys) == len(fns) and keys else f"combination of {len(fns)}"
    if context.task is not None:
        return _task_row(context, evaluator, model, fns, key)
    return _row(evaluator, model, fns, metric, key, "", None)


def _task_row(context: PassContext, evaluator: metrics.Evaluator, model: ir.Model, fns: Sequence[ApplyFn],
              key: str) -> SensitivityRow:
    """A whole model judged on the user's metric function: its drop is the task's (the original's score less the
    clone's), its stressed drop the same on outputs whose error from the reference is STRESS times larger, its SNR
    the outputs' against the reference."""
    start = time.perf_counter()
    try:
        clone = model.clone()
        for fn in fns:
            fn(clone)
        session = runtime.make_session(modelio.to_proto(clone), threads=context.threads)
        cmp = evaluator.evaluate(session, progress=False)
    except Exception as err:  # an edit that breaks the model must not stop the pass
        return _error_row(err, key, "", None, "task", time.perf_counter() - start)
    # outside the try: a failing user function is one clear line (GraphoptError), not a candidate's error row
    reference = context.teacher_session() if context.teacher is not None else \
        runtime.make_session(modelio.to_proto(model), threads=context.threads)
    score, stressed = context.task.scores(session, reference)
    top = float(context.task_reference)
    return SensitivityRow(key, "", None, top - score, cmp.worst_snr_db, score, time.perf_counter() - start, OK, None,
                          "task", cmp.samples, max(top - score, top - stressed))


def combined_snr_db(snrs: Iterable[float]) -> float:
    """SNR of independent errors added together: their noise powers (relative to the signal) add."""
    noise = sum(10.0 ** (-s / 10.0) for s in snrs)
    if noise <= 0.0:
        return metrics.SNR_CAP
    return float(min(metrics.SNR_CAP, max(-metrics.SNR_CAP, -10.0 * math.log10(noise))))


def greedy_budget(rows: Sequence[SensitivityRow], budget: float | None, additive: bool = True,
                  min_snr_db: float | None = None) -> list[SensitivityRow]:
    """The longest cheapest-first prefix of measured rows whose estimated joint cost stays within budget.

    Heuristic (passes verify the result with :func:`measure_combination`):
    - joint drop = sum of the rows' drops (negative drops count as 0: a lucky gain buys no budget), or the
      largest one with ``additive=False`` (edits that do not interact); must be <= ``budget`` (None: any);
    - joint SNR = noise powers added (:func:`combined_snr_db`), or the lowest with ``additive=False``; must be
      >= ``min_snr_db`` when given (the budget for the snr metric, where drops are None);
    - one row per layer: a later (costlier) row of a layer already chosen replaces it, taken to be the more
      aggressive setting of that layer; rows with layer "" never replace each other;
    - stops at the first row that would break the budget, at a row that was not measured, and at a row
      without a drop when a drop budget is set.
    """
    chosen: dict[Any, SensitivityRow] = {}
    for i, row in enumerate(sorted(rows, key=sort_key)):
        if not row.measured or (budget is not None and row.drop is None):
            break
        trial = dict(chosen)
        trial[row.layer or ("", i)] = row
        picked = list(trial.values())
        if budget is not None:
            drops = [max(0.0, r.drop or 0.0) for r in picked]
            if (sum(drops) if additive else max(drops)) > budget + 1e-12:
                break
        if min_snr_db is not None:
            snrs = [r.worst_snr_db for r in picked]
            if (combined_snr_db(snrs) if additive else min(snrs)) < min_snr_db:
                break
        chosen = trial
    return list(chosen.values())


def allocate(sizes: Sequence[int], steps: Sequence[Sequence[float]], losses: Sequence[Sequence[float]],
             target: float) -> list[float]:
    """Per-layer (or per-group) ratios whose size-weighted mean reaches ``target``: greedily the step with the
    least added loss per unit of size removed. ``steps[g]`` are g's ascending ratios (each layer may have its
    own: whole channels), ``losses[g]`` their measured losses (inf: not measured, never used, and the step
    goes straight to the next measured ratio; loss 0 at ratio 0). The last step taken is cut back so the mean lands
    on ``target`` (callers with whole units round it)."""
    curves = [rising(np.array([0.0, *row])) for row in losses]
    ladders = [np.array([0.0, *row]) for row in steps]
    pos = [0] * len(sizes)
    need, done, last = target * sum(sizes), 0.0, None
    while done < need - 1e-9:
        best, best_rate = None, np.inf
        for g, (n, curve, ladder) in enumerate(zip(sizes, curves, ladders)):
            nxt = next((j for j in range(pos[g] + 1, len(ladder))
                        if ladder[j] > ladder[pos[g]] and np.isfinite(curve[j])), None)
            if nxt is None:
                continue
            rate = (curve[nxt] - curve[pos[g]]) / (n * (ladder[nxt] - ladder[pos[g]]))
            if rate < best_rate:
                best, best_rate, best_next = g, rate, nxt
        if best is None:
            break
        done += sizes[best] * (ladders[best][best_next] - ladders[best][pos[best]])
        pos[best], last = best_next, best
    result = [float(ladder[i]) for ladder, i in zip(ladders, pos)]
    if last is not None and done > need:
        result[last] -= (done - need) / sizes[last]
    return result


def coverage_order(levels: Sequence[float], target: float) -> list[float]:
    """The order to measure ``levels`` in, each round over every layer or group: nearest ``target`` first. A time
    budget that runs out then leaves every layer measured at some level (allocate steps over unmeasured ones),
    not the last layers at none."""
    return sorted(levels, key=lambda r: (abs(r - float(target)), r))


def rising(curve: np.ndarray) -> np.ndarray:
    """Loss never falls with the ratio: each measured entry is at least every measured one before it; unmeasured
    entries (inf) stay inf, so one unmeasured level does not hide the measured ones above it."""
    out, top = curve.copy(), -np.inf
    for i, v in enumerate(curve):
        if np.isfinite(v):
            top = max(top, v)
            out[i] = top
    return out


def row_loss(row: SensitivityRow | None, noise_weight: float = 1.0) -> float:
    """Measured damage of one candidate for :func:`allocate`: the metric's drop plus ``noise_weight`` times the
    worst channel's noise ratio 10^(-SNR/10) (the noise ratio alone when there is no drop: the snr metric).
    A small weight makes the worst channel only break ties (on PP-OCRv4 rec it is set by one rare class of 6625
    softmax channels and ranked channel groups badly). Infinite when not measured (time budget, error), so
    allocate never uses that level."""
    if row is None or not row.measured:
        return np.inf
    snr = row.worst_snr_db
    noise = 0.0 if snr is None or snr == np.inf else 10.0 ** (-float(snr) / 10.0)
    if row.drop is None:
        return noise
    return max(0.0, float(row.drop)) + noise_weight * noise
