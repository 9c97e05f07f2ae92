"""prune: unstructured magnitude pruning of Conv/ConvTranspose/Gemm/MatMul weights.

Per layer (the smallest |w| of each layer), one global threshold on normalized magnitudes |w|/rms(layer), or
sensitivity-aware: each layer's output error is measured on calibration data at a few sparsities and the
global target is spread so the least sensitive layers take most of it (greedy on Δloss/Δparams). Pruned
weights are marked for sparse storage; modelio writes them as ONNX sparse initializers at save time where that
is smaller (INT64 indices: above about 67% sparsity for float32), else dense with exact zeros. Run time is the
float model's. Biases and normalization parameters are never touched (only the weight input is).

Embedding tables (Gather data, weight_targets) are layers too, pruned element by element like the others: zeroing
whole rows of tokens the calibration data never reads would break every text that uses them (a few hundred
calibration sentences read a small part of a 30k vocabulary), and a zero row is no cheaper to Gather. Pruning a
table saves only file size (onnxruntime densifies sparse initializers at load; a Gather reads rows whatever they
hold), and the table's error reaches every token's hidden state directly: on the BERT fixture, 50% of the tables
alone gave mean cosine 0.977, 50% of every MatMul 0.9999. So by default (``tables=measured``) they are pruned only
where their damage is measured (``sparsity=auto``, ``sensitivity=true``) or where a sparsity mapping names them;
a uniform sparsity leaves them dense and says so.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal

import numpy as np
import onnx_ir as ir

from graphopt.modelio import SPARSE, STORAGE_KEY
from graphopt.options import BaseOptions, option
from graphopt.passbase import GraphoptPass, GraphoptResult
from graphopt.sensitivity import Candidate, Ladder, coverage_order, measure, row_loss, seek_budget
from graphopt.sensitivity import allocate as allocate_steps
from graphopt.weight_targets import Target, find_targets, per_target, weight_editor
from graphopt.weights import replace_initializer

SENSITIVITY_LEVELS = [0.3, 0.5, 0.7, 0.8, 0.9, 0.95]


# Streaming passes work on blocks of this many elements; selections up to _EXACT_SELECT elements just partition.
_BLOCK = 1 << 22
_EXACT_SELECT = 1 << 22
_SAMPLE = 1 << 18


def _blocks(n: int):
    return (slice(start, start + _BLOCK) for start in range(0, n, _BLOCK))


def _sumsq(x: np.ndarray, y: np.ndarray | None = None) -> float:
    """Σ(x − y)² (y = 0 when None) in float64, block by block: no full-size temporary."""
    fx = x.reshape(-1)
    fy = None if y is None else y.reshape(-1)
    return float(sum(np.sum(np.square(fx[sl] if fy is None else fx[sl] - fy[sl], dtype=np.float64))
                     for sl in _blocks(fx.size)))


Magnitude = Callable[[int, np.ndarray], np.ndarray]  # (part index, block of that part) -> magnitudes


def kth_smallest(parts: list[np.ndarray], magnitude: Magnitude, k: int) -> float:
    """The k-th smallest (1-based) magnitude over the flat arrays ``parts``, exactly.

    Small inputs are partitioned directly. Large ones: a random sample brackets the answer, one streaming pass
    counts the magnitudes below the bracket and keeps those inside it (about 1% of them), and only those are
    partitioned; a bracket that misses (unlikely) falls back to partitioning everything."""
    n = sum(p.size for p in parts)
    if n <= _EXACT_SELECT:
        return float(np.partition(np.concatenate([magnitude(i, p) for i, p in enumerate(parts)]), k - 1)[k - 1])
    rng = np.random.default_rng(0)
    sample = np.sort(np.concatenate([magnitude(i, p[rng.integers(0, p.size, -(-_SAMPLE * p.size // n))])
                                     for i, p in enumerate(parts) if p.size]))
    pos = (k - 1) / n * sample.size
    margin = 4 * np.sqrt(sample.size * (k / n) * (1 - k / n)) + 16
    lo_i, hi_i = int(pos - margin), int(pos + margin)
    lo = sample[lo_i] if lo_i >= 0 else -np.inf
    hi = sample[hi_i] if hi_i < sample.size else np.inf
    below, inside = 0, []
    for i, p in enumerate(parts):
        for sl in _blocks(p.size):
            m = magnitude(i, p[sl])
            below += int(np.count_nonzero(m < lo))
            inside.append(m[(m >= lo) & (m <= hi)])
    cand = np.concatenate(inside)
    del inside
    if below <= k - 1 < below + cand.size:
        return float(np.partition(cand, k - 1 - below)[k - 1 - below])
    del cand
    return float(np.partition(np.concatenate([magnitude(i, p) for i, p in enumerate(parts)]), k - 1)[k - 1])


def _smallest_masks(parts: list[np.ndarray], magnitude: Magnitude, k: int) -> list[np.ndarray]:
    """Flat masks of exactly the k smallest magnitudes over ``parts``: all below the k-th, then ties in order."""
    if k <= 0:
        return [np.zeros(p.size, bool) for p in parts]
    t = kth_smallest(parts, magnitude, k)
    masks = []
    for i, p in enumerate(parts):
        m = np.empty(p.size, bool)
        for sl in _blocks(p.size):
            m[sl] = magnitude(i, p[sl]) < t
        masks.append(m)
    need = k - sum(int(np.count_nonzero(m)) for m in masks)
    for i, (p, m) in enumerate(zip(parts, masks)):  # ties at the threshold: take them in order until exact
        for sl in _blocks(p.size):
            if need <= 0:
                break
            ties = np.flatnonzero(magnitude(i, p[sl]) == t)[:need]
            m[sl][ties] = True
            need -= ties.size
    return masks


def prune_array(w: np.ndarray, sparsity: float) -> np.ndarray:
    """A copy of ``w`` with its round(sparsity·n) smallest-magnitude elements set to zero."""
    flat = w.reshape(-1)
    k = int(round(sparsity * flat.size))
    out = flat.copy()
    if k >= flat.size:
        out[:] = 0
    elif k > 0:
        out[_smallest_masks([flat], lambda _, x: np.abs(x), k)[0]] = 0
    return out.reshape(w.shape)


def global_masks(arrays: list[np.ndarray], sparsity: float) -> list[np.ndarray]:
    """Boolean prune masks from one threshold over |w|/rms(layer) of all layers (exactly round(s·N) zeros)."""
    flats = [w.reshape(-1) for w in arrays]
    rms = [np.float32(np.sqrt(_sumsq(f.astype(np.float32, copy=False)) / f.size) or 1.0) if f.size else np.float32(1.0) for f in flats]
    k = int(round(sparsity * sum(f.size for f in flats)))
    masks = _smallest_masks(flats, lambda i, x: np.abs(x.astype(np.float32)) / rms[i], k)
    return [m.reshape(w.shape) for m, w in zip(masks, arrays)]


def set_pruned(target: Target, pruned: np.ndarray) -> None:
    """Write the pruned weight (a new tensor, never in place) and ask for sparse storage where it pays."""
    replace_initializer(target.value, pruned.astype(target.array.dtype, copy=False))
    target.value.const_value.metadata_props[STORAGE_KEY] = SPARSE


def allocate(sizes: list[int], losses: list[list[float]], levels: list[float], target: float) -> list[float]:
    """Per-layer sparsities whose size-weighted mean is ``target``, greedily cheapest loss per pruned weight.

    ``losses[l][i]`` is layer l's measured loss at ``levels[i]`` (levels ascending, distinct; loss 0 at sparsity
    0); an infinite loss marks a level that was not measured. The last step is cut so the mean is exact."""
    return allocate_steps(sizes, [levels] * len(sizes), losses, target)


class Prune(GraphoptPass):
    """Zero the smallest-magnitude weights of Conv/ConvTranspose/Gemm/MatMul layers."""

    name = "prune"
    summary = "unstructured magnitude pruning (per layer, global, or sensitivity-aware); sparse storage at save"
    size_objective = True  # dense kernels run zeros as fast as weights

    @classmethod
    def needs_data(cls, options) -> str | None:
        if options.sparsity == "auto":
            return "sparsity=auto measures each layer's levels on data"
        return "sensitivity measures each layer's damage on data" if options.sensitivity else None

    @dataclasses.dataclass(frozen=True)
    class Options(BaseOptions):
        sparsity: float | dict[str, float] | Literal["auto"] = option(
            0.5, "fraction of weights set to zero: one value, or a mapping layer (node or weight name) → "
            "sparsity ('*' for the rest), or auto: each layer's sparsity (from levels) chosen inside max_drop "
            "(needs --calib)", low=0.0, high=1.0, high_open=True)
        scope: Literal["layer", "global"] = option(
            "layer", "layer: each layer loses the same fraction; global: one threshold over |w|/rms(layer)",
            choices=("layer", "global"))
        sensitivity: bool = option(
            False, "measure each layer's error on calibration data and give the global target mostly to the "
                   "least sensitive layers (needs --calib)")
        tables: Literal["measured", "always", "never"] = option(
            "measured", "embedding tables (Gather data): measured = only with sparsity=auto, sensitivity=true or "
            "named in a sparsity mapping; always = like every layer; never", choices=("measured", "always", "never"))
        skip_nodes: list[str] = option([], "node or weight names never pruned")
        skip_ops: list[str] = option(
            [], "op types never pruned (Conv, ConvTranspose, Gemm, MatMul; Gather: embedding tables)")
        min_size: int = option(1024, "layers with fewer weight elements are left dense", low=0)
        levels: list[float] = option(SENSITIVITY_LEVELS, "sparsities measured per layer with sensitivity=true or sparsity=auto",
                                     low=0.0, high=1.0, low_open=True, high_open=True)
        max_samples: int = option(64, "calibration samples per sensitivity measurement", low=1)
        time_budget: float = option(120.0, "seconds for the sensitivity measurements", low=0.0, low_open=True)

        def check(self) -> None:
            if not isinstance(self.sparsity, float) and (self.scope == "global" or self.sensitivity):
                raise ValueError("scope=global and sensitivity=true take one sparsity value, not a mapping or auto")

    def call(self, model: ir.Model) -> GraphoptResult:
        opts = self.options
        notes: list[str] = []
        targets = self._with_tables(find_targets(model, opts.skip_nodes, opts.skip_ops, opts.min_size, notes,
                                                 "pruned"), notes)
        info: dict[str, dict] = {}
        if opts.sparsity == "auto":
            plan = self._budget_plan(model, targets, notes)
        elif isinstance(opts.sparsity, dict):
            chosen = per_target(opts.sparsity, targets, notes)
            plan = [(t, chosen[t.layer]) for t in targets if t.layer in chosen]
        elif opts.sensitivity:
            plan, info = self._sensitivity_plan(model, targets, float(opts.sparsity), notes)
        else:
            plan = [(t, float(opts.sparsity)) for t in targets]

        rows = []
        if opts.scope == "global" and not opts.sensitivity and isinstance(opts.sparsity, float):
            masks = global_masks([t.array for t in targets], float(opts.sparsity))
            plan = [(t, m) for t, m in zip(targets, masks)]
            del masks
        for t, how in plan:  # one layer at a time: a big layer's temporaries are freed before the next
            if isinstance(how, np.ndarray):
                p = np.where(how, np.zeros((), t.array.dtype), t.array)
            else:
                p = prune_array(t.array, how)
            zeros_before = t.array.size - int(np.count_nonzero(t.array))
            nnz = int(np.count_nonzero(p))
            if p.size - nnz <= zeros_before:
                continue
            before, after = zeros_before / p.size, 1 - nnz / p.size
            rel = float(np.sqrt(_sumsq(t.array, p)) / (np.sqrt(_sumsq(t.array)) or 1.0))
            set_pruned(t, p)
            dense = int(p.nbytes)
            sparse = nnz * (8 + p.itemsize)
            row = {"layer": t.layer, "op": t.node.op_type, "weight": t.value.name, "elements": int(p.size),
                   "sparsity_before": round(before, 4), "sparsity": round(after, 4), "bytes_dense": dense,
                   "bytes_sparse": sparse, "stored": "sparse" if sparse < dense else "dense",
                   "rel_error": round(rel, 5)}
            row.update(info.get(t.layer, {}))
            rows.append(row)
        if rows:
            total = sum(r["elements"] for r in rows)
            zeros = sum(r["sparsity"] * r["elements"] for r in rows)
            notes.append(f"{len(rows)} layer(s) pruned: {zeros / total:.1%} of their {total} weights are zero")
        return self.result(model, rows, notes)

    def _with_tables(self, targets: list[Target], notes: list[str]) -> list[Target]:
        """``targets`` without the embedding tables the ``tables`` option leaves dense (module docstring)."""
        opts = self.options
        if opts.tables == "always":
            return targets
        named = set(opts.sparsity) - {"*"} if isinstance(opts.sparsity, dict) else set()
        measured = opts.sparsity == "auto" or opts.sensitivity
        keep = [t for t in targets if not t.table or (opts.tables == "measured" and (
            measured or t.layer in named or t.value.name in named))]
        if isinstance(opts.sparsity, dict) and "*" not in opts.sparsity:  # unnamed tables are not pruned anyway
            targets = [t for t in targets if not t.table or t.layer in named or t.value.name in named]
        left = len(targets) - len(keep)
        if left and opts.tables == "measured":
            notes.append(f"{left} embedding table(s) left dense (a uniform sparsity would hit them as hard as a "
                         "linear layer; sparsity=auto or tables=always prunes them)")
        return keep

    def _measured_losses(self, model: ir.Model, targets: list[Target], levels: list[float], target: float,
                         notes: list[str]) -> list[list[float]]:
        """Per target, the measured loss (sensitivity.row_loss) of each level alone, every layer at the level
        nearest ``target`` first (sensitivity.coverage_order)."""
        self.context.require_calib(self.name)
        candidates = [Candidate(f"{t.layer}@{s:g}", t.layer, s, _pruner(t, s))
                      for s in coverage_order(levels, target) for t in targets]
        if not candidates:
            return []
        table = measure(self.context, model, candidates, max_samples=self.options.max_samples,
                        time_budget_s=self.options.time_budget)
        notes.extend(f"sensitivity: {note}" for note in table.notes)
        rows = {row.key: row for row in table}
        return [[row_loss(rows.get(f"{t.layer}@{s:g}")) for s in levels] for t in targets]

    def _sensitivity_plan(self, model: ir.Model, targets: list[Target], sparsity: float,
                          notes: list[str]) -> tuple[list[tuple[Target, float]], dict[str, dict]]:
        levels = sorted(set(self.options.levels))
        losses = self._measured_losses(model, targets, levels, sparsity, notes)
        if not losses:
            return [], {}
        chosen = allocate([t.array.size for t in targets], losses, levels, sparsity)
        reached = sum(s * t.array.size for t, s in zip(targets, chosen)) / max(1, sum(t.array.size for t in targets))
        if reached < sparsity - 1e-6:
            notes.append(f"sensitivity: target sparsity {sparsity:g} not reachable within the measured levels; "
                         f"reached {reached:.3f}")
        info = {}
        for t, s, row in zip(targets, chosen, losses):
            near = max((i for i, lvl in enumerate(levels) if lvl <= s + 1e-9), default=None)
            info[t.layer] = {"sensitivity_loss": None if near is None or not np.isfinite(row[near])
                             else float(f"{row[near]:.4g}")}
        return [(t, s) for t, s in zip(targets, chosen)], info

    def _budget_plan(self, model: ir.Model, targets: list[Target], notes: list[str]) -> list[tuple[Target, float]]:
        """Each layer's sparsity from ``levels``: the most the run's budget allows (sensitivity.seek_budget)."""
        levels = sorted(set(self.options.levels))
        losses = self._measured_losses(model, targets, levels, levels[0], notes)  # gentlest first
        if not losses:
            return []
        ladders = [Ladder(t.layer, tuple(levels), tuple(t.array.nbytes * s for s in levels), tuple(row))
                   for t, row in zip(targets, losses)]
        by_layer = {t.layer: t for t in targets}
        picked, more = seek_budget(self.context, model, ladders, lambda layer, s: _pruner(by_layer[layer], s),
                                   max_samples=self.options.max_samples)
        notes.extend(more)
        return [(t, picked[t.layer]) for t in targets if t.layer in picked]


def _pruner(target: Target, sparsity: float):
    return weight_editor(target, lambda w: prune_array(w, sparsity), "pass 'prune'")
