"""channel_prune: remove whole channels with every coupled tensor, then (with data) refit the consumers.

Pieces (as in Torch-Pruning): :mod:`channel_deps` finds the dependency groups, :mod:`channel_importance`
scores their channels, :mod:`channel_rewrite` slices the tensors. This module chooses how many channels each
group loses (ratio per layer or one global ratio over normalized importance, a floor, ``round_to``) and
repairs: each consumer layer (the next Conv/Gemm/MatMul reading pruned channels) is refit by ridge least
squares on calibration activations — X from the pruned model, Y the original model's output of that layer
(its kept channels) — so it reproduces what it computed before (ThiNet; He et al. 2017). Layers are refit in
graph order, a few per data pass, so later layers see their repaired inputs.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Literal

import numpy as np
import onnx_ir as ir

from graphopt import bench
from graphopt.capture import layer_moments, stream, stream_pair, tensor_stats
from graphopt.data import feed_shapes
from graphopt.errors import GraphoptError
from graphopt.linear import LinearLayer, as_linear
from graphopt.options import BaseOptions, option
from graphopt.passbase import GraphoptPass, GraphoptResult
from graphopt.passes.channel_deps import Group, Slot, analyze, label
from graphopt.passes.channel_importance import KINDS, group_scores, needed_values
from graphopt.passes.channel_rewrite import (apply_bias_deltas, apply_fixups, apply_slots, drop_unused, forget_shapes,
                                             input_channel_axis, mean_deltas)
from graphopt.refit import refit_layer


MIN_ROWS_PER_INPUT = 4  # a ridge refit with fewer calibration rows per input column overfits


def legal_keep(n: int, keep: int, min_channels: int, round_to: int) -> int:
    """Kept width: at least ``min_channels`` (or n), rounded up to a multiple of ``round_to``, at most n."""
    keep = max(keep, min(n, min_channels), 1)
    if round_to > 1:
        keep = math.ceil(keep / round_to) * round_to
    return min(n, keep)


class ChannelPrune(GraphoptPass):
    """Structured pruning of Conv/ConvTranspose/Gemm/MatMul output channels with their dependency groups."""

    name = "channel_prune"
    summary = ("structured pruning: remove whole channels with every coupled tensor (BN, residual Add/Sum, "
               "Concat, depthwise, Flatten→Gemm); ridge repair of the next layers on calibration data")

    @dataclasses.dataclass(frozen=True)
    class Options(BaseOptions):
        ratio: float | dict[str, float] = option(
            0.3, "fraction of each group's channels removed: one value, or a mapping producer node name → "
                 "ratio ('*' for the rest)", low=0.0, high=1.0, high_open=True)
        scope: Literal["layer", "global"] = option(
            "layer", "layer: every group loses `ratio`; global: `ratio` of all channels, the least important "
                     "by normalized score", choices=("layer", "global"))
        importance: Literal["l1", "l2", "bn", "activation", "reconstruction"] = option(
            "l1", "channel score: filter L1/L2 norm, BatchNorm |gamma|, mean |activation| (data), or the "
                  "consumer-output error of removing it (data)", choices=KINDS)
        round_to: int = option(1, "kept widths are multiples of this (8/16 suit SIMD kernels)", low=1)
        min_channels: int = option(1, "never keep fewer channels in a group", low=1)
        max_ratio: float = option(0.9, "scope=global: no group loses more than this fraction", low=0.0, high=1.0,
                                  high_open=True)
        repair: bool | None = option(None, "refit consumer layers on calibration data (default: when data is "
                                           "given)")
        max_samples: int = option(256, "calibration samples for importance and repair", low=1)
        lam: float = option(1e-4, "ridge strength of the repair (relative to the mean input energy)", low=0.0)
        repair_rounds: int = option(8, "data passes for the repair (layers are refit in graph order, "
                                       "split over this many passes)", low=1)
        skip_nodes: list[str] = option([], "producer/member node names whose groups are never pruned")
        compensate: bool = option(True, "with calibration data, fold each removed input channel's mean "
                                        "contribution into the consumer layer's bias (removed channels are "
                                        "rarely zero: biases and affine blocks make them constants)")

        def check(self) -> None:
            if isinstance(self.ratio, dict) and self.scope == "global":
                raise ValueError("scope=global takes one ratio, not a mapping")

    # ------------------------------------------------------------------------------------------------
    def call(self, model: ir.Model) -> GraphoptResult:
        opts = self.options
        notes: list[str] = []
        calib = self.context.calib
        data = calib if calib is not None and not calib.synthetic else None
        if opts.importance in ("activation", "reconstruction"):
            data = self.context.require_calib(self.name)
        original = model.clone()
        shapes = bench.infer_shapes(model)
        analysis, groups = analyze(model, shapes)
        prunable = [g for g in groups if g.prunable and g.size > 1]
        if opts.skip_nodes:
            skip = set(opts.skip_nodes)
            prunable = [g for g in prunable if not skip & set(g.members())]
        self._explain(groups, notes)
        stats = None
        if opts.importance in ("activation", "reconstruction"):
            stats = tensor_stats(model, needed_values(prunable), data, self.context.threads, opts.max_samples)
        scored = {g.id: group_scores(g, opts.importance, stats) for g in prunable}
        plan = self._plan(prunable, {k: v[0] for k, v in scored.items()}, notes)
        if not any(len(r) for r in plan.values()):
            notes.append("no channel removed")
            return self.result(model, [], notes)

        input_shapes = feed_shapes(model, data)
        costs_before = _costs(model, input_shapes)
        slot_removed, value_removed = _removals(prunable, plan)
        deltas = {}
        if opts.compensate and data is not None:
            deltas = mean_deltas(slot_removed, self._means(model, slot_removed, data))
        dropped = apply_slots(slot_removed, self.mark)
        apply_fixups(analysis.fixups, value_removed, _opset(model), self.mark)
        if deltas:
            out_removed = {s.node: r for s, r in slot_removed.items() if s.role == "producer" and s.index == 1}
            notes.append(f"mean compensation: {apply_bias_deltas(deltas, out_removed, self.mark)} consumer "
                         "layer(s) took the removed channels' mean contribution into their bias")
        forget_shapes(value_removed)
        drop_unused(model.graph, dropped)
        costs_after = _costs(model, input_shapes)

        refits: dict[str, tuple[float, float]] = {}
        repair = opts.repair if opts.repair is not None else data is not None
        if repair and data is None:
            notes.append("repair skipped: no calibration data")
        elif repair:
            unrepaired = model.clone()
            refits = self._repair(model, original, slot_removed, data, notes)
            self._compare(original, unrepaired, model, data, notes)
        elif data is None:
            notes.append("repair off: no calibration data given (accuracy is not restored)")

        rows = []
        by_node: dict[str, list[str]] = defaultdict(list)
        for g in prunable:
            if not len(plan.get(g.id, [])):
                continue
            members = g.members()
            for m in members:
                by_node[m].append(str(g.id))
            errs = [refits[m] for m in members if m in refits]
            rows.append({
                "group": g.id, "producers": [label(p) for p in g.producers], "members": members,
                "channels_before": g.size, "channels_after": g.size - len(plan[g.id]),
                "importance": scored[g.id][1],
                "macs_before": sum(costs_before.get(m, 0) for m in members),
                "macs_after": sum(costs_after.get(m, 0) for m in members),
                "refit_error_before": round(float(np.mean([e[0] for e in errs])), 5) if errs else None,
                "refit_error_after": round(float(np.mean([e[1] for e in errs])), 5) if errs else None,
            })
        total_b, total_a = sum(costs_before.values()), sum(costs_after.values())
        removed = sum(r["channels_before"] - r["channels_after"] for r in rows)
        at = " at the first calibration feed's shapes" if input_shapes else ""
        notes.append(f"{len(rows)} group(s) pruned, {removed} channel(s) removed; MACs{at} {total_b:,} -> "
                     f"{total_a:,} ({1 - total_a / max(total_b, 1):.1%} fewer)")
        return self.result(model, rows, notes)

    # ------------------------------------------------------------------------------------------------
    def _explain(self, groups: list[Group], notes: list[str]) -> None:
        ok = [g for g in groups if g.prunable]
        notes.append(f"{len(groups)} dependency group(s), {len(ok)} prunable "
                     f"({sum(len(g.producers) > 1 for g in ok)} coupling several layers)")
        blocked = [g for g in groups if not g.prunable]
        for g in blocked[:8]:
            notes.append(f"group of {', '.join(label(p) for p in g.producers[:3])} left intact: {g.reasons[0]}")
        if len(blocked) > 8:
            notes.append(f"... {len(blocked) - 8} more group(s) left intact")

    def _ratio(self, group: Group) -> float | None:
        ratio = self.options.ratio
        if not isinstance(ratio, dict):
            return float(ratio)
        for name in [label(p) for p in group.producers]:
            if name in ratio:
                return ratio[name]
        return ratio.get("*")

    def _plan(self, groups: list[Group], scores: dict[int, np.ndarray], notes: list[str]) -> dict[int, np.ndarray]:
        opts = self.options
        plan: dict[int, np.ndarray] = {}
        if opts.scope == "layer":
            for g in groups:
                r = self._ratio(g)
                if r is None:
                    continue
                keep = legal_keep(g.size, g.size - int(math.floor(r * g.size + 1e-9)), opts.min_channels,
                                  opts.round_to)
                plan[g.id] = np.sort(np.argsort(scores[g.id], kind="stable")[: g.size - keep])
            return plan
        # global: one threshold over scores normalized by each group's mean
        pool = [(s / (np.mean(s) or 1.0), g) for g in groups for s in [scores[g.id]]]
        flat = np.concatenate([p for p, _ in pool]) if pool else np.zeros(0)
        target = int(math.floor(float(opts.ratio) * flat.size))
        if target == 0:
            return plan
        threshold = np.sort(flat)[target - 1]
        for norm, g in pool:
            wanted = int(np.count_nonzero(norm <= threshold))
            floor = int(math.ceil((1.0 - opts.max_ratio) * g.size))
            keep = legal_keep(g.size, max(g.size - wanted, floor), opts.min_channels, opts.round_to)
            plan[g.id] = np.sort(np.argsort(norm, kind="stable")[: g.size - keep])
        done = sum(len(v) for v in plan.values())
        notes.append(f"global: {done} of {flat.size} channels removed ({done / max(flat.size, 1):.1%}; "
                     f"target {opts.ratio:g})")
        return plan

    def _means(self, model: ir.Model, slot_removed: dict[Slot, np.ndarray], data) -> dict[str, np.ndarray]:
        """Per-channel calibration mean of each consumer input that loses channels (one data pass)."""
        axes = {s.node.inputs[0].name: input_channel_axis(s.node) for s, r in slot_removed.items()
                if s.role == "consumer" and len(r)}
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, int] = defaultdict(int)
        for acts in stream(model, list(axes), data, self.context.threads, self.options.max_samples):
            for name, axis in axes.items():
                x = np.moveaxis(np.asarray(acts[name], dtype=np.float64), axis, -1)
                x = x.reshape(-1, x.shape[-1])
                if name in sums and sums[name].size != x.shape[1]:
                    raise GraphoptError(f"value {name!r}: the channel count changes between calibration feeds")
                sums[name] = sums.get(name, 0.0) + x.sum(axis=0)
                counts[name] += x.shape[0]
        return {name: total / max(counts[name], 1) for name, total in sums.items()}

    # ------------------------------------------------------------------------------------------------
    def _repair(self, model: ir.Model, original: ir.Model, slot_removed: dict[Slot, np.ndarray], data,
                notes: list[str]) -> dict[str, tuple[float, float]]:
        opts = self.options
        out_removed = {s.node: r for s, r in slot_removed.items() if s.role == "producer" and s.index == 1}
        consumers = {s.node for s, r in slot_removed.items() if s.role == "consumer" and len(r)}
        order = [n for n in model.graph if n in consumers]
        layers: list[tuple[LinearLayer, np.ndarray | None]] = []
        for node in order:
            layer = as_linear(node)
            if layer is None:
                notes.append(f"repair: {label(node)!r} is not a refittable linear layer")
                continue
            layers.append((layer, out_removed.get(node)))
        if not layers:
            return {}
        target_model, targets = self._targets(original, [(lay.output.name, lay, rem) for lay, rem in layers],
                                              data)
        results: dict[str, tuple[float, float]] = {}
        starved: list[str] = []
        per_round = max(1, math.ceil(len(layers) / opts.repair_rounds))
        for i in range(0, len(layers), per_round):
            chunk = [lay for lay, _ in layers[i:i + per_round]]
            moments = layer_moments(model, chunk, data, {lay.name: targets[lay.name] for lay in chunk},
                                    target_model, self.context.threads, opts.max_samples)
            for lay in chunk:
                if moments[lay.name].rows < MIN_ROWS_PER_INPUT * (lay.d_in + 1):
                    starved.append(label(lay.node))  # e.g. SE convs after GlobalAveragePool: 1 row per sample
                    continue
                res = refit_layer(lay, moments[lay.name], lam=opts.lam)
                results[label(lay.node)] = (res.error_before, res.error_after if res.changed else res.error_before)
                self.mark(lay.node)
        if starved:
            notes.append(f"repair: {len(starved)} layer(s) left as pruned (fewer than {MIN_ROWS_PER_INPUT} calibration "
                         f"rows per weight column: a refit would memorize the data): {', '.join(starved[:6])}")
        if not results:
            return results
        better = sum(1 for b, a in results.values() if a < b)
        notes.append(f"repair: {len(results)} consumer layer(s) refit, {better} improved "
                     f"(mean relative error {np.mean([b for b, _ in results.values()]):.4f} -> "
                     f"{np.mean([a for _, a in results.values()]):.4f})")
        return results

    def _targets(self, original: ir.Model, wanted: list[tuple[str, LinearLayer, np.ndarray | None]],
                 data) -> tuple[ir.Model, dict[str, str]]:
        """The model holding each layer's target (teacher if it agrees with this pass's input, else the input)
        and the value name per layer — a Gather of the kept channels when the layer lost output channels."""
        names = [w[0] for w in wanted]
        source = original
        teacher = self.context.teacher
        if teacher is not None and _agrees(original, teacher, names, data, self.context.threads):
            source = teacher
        target = source.clone()
        values = {out.name: out for node in target.graph for out in node.outputs}
        targets: dict[str, str] = {}
        for name, layer, removed in wanted:
            if removed is None or not len(removed):
                targets[layer.name] = name
                continue
            value = values[name]
            axis = 1 if layer.kind == "conv" else -1
            keep = np.setdiff1d(np.arange(layer.d_out + len(removed)), removed).astype(np.int64)
            index = ir.Value(name=f"{name}__kept_idx", const_value=ir.tensor(keep, name=f"{name}__kept_idx"),
                             shape=ir.Shape(keep.shape), type=ir.TensorType(ir.DataType.INT64))
            target.graph.register_initializer(index)
            gather = ir.Node("", "Gather", [value, index], attributes=[ir.AttrInt64("axis", axis)],
                             name=f"{name}__kept")
            gather.outputs[0].name = f"{name}__kept"
            target.graph.append(gather)
            targets[layer.name] = gather.outputs[0].name
        return target, targets

    def _compare(self, original: ir.Model, unrepaired: ir.Model, repaired: ir.Model, data,
                 notes: list[str]) -> None:
        """Calibration-set metrics of the pruned model without and with repair (in-sample for the repair)."""
        try:
            if self.context.teacher is not None:
                evaluator = self.context.calib_evaluator()
            else:
                from graphopt.metrics import Evaluator

                evaluator = Evaluator(original, data.head(self.options.max_samples), threads=self.context.threads)
            without, with_ = evaluator.evaluate(unrepaired), evaluator.evaluate(repaired)
        except GraphoptError as err:
            notes.append(f"repair comparison skipped: {err}")
            return
        notes.append(f"calibration data without repair: {without.summary()}")
        notes.append(f"calibration data with repair: {with_.summary()}")


def _agrees(a: ir.Model, b: ir.Model, names: list[str], data, threads: int) -> bool:
    """True when the named values are the same in both models on the first feed (1% relative error)."""
    have = {out.name for node in b.graph for out in node.outputs}
    if any(n not in have for n in names):
        return False
    try:
        for x, y in stream_pair(a, names, b, names, data, threads, max_samples=1):
            for n in names:
                if x[n].shape != y[n].shape:
                    return False
                err = np.linalg.norm((x[n] - y[n]).astype(np.float64))
                if err > 1e-2 * (np.linalg.norm(y[n].astype(np.float64)) + 1e-12):
                    return False
            return True
    except GraphoptError:
        return False
    return False


def _removals(groups: list[Group], plan: dict[int, np.ndarray]):
    """Removed indices per slot and per value, in their own (original) channel indexing."""
    slot_removed: dict[Slot, set] = defaultdict(set)
    value_removed: dict[ir.Value, set] = defaultdict(set)
    for g in groups:
        removed = plan.get(g.id)
        if removed is None or not len(removed):
            continue
        for link in g.links:
            part = removed[(removed >= link.start) & (removed < link.start + link.length)]
            slot_removed[link.slot].update((part - link.start + link.offset).tolist())
        for value, link in g.values:
            part = removed[(removed >= link.start) & (removed < link.start + link.length)]
            value_removed[value].update((part - link.start + link.offset).tolist())
    as_array = lambda s: np.array(sorted(s), dtype=np.int64)  # noqa: E731
    return ({k: as_array(v) for k, v in slot_removed.items()}, {k: as_array(v) for k, v in value_removed.items()})


def _costs(model: ir.Model, input_shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, int]:
    try:
        return {c.node: c.macs for c in bench.layer_costs(model, input_shapes)}
    except Exception:  # noqa: BLE001 - MACs are informative only
        return {}


def _opset(model: ir.Model) -> int:
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 13)))
