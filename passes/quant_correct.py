"""bias_correct: empirical bias correction of a QDQ model (Nagel et al. 2019, "Data-Free Quantization Through
Weight Equalization and Bias Correction", the empirical variant).

int8 weights and activations shift the mean of each layer's output: E[W̃x̃] ≠ E[Wx]. The shift is per output
channel and, through later layers, it accumulates. For each quantized Conv/ConvTranspose/Gemm/MatMul (weight
behind a DequantizeLinear, input behind Q/DQ), in graph order, the per-channel mean of (quantized output − float
output) on calibration data is subtracted from its bias (the sites and the edit: :mod:`.quant_bias`).

The float reference is the teacher (the model before the pipeline), or inside quantize the model it quantizes:
a layer's output is matched by value name (fold_batchnorm gives the folded layer the BatchNormalization's
output name, the same tensor). When the reference's producer is the same op, its weight must be the int8
weight within half a step and its bias the layer's bias; else, for a Conv, the chain of per-channel
Mul/Div/Add/Sub after it in the reference is folded into those until they match (fuse's conv_affine keeps a
Conv's name while folding that chain into it), and the chain's end is the tensor compared. Two more guards:
the quantized output must be near the float one (mean |q − f| at most ``max_rel_error`` of mean |f|); and a
wave of corrections after which the model outputs are further from the float model's (noise-to-signal power
on the calibration feeds) than ``UNDO_FACTOR`` times before it (or at the start) is undone. By default each
layer is its own wave, corrected after the layers before it (Nagel's sequential order): one capture run of the
quantized model per layer, the float model once.

quantize corrects its own result (option ``bias_correction``, also inside its accuracy budget's checks) and
marks the model (``metadata_props[MARKER]``); bias_correct leaves a marked model alone, so a bias is never
corrected twice.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import onnx_ir as ir

from graphopt import capture
from graphopt.errors import GraphoptError
from graphopt.options import BaseOptions, option
from graphopt.passbase import GraphoptPass, GraphoptResult
from graphopt.passes.quant_bias import Site, _bias_now, _dq_input, _scalar_or_vector, apply_shift, find_sites
from graphopt.weights import constant_array

__all__ = ["MARKER", "BiasCorrect", "BiasCorrectOptions", "Site", "apply_shift", "correct_biases", "find_sites",
           "is_corrected", "mark_corrected"]
MARKER = "graphopt.bias_corrected"  # metadata_props key set on a corrected model (value: who corrected it)
UNDO_FACTOR = 2.0  # a wave leaving the output noise/signal power above this × min(before it, at the start): undone


@dataclasses.dataclass(frozen=True)
class BiasCorrectOptions(BaseOptions):
    samples: int = option(32, "calibration samples the per-channel means are measured on", low=1)
    waves: int = option(0, "0: one layer per capture run, in graph order (Nagel's sequential order); N: layers "
                        "corrected in N consecutive groups, one run each (cheaper, but a group over-corrects: "
                        "each layer's shift also holds its group's upstream shifts; on PP-OCRv4 rec 8 groups "
                        "took line accuracy 0.88 -> 0.12)", low=0)
    max_rel_error: float = option(0.5, "a layer whose quantized output differs from the teacher's tensor of the "
                                  "same name by more than this (mean |q-f| / mean |f|) is left alone", low=0.0)


def is_corrected(model: ir.Model) -> str | None:
    """Who already bias-corrected ``model`` (its marker), or None."""
    return model.metadata_props.get(MARKER)


def mark_corrected(model: ir.Model, by: str) -> None:
    model.metadata_props[MARKER] = by


# --- measuring ----------------------------------------------------------------------------------------------


def _channel_sums(x: np.ndarray, axis: int) -> tuple[np.ndarray, int]:
    rows = np.moveaxis(np.asarray(x, np.float64), axis, 0)
    rows = rows.reshape(rows.shape[0], -1)
    return rows.sum(axis=1), rows.shape[1]


class _Means:
    """Running per-channel means of several tensors, and their mean |x| (:meth:`mean_abs`)."""

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.abs_sum: dict[str, float] = {}
        self.count: dict[str, int] = {}

    def add(self, name: str, x: np.ndarray, axis: int) -> None:
        s, n = _channel_sums(x, axis)
        if name in self.sums:
            if s.shape != self.sums[name].shape:
                raise GraphoptError(f"bias_correct: {name!r} changes its channel count between feeds")
            self.sums[name] += s
        else:
            self.sums[name], self.abs_sum[name], self.count[name] = s, 0.0, 0
        self.abs_sum[name] += float(np.abs(x).sum(dtype=np.float64))
        self.count[name] += n

    def mean(self, name: str) -> np.ndarray:
        return self.sums[name] / max(self.count[name], 1)

    def mean_abs(self, name: str, channels: int) -> float:
        """Mean |x| over every element (count holds rows per channel)."""
        return self.abs_sum[name] / max(self.count[name] * channels, 1)


def _capture(model: ir.Model, sites: Sequence[Site], outputs: Sequence[str], dataset, threads: int, samples: int,
             other: ir.Model | None = None) -> tuple[_Means, list[list[np.ndarray]], Any]:
    """Per-channel means of the sites' outputs and the graph outputs per feed; with ``other`` (the float model),
    the same for it in lockstep plus mean |q − f| per site: (means, outputs, (other means, other outputs, diff))."""
    names = [*dict.fromkeys([s.output for s in sites] + list(outputs))]
    means, outs = _Means(), []
    if other is None:
        for got in capture.stream(model, names, dataset, threads, samples):
            for s in sites:
                means.add(s.output, got[s.output], s.axis)
            outs.append([got[n] for n in outputs])
        return means, outs, None
    o_means, o_outs, diff = _Means(), [], {s.output: 0.0 for s in sites}
    o_names = [*dict.fromkeys([s.ref or s.output for s in sites] + list(outputs))]
    for q, f in capture.stream_pair(model, names, other, o_names, dataset, threads, samples):
        for s in sites:
            qv, fv = q[s.output], f[s.ref or s.output]
            means.add(s.output, qv, s.axis)
            o_means.add(s.output, fv, s.axis)  # keyed by the quantized name: the pair is compared
            same = qv.shape == fv.shape
            diff[s.output] += float(np.abs(qv - fv).sum(dtype=np.float64)) if same else np.inf
        outs.append([q[n] for n in outputs])
        o_outs.append([f[n] for n in outputs])
    return means, outs, (o_means, o_outs, diff)


def _output_error(outs: list[list[np.ndarray]], ref: list[list[np.ndarray]]) -> float:
    """Noise-to-signal power of the model outputs against the float model's (summed over outputs and feeds)."""
    num = den = 0.0
    for got, want in zip(outs, ref):
        for g, r in zip(got, want):
            r64 = np.asarray(r, np.float64)
            num += float(np.square(np.asarray(g, np.float64) - r64).sum())
            den += float(np.square(r64).sum())
    return num / max(den, 1e-30)


