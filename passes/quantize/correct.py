"""Empirical bias correction of a QDQ model (Nagel et al. 2019, "Data-Free Quantization Through
Weight Equalization and Bias Correction", the empirical variant).

int8 weights and activations shift the mean of each layer's output: E[W̃x̃] ≠ E[Wx]. The shift is per output
channel and, through later layers, it accumulates. For each quantized Conv/ConvTranspose/Gemm/MatMul (weight
behind a DequantizeLinear, input behind Q/DQ), in graph order, the per-channel mean of (quantized output − float
output) on calibration data is subtracted from its bias (the sites and the edit: :mod:`.bias`).

The float reference is the teacher (the model before the pipeline), or inside quantize the model it quantizes:
a layer's output is matched by value name (fold_batchnorm gives the folded layer the BatchNormalization's
output name, the same tensor). When the reference's producer is the same op, its weight must be the int8
weight within half a step and its bias the layer's bias; else, for a Conv, the chain of per-channel
Mul/Div/Add/Sub after it in the reference is folded into those until they match (fuse's conv_affine keeps a
Conv's name while folding that chain into it), and the chain's end is the tensor compared. Two more guards:
the quantized output must be near the float one (mean |q − f| at most ``max_rel_error`` of mean |f|); and a
wave of corrections after which the model outputs are further from the float model's (noise-to-signal power
on the calibration feeds) than ``UNDO_FACTOR`` times before it (or at the start) is undone; and when the
kept waves together end above the start, the waves after the lowest error measured are undone too (the
allowance is for a rise later layers take back, not for a worse result). By default each
layer is its own wave, corrected after the layers before it (Nagel's sequential order): one capture run of the
quantized model per layer, the float model once.

quantize corrects its own result (option ``bias_correction``, also inside its accuracy budget's checks) and
marks the model (``metadata_props[MARKER]``); the bias_correct pass (:class:`.passes.BiasCorrect`) leaves a
marked model alone, so a bias is never corrected twice.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np
import onnx_ir as ir

from graphopt import capture
from graphopt.errors import GraphoptError
from graphopt.passes.quantize.bias import Site, apply_shift, find_sites, float_reference
from graphopt.verify import is_heavy

__all__ = ["MARKER", "capture_means", "correct_biases", "is_corrected", "mark_corrected"]
MARKER = "graphopt.bias_corrected"  # metadata_props key set on a corrected model (value: who corrected it)
UNDO_FACTOR = 2.0  # a wave leaving the output noise/signal power above this × min(before it, at the start): undone


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


def capture_means(model: ir.Model, sites: Sequence[Site], outputs: Sequence[str], dataset, threads: int,
                  samples: int, other: ir.Model | None = None) -> tuple[_Means, list[list[np.ndarray]], Any]:
    """Per-channel means of the sites' outputs and the graph outputs per feed; with ``other`` (the float model),
    the same for it in lockstep plus mean |q − f| per site: (means, outputs, (other means, other outputs, diff)).
    A heavy float model runs first, alone, its values kept for the ``samples`` feeds."""
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
    if is_heavy(other):  # one session at a time: the float weights never sit beside the quantized ones
        floats = list(capture.stream(other, o_names, dataset, threads, samples))  # the sites' values, kept
        pairs: Any = zip(capture.stream(model, names, dataset, threads, samples), floats)
    else:
        pairs = capture.stream_pair(model, names, other, o_names, dataset, threads, samples)
    for q, f in pairs:
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
    keep = _with_reference(sites, float_model, rows)
    if not keep:
        notes.append("no quantized Conv/Gemm/MatMul with a float counterpart: nothing corrected")
        return rows, notes
    means, outs, (ref, ref_outs, diff) = capture_means(quant_model, keep, outputs, dataset, threads, samples,
                                                       other=float_model)
    good = _near_float(keep, means, ref, diff, max_rel_error, rows)
    run = _Waves(quant_model, outputs, dataset, threads, samples, mark, ref, ref_outs, means, outs)
    n_waves = len(good) if waves == 0 else max(1, min(waves, len(good)))
    groups = [[good[i] for i in g] for g in np.array_split(np.arange(len(good)), n_waves) if len(g)]
    for w, wave in enumerate(groups):
        following = groups[w + 1] if w + 1 < len(groups) else []
        if not run.correct(w, wave, following, rows, notes):
            break
    run.settle()
    corrected = sum(r["action"] == "bias corrected" for r in rows)
    notes.append(f"bias correction: {corrected} of {len(sites) + len(skipped)} quantized weight ops corrected "
                 f"({len(groups)} waves, up to {samples} calibration samples); output noise/signal vs float "
                 f"{run.start_error:.3g} -> {run.error:.3g}"
                 + (f"; {run.undone} undone with their wave" if run.undone else ""))
    return rows, notes


def _with_reference(sites: list[Site], float_model: ir.Model, rows: list[dict]) -> list[Site]:
    """The sites with a float tensor to compare with (``Site.ref`` set); a row for each other one."""
    keep: list[Site] = []
    for s in sites:
        s.ref, reason = float_reference(s, float_model)
        if reason:
            rows.append({"node": s.node.name, "op": s.node.op_type, "action": "bias kept", "reason": reason})
        else:
            keep.append(s)
    return keep


def _near_float(sites: list[Site], means: _Means, ref: _Means, diff: dict[str, float], max_rel_error: float,
                rows: list[dict]) -> list[Site]:
    """The sites whose quantized output is near its float tensor (mean |q − f| / mean |f| at most
    ``max_rel_error``, same channel count); a row for each other one."""
    good: list[Site] = []
    for s in sites:
        spread = ref.mean_abs(s.output, s.channels)
        rel = diff[s.output] / max(means.count[s.output] * s.channels, 1) / max(spread, 1e-30)
        if not np.isfinite(rel) or rel > max_rel_error or ref.sums[s.output].shape != (s.channels,):
            rows.append({"node": s.node.name, "op": s.node.op_type, "action": "bias kept",
                         "reason": f"output differs from the float tensor of the same name (rel. error {rel:.2f})"})
        else:
            good.append(s)
    return good


@dataclasses.dataclass
class _Waves:
    """The wave-by-wave correction of one quantized model: its fixed inputs, the float model's per-channel means
    and outputs, and what the last capture measured (``means``, ``outs``, ``error``)."""

    model: ir.Model
    outputs: list[str]
    dataset: Any
    threads: int
    samples: int
    mark: Callable[[ir.Node], ir.Node]
    ref: _Means  # the float model's per-channel means (keyed by the quantized output names)
    ref_outs: list[list[np.ndarray]]  # the float model's outputs per feed
    means: _Means  # the quantized model's per-channel means, as of the last capture
    outs: list[list[np.ndarray]]  # its outputs per feed, as of the last capture
    error: float = 0.0  # output noise/signal vs float after the last kept wave
    start_error: float = 0.0  # ... before any correction
    undone: int = 0  # layers whose wave was undone
    kept: list = dataclasses.field(default_factory=list)  # per kept wave: (w, its undos, its rows, error after it)

    def __post_init__(self) -> None:
        self.error = self.start_error = _output_error(self.outs, self.ref_outs)

    def settle(self) -> None:
        """When the kept waves end above the start error (each stayed within UNDO_FACTOR, none was taken back by
        a later one), undo the waves after the lowest error measured (maybe all): the result is never worse than
        no correction on the feeds it was measured on."""
        if self.error <= self.start_error or not self.kept:
            return
        errors = [self.start_error] + [k[3] for k in self.kept]
        best = int(np.argmin(errors))  # keep the first ``best`` kept waves
        first, final = self.kept[best][0], self.error
        for _, undo, wave_rows, _ in reversed(self.kept[best:]):
            for fn in reversed(undo):
                fn()
            self.undone += len(wave_rows)
            for r in wave_rows:
                r.update(action="bias kept", reason=f"the waves from {first + 1} on left the output error above the "
                                                    f"start ({self.start_error:.3g} -> {final:.3g}): undone")
        del self.kept[best:]
        self.error = errors[best]

    def measure(self, sites: Sequence[Site]) -> None:
        """Capture the quantized model again: the means of ``sites`` (the next wave) and the outputs."""
        self.means, self.outs, _ = capture_means(self.model, sites, self.outputs, self.dataset, self.threads,
                                                 self.samples)

    def correct(self, w: int, wave: list[Site], following: list[Site], rows: list[dict], notes: list[str]) -> bool:
        """Correct wave ``w``, measure it, undo it when it raised the output error; False: stop here (the wave
        could not be measured)."""
        undo, wave_rows = self.shift(w, wave, rows)
        try:
            self.measure(following)
        except GraphoptError as err:  # the wave's edits cannot be measured: undo them and stop here
            for fn in reversed(undo):
                fn()
            notes.append(f"bias correction stopped at wave {w + 1} (its edits undone): {err}")
            return False
        after = _output_error(self.outs, self.ref_outs)
        # A wave that makes the outputs clearly worse is undone (and the next wave measured again). Not any rise:
        # an early layer's correction can cost a little at the outputs until the later layers are corrected.
        if after > UNDO_FACTOR * min(self.error, self.start_error):
            for fn in reversed(undo):
                fn()
            self.undone += len(wave)
            for r in wave_rows:
                r.update(action="bias kept", reason=f"wave {w + 1} raised the output error "
                                                    f"({self.error:.3g} -> {after:.3g}): undone")
            if following:
                self.measure(following)
        else:
            self.error = after
            if wave_rows:
                self.kept.append((w, undo, wave_rows, after))
        rows += wave_rows
        return True

    def shift(self, w: int, wave: list[Site], rows: list[dict]) -> tuple[list[Callable[[], None]], list[dict]]:
        """Subtract each site's mean shift from its bias: (the undos, the wave's rows); a site whose bias cannot
        be edited gets its row in ``rows`` at once."""
        undo, wave_rows = [], []
        for s in wave:
            delta = self.means.mean(s.output) - self.ref.mean(s.output)
            spread = self.ref.mean_abs(s.output, s.channels)
            done, fn = apply_shift(s, delta, self.mark)
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
        return undo, wave_rows
