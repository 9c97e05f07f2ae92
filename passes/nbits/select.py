"""Which layers go N-bit, and at which width: every site (``layers=all``), or the most the run's accuracy budget
allows (``layers=budget``).

The budget measures every site alone at each width of its ladder — ``fallback_bits`` (when set) and ``bits``,
gentlest first — as it will be written (a real MatMulNBits on a clone, so the measurement is what the kernel
computes), gives each width its gain in stored bytes, and lets :func:`graphopt.sensitivity.seek_budget` keep the
furthest point of the gentle-to-aggressive path whose whole model keeps the budget (checked on whole models, not
assumed additive). Sites the budget cannot afford at any width stay float.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.graphs import all_nodes
from graphopt.passbase import PassContext
from graphopt.passes.nbits.blocks import BlockQuant, packed_bytes, round_to_nearest
from graphopt.passes.nbits.gptq import gptq, inverse_factor, output_error, padded_rows
from graphopt.passes.nbits.rewrite import MS_DOMAIN, Site, emit
from graphopt.sensitivity import Candidate, Ladder, measure, row_loss, seek_budget


class Quantizer:
    """Every site's quantized weight at each width it may get, and its output error on the calibration inputs.

    ``hessians``: input value name → XᵀX. Sites are quantized input by input (an attention block's Q, K and V
    projections share one input, so one inverse factor), and each input's XᵀX and factor are dropped once its sites
    are done: memory holds the Hessians once, not their factors too. A site whose input has no XᵀX (a layer inside
    an If/Loop body, or method=rtn) is rounded to nearest."""

    def __init__(self, options: Any, hessians: dict[str, np.ndarray]) -> None:
        self.options, self.hessians = options, hessians
        self.quants: dict[tuple[str, int], BlockQuant] = {}
        self.output_errors: dict[tuple[str, int], float] = {}
        self.methods: dict[str, str] = {}

    def quantize(self, sites: list[Site], levels: list[int]) -> None:
        o = self.options
        by_input: dict[str, list[Site]] = {}
        for site in sites:
            by_input.setdefault(site.node.inputs[0].name, []).append(site)
        for name, group in by_input.items():
            h = self.hessians.pop(name, None) if o.method == "gptq" else None
            factor = None if h is None else inverse_factor(h, o.damp, padded_rows(group[0].k, o.block_size))
            for site in group:
                w = site.array.astype(np.float64)
                self.methods[site.layer] = "rtn" if factor is None else "gptq"
                for bits in levels:
                    quant = round_to_nearest(w, bits, o.block_size, o.symmetric, o.clip_search) if factor is None \
                        else gptq(w, factor, bits, o.block_size, o.symmetric, o.clip_search)
                    self.quants[site.layer, bits] = quant
                    if h is not None:
                        self.output_errors[site.layer, bits] = output_error(w, quant.dequantize(), h)


def widths(context: PassContext, model, sites: list[Site], quantizer: Quantizer, notes: list[str]) -> dict[str, int]:
    """layer → bits for every site that gets a MatMulNBits."""
    opts = quantizer.options
    if opts.layers == "budget" and context.max_drop is None and context.min_snr is None and context.task is None:
        notes.append("layers=budget without a budget in the context: every eligible layer")
    elif opts.layers == "budget":
        return _inside_budget(context, model, sites, quantizer, notes)
    quantizer.quantize(sites, [opts.bits])
    return {s.layer: opts.bits for s in sites}


def _editor(site: Site, quantizer: Quantizer, bits: int):
    """An edit of a clone: the clone's node of ``site`` becomes its MatMulNBits at ``bits``."""
    layer = site.layer

    def apply(clone) -> None:
        node = next((n for n in all_nodes(clone) if n.name == layer), None)
        if node is None:
            raise GraphoptError(f"pass 'nbits': layer {layer!r} not found in the copy")
        bias = node.inputs[2] if site.bias is not None else None
        emit(Site(node, node.inputs[1], site.array, bias), quantizer.quants[layer, bits],
             quantizer.options.accuracy_level, lambda n: n)
        clone.opset_imports.setdefault(MS_DOMAIN, 1)

    return apply


def _inside_budget(context: PassContext, model, sites: list[Site], quantizer: Quantizer,
                   notes: list[str]) -> dict[str, int]:
    opts = quantizer.options
    context.require_calib("nbits")
    levels = sorted({opts.bits, opts.fallback_bits} - {0}, reverse=True)  # gentlest (most bits) first
    quantizer.quantize(sites, levels)
    by_layer = {s.layer: s for s in sites}

    def edit(layer: str, bits: int):
        return _editor(by_layer[layer], quantizer, bits)

    def gain(site: Site, bits: int) -> float:
        return float(site.array.nbytes - packed_bytes(site.k, site.n, bits, opts.block_size, opts.symmetric))

    # Largest saving first: when the time budget runs out, the layers left unmeasured (they stay float) are the
    # ones that would have saved least.
    pairs = sorted(((s, b) for s in sites for b in levels), key=lambda pair: -gain(*pair))
    candidates = [Candidate(f"{s.layer}@{b}bit", s.layer, b, edit(s.layer, b)) for s, b in pairs]
    table = measure(context, model, candidates, max_samples=opts.sensitivity_samples, time_budget_s=opts.time_budget)
    notes.extend(f"sensitivity: {note}" for note in table.notes)
    rows = {row.key: row for row in table}
    ladders = [Ladder(s.layer, tuple(levels), tuple(gain(s, b) for b in levels),
                      tuple(row_loss(rows.get(f"{s.layer}@{b}bit")) for b in levels)) for s in sites]
    picked, more = seek_budget(context, model, ladders, edit, max_samples=opts.budget_samples)
    notes.extend(more)
    return picked