def _mismatch(node: ir.Node, tw: np.ndarray, tb: np.ndarray | None) -> str | None:
    """Why float weight ``tw`` / bias ``tb`` are not the ones this quantized layer was made from (None: they are)."""
    w_dq = _dq_input(node.inputs[1])
    q, sw = constant_array(w_dq.inputs[0]), _scalar_or_vector(w_dq.inputs[1])
    if q is None or sw is None:
        return None
    if tw.shape != q.shape:
        return f"float weight shape {tw.shape} != int8 weight shape {q.shape}"
    shape = [1] * q.ndim
    if sw.size > 1:
        shape[w_dq.attributes.get_int("axis", 1)] = -1
    err = np.abs(tw - q.astype(np.float64) * sw.reshape(shape))
    if float(err.max(initial=0.0)) > 0.51 * float(sw.max()) + 1e-12:
        return "float weight of the same-named output is not this layer's weight (a fused Mul/Div?)"
    if node.op_type == "MatMul" or tb is None:
        return None
    b, step = _bias_now(node)
    if b is not None and (b.shape != tb.shape or float(np.abs(b - tb).max(initial=0.0)) > max(
            0.51 * step, 1e-5 * (1.0 + float(np.abs(tb).max(initial=0.0))))):
        return "float bias of the same-named output is not this layer's bias (a fused Add/Sub?)"
    return None


_AFFINE = ("Mul", "Div", "Add", "Sub")


