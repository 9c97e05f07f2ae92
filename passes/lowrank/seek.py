"""lowrank ``ratio=auto``: how much of each layer to keep, chosen inside the run's accuracy budget.

Every layer is measured alone at each fraction of ``levels`` (of its params or MACs, ``ratio_of``) on calibration
data: the weight replaced by its rank-r reconstruction Ŵ (what the factors compute, with the data-aware bias
re-fit), so a measurement never rewires the graph. Each setting's gain is the params (bytes) or MACs it saves;
:func:`graphopt.sensitivity.seek_budget` keeps the furthest point of the gentle-to-aggressive path whose whole
model keeps the budget. Layers the budget cannot afford at any level are left alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import onnx_ir as ir

from graphopt.graphs import all_nodes
from graphopt.linear import as_linear
from graphopt.passbase import PassContext
from graphopt.passes.lowrank.budget import Choice, choose
from graphopt.sensitivity import Candidate, Ladder, measure, row_loss, seek_budget


def inside_budget(context: PassContext, model: ir.Model, plans: list, opts: Any, notes: list[str]
                  ) -> list[Choice | None]:
    """Per plan (layer, geometry, factorizer, schemes): the choice the budget affords, or None."""
    context.require_calib("lowrank")
    by_name = {plan[0].name: plan for plan in plans}
    ladders, candidates = [], []
    for layer, geom, fz, schemes in plans:
        full = geom.params if opts.ratio_of == "params" else geom.macs
        settings: list[Choice] = []
        for level in sorted(set(opts.levels), reverse=True):  # gentlest (most kept) first
            choice = choose(fz, geom, schemes, dataclasses.replace(opts, ratio=level), None)
            if choice is not None and _cost(choice, opts) < full and choice not in settings:
                settings.append(choice)
        if not settings:
            continue
        ladders.append((layer.name, full, settings))
        candidates += [Candidate(f"{layer.name}@{_cost(c, opts) / full:.3f}", layer.name, c, _editor(by_name, layer.name, c))
                       for c in settings]
    if not ladders:
        notes.append("ratio=auto: no layer has a rank below its size at the levels measured")
        return [None] * len(plans)
    table = measure(context, model, candidates, max_samples=opts.max_samples, time_budget_s=opts.time_budget)
    notes.extend(f"sensitivity: {note}" for note in table.notes)
    rows = {row.key: row for row in table}
    steps = []
    for name, full, settings in ladders:
        scale = 4.0 if opts.ratio_of == "params" else 1.0  # float32 bytes saved, or MACs saved
        steps.append(Ladder(name, tuple(settings), tuple(scale * (full - _cost(c, opts)) for c in settings),
                            tuple(row_loss(rows.get(f"{name}@{_cost(c, opts) / full:.3f}")) for c in settings)))
    picked, more = seek_budget(context, model, steps, lambda name, choice: _editor(by_name, name, choice),
                               max_samples=opts.max_samples)
    notes.extend(more)
    return [picked.get(layer.name) for layer, _, _, _ in plans]


def _cost(choice: Choice, opts: Any) -> int:
    return choice.params if opts.ratio_of == "params" else choice.macs


def _editor(by_name: dict, name: str, choice: Choice):
    """An edit of a clone: layer ``name``'s weight becomes Ŵ at ``choice`` (and its bias the re-fitted one)."""
    layer, _, fz, _ = by_name[name]
    _, w_hat = fz.factors(choice.scheme, choice.ranks)
    bias = fz.bias_correction(w_hat)
    node_name = layer.node.name

    def apply(clone: ir.Model) -> None:
        node = next(n for n in all_nodes(clone) if n.name == node_name)
        as_linear(node).set_matrix(w_hat, bias)

    return apply