def _affine_step(value: ir.Value, channels: int, rank: int) -> tuple[ir.Value, str, np.ndarray] | None:
    """(next value, op, per-channel constant) when ``value``'s only consumer is x·c, x/c, x+c or x−c with c
    constant per channel (axis 1): the ops fuse's conv_affine folds into a Conv."""
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    user, idx = uses[0].node, uses[0].idx
    if user.op_type not in _AFFINE or len(user.inputs) != 2 or (idx == 1 and user.op_type in ("Sub", "Div")):
        return None
    c = constant_array(user.inputs[1 - idx])
    if c is None or c.ndim > rank:
        return None
    padded = (1,) * (rank - c.ndim) + tuple(c.shape)
    if c.size != 1 and (c.size != channels or padded[1] != channels):
        return None
    vec = np.broadcast_to(np.asarray(c, np.float64).reshape(-1), (channels,))
    return user.outputs[0], user.op_type, vec


def _reference(site: Site, float_model: ir.Model) -> tuple[str | None, str | None]:
    """(teacher value name to compare the site's output with, or None and why not).

    The same name, unless the teacher's producer is the same op with other weights: then fuse's conv_affine
    folded Mul/Add/Sub/Div by per-channel constants into this Conv but kept the Conv's output name, and the
    tensor to compare with is at the end of that chain in the teacher (found by folding it into the teacher's
    weights until they match the int8 ones)."""
    value = capture._main_values(float_model.graph).get(site.output)
    if value is None:
        return None, f"output {site.output!r} has no counterpart in the float model"
    node, producer = site.node, value.producer()
    if producer is None or producer.op_type != node.op_type:
        return site.output, None  # e.g. a BatchNormalization folded into the layer: same tensor, other producer
    tw = constant_array(producer.inputs[1]) if len(producer.inputs) > 1 else None
    if tw is None:
        return site.output, None
    tw = tw.astype(np.float64)
    tb = constant_array(producer.inputs[2]) if len(producer.inputs) > 2 and producer.inputs[2] is not None else None
    tb = np.zeros(site.channels) if tb is None else tb.astype(np.float64).reshape(-1)
    reason = _mismatch(node, tw, tb)
    if reason is None or node.op_type != "Conv" or tb.shape != (site.channels,):
        return (site.output, None) if reason is None else (None, reason)
    shape = (-1,) + (1,) * (tw.ndim - 1)
    while (step := _affine_step(value, site.channels, tw.ndim)) is not None:
        value, op, vec = step
        if op == "Mul":
            tw, tb = tw * vec.reshape(shape), tb * vec
        elif op == "Div":
            tw, tb = tw / vec.reshape(shape), tb / vec
        else:
            tb = tb + vec if op == "Add" else tb - vec
        if _mismatch(node, tw, tb) is None:
            return value.name, None
    return None, reason


# --- the whole correction -----------------------------------------------------------------------------------


def correct_biases(float_model: ir.Model, quant_model: ir.Model, dataset, threads: int = 1, samples: int = 32,
                   waves: int = 0, max_rel_error: float = 0.5, mark=lambda n: n) -> tuple[list[dict], list[str]]:
    """Correct ``quant_model`` (QDQ, edited in place) against ``float_model``; returns (rows, notes).

    Cost: one lockstep run of both models, then one run of the quantized model per wave, each over ``samples``
    calibration feeds (usable inside quantize's budget loop). A wave whose corrections make the model outputs
    further from the float model's (noise-to-signal power on the same feeds) is undone."""
    sites, skipped = find_sites(quant_model)
    notes: list[str] = []
    rows = [{"node": n, "action": "bias kept", "reason": r} for n, r in skipped.items()]
    outputs = [v.name for v in quant_model.graph.outputs]
    if any(n not in {v.name for v in float_model.graph.outputs} for n in outputs):
        notes.append("the float model's outputs differ from the quantized model's: nothing corrected")
        return rows, notes
    keep: list[Site] = []
    for s in sites:
        s.ref, reason = _reference(s, float_model)
        if reason:
            rows.append({"node": s.node.name, "op": s.node.op_type, "action": "bias kept", "reason": reason})
        else:
            keep.append(s)
    if not keep:
        notes.append("no quantized Conv/Gemm/MatMul with a float counterpart: nothing corrected")
        return rows, notes
    means, outs, (ref, ref_outs, diff) = _capture(quant_model, keep, outputs, dataset, threads, samples,
                                                   other=float_model)
    good: list[Site] = []
    for s in keep:
        spread = ref.mean_abs(s.output, s.channels)
        rel = diff[s.output] / max(means.count[s.output] * s.channels, 1) / max(spread, 1e-30)
        if not np.isfinite(rel) or rel > max_rel_error or ref.sums[s.output].shape != (s.channels,):
            rows.append({"node": s.node.name, "op": s.node.op_type, "action": "bias kept",
                         "reason": f"output differs from the float tensor of the same name (rel. error {rel:.2f})"})
        else:
            good.append(s)
    error = start_error = _output_error(outs, ref_outs)
    n_waves = len(good) if waves == 0 else max(1, min(waves, len(good)))
    groups = [[good[i] for i in g] for g in np.array_split(np.arange(len(good)), n_waves) if len(g)]
    undone = 0
    for w, wave in enumerate(groups):
        undo, wave_rows = [], []
        for s in wave:
            delta = means.mean(s.output) - ref.mean(s.output)
            spread = ref.mean_abs(s.output, s.channels)
            done, fn = apply_shift(s, delta, mark)
            undo.append(fn)
            if done["bias"].startswith("skipped"):  # nothing was edited: not a correction
                rows.append({"node": s.node.name, "op": s.node.op_type, "action": "bias kept",
                             "reason": done["bias"].removeprefix("skipped: ")})
                continue
            wave_rows.append({"node": s.node.name, "op": s.node.op_type, "action": "bias corrected", **done,
                              **({"float_tensor": s.ref} if s.ref != s.output else {}),
                              "channels": s.channels, "wave": w + 1, "mean_shift": float(np.mean(np.abs(delta))),
                              "max_shift": float(np.max(np.abs(delta))),
                              "shift_vs_mean_abs": float(np.mean(np.abs(delta)) / max(spread, 1e-30))})
        following = groups[w + 1] if w + 1 < len(groups) else []
        try:
            means, outs, _ = _capture(quant_model, following, outputs, dataset, threads, samples)
        except GraphoptError as err:  # the wave's edits cannot be measured: undo them and stop here
            for fn in reversed(undo):
                fn()
            notes.append(f"bias correction stopped at wave {w + 1} (its edits undone): {err}")
            break
        after = _output_error(outs, ref_outs)
        # A wave that makes the outputs clearly worse is undone (and the next wave measured again). Not any rise:
        # an early layer's correction can cost a little at the outputs until the later layers are corrected.
        if after > UNDO_FACTOR * min(error, start_error):
            for fn in reversed(undo):
                fn()
            undone += len(wave)
            for r in wave_rows:
                r.update(action="bias kept", reason=f"wave {w + 1} raised the output error "
                                                    f"({error:.3g} -> {after:.3g}): undone")
            if following:
                means, outs, _ = _capture(quant_model, following, outputs, dataset, threads, samples)
        else:
            error = after
        rows += wave_rows
    corrected = sum(r["action"] == "bias corrected" for r in rows)
    notes.append(f"bias correction: {corrected} of {len(sites) + len(skipped)} quantized weight ops corrected "
                 f"({len(groups)} waves, up to {samples} calibration samples); output noise/signal vs float "
                 f"{start_error:.3g} -> {error:.3g}" + (f"; {undone} undone with their wave" if undone else ""))
    return rows, notes


class BiasCorrect(GraphoptPass):
    """Empirical bias correction after quantize: per-channel output mean shifts subtracted from biases."""

    name = "bias_correct"
    summary = "after quantize: subtract each int8 layer's per-channel output mean shift (vs float) from its bias"
    Options = BiasCorrectOptions
    data_required = True
    exact = False

    def call(self, model: ir.Model) -> GraphoptResult:
        by = is_corrected(model)
        if by:
            return self.result(model, [], [f"biases already corrected by {by} (metadata_props {MARKER!r}): nothing "
                                           "done (correcting twice would subtract each shift twice)"], modified=False)
        data = self.context.require_calib(self.name)
        if self.context.teacher is None:
            raise GraphoptError("pass 'bias_correct' needs the float teacher (run it in a pipeline with real "
                                "calibration data, after quantize)")
        if not any(n.op_type == "DequantizeLinear" for n in model.graph):
            return self.result(model, [], ["no QDQ in the model: run quantize before bias_correct"], modified=False)
        rows, notes = correct_biases(self.context.teacher, model, data, self.context.threads, self.options.samples,
                                     self.options.waves, self.options.max_rel_error, self.mark)
        modified = any(r["action"] == "bias corrected" for r in rows)
        if modified:
            mark_corrected(model, self.name)
        return self.result(model, rows, notes, modified=modified)
