"""Channel importance of a dependency group: one score per channel, higher = keep.

Every member of a group (a producer's filters, a BatchNorm's γ, a consumer's input activation) gives one
vector over the group's removal units — the sum over the unit's channels in that tensor, all its links
together (a unit of a channel-shuffle group is scattered over many one-channel links; normalizing each link
alone would make every score 1) — each vector is normalized by its mean and the vectors are summed, so a
group of three producers meeting at a residual Add weighs each producer alike (Torch-Pruning's group
reduction). The result is divided by the unit's channel count: units of different sizes compare by score
per channel (else a bigger unit would always look more important).

One class per criterion behind :class:`Importance` (as Torch-Pruning's ``importance.py``): ``vectors`` gives
the member vectors of a group, ``score`` combines them (a criterion with nothing to measure falls back to
l1); :func:`criterion` picks the class by the option value. Criteria:
- ``l1`` / ``l2``: norms of the producers' output filters (weight slices; biases excluded);
- ``bn``: |γ| of the group's BatchNorms and per-channel Mul scales (network slimming); l1 when there are none;
- ``activation``: mean |x| of the channel where consumer layers read it (calibration data; a MatMul reads
  its input's last axis, a Conv axis 1);
- ``reconstruction``: E[x²]·‖W_next[:, c]‖² summed over consumers — the first-order error of a consumer's
  output when channel c is removed.

Between groups (channel_prune scope=sensitivity): :func:`graphopt.sensitivity.row_loss` turns a measured
sensitivity row (one group pruned alone) into a loss and :func:`graphopt.sensitivity.allocate` spends a MAC
budget on the cheapest losses.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx_ir as ir

from graphopt.capture import TensorStats, stream
from graphopt.graphs import input_channel_axis
from graphopt.passes.channels.types import Group, Link, const_array


def _per_entry(array: np.ndarray, axis: int, kind: str) -> np.ndarray:
    moved = np.moveaxis(np.abs(array.astype(np.float64)), axis, 0).reshape(array.shape[axis], -1)
    if kind == "l1":
        return moved.sum(axis=1)
    if kind == "l2":
        return np.sqrt(np.square(moved).sum(axis=1))
    if kind == "sq":
        return np.square(moved).sum(axis=1)
    return moved.mean(axis=1)  # "abs": one value per entry (vectors)


def _to_group(link: Link, entries: np.ndarray, block: int, size: int) -> np.ndarray:
    """Entries of a slot/value (channels × block, blocks summed) -> [size] over the group (NaN where absent)."""
    per_channel = entries.reshape(-1, block).sum(axis=1) if block > 1 else entries
    out = np.full(size, np.nan)
    out[link.start:link.start + link.length] = per_channel[link.offset:link.offset + link.length]
    return out


def combine(vectors: list[np.ndarray], size: int) -> np.ndarray:
    """Sum of mean-normalized member vectors (NaN = member does not cover that channel)."""
    total = np.zeros(size)
    for v in vectors:
        scale = np.nanmean(np.abs(v)) if np.any(np.isfinite(v)) else 0.0
        if scale > 0:
            total += np.nan_to_num(v / scale, nan=0.0)
    return total


def _per_slot(group: Group, parts: list[tuple[Link, np.ndarray, int]]) -> list[np.ndarray]:
    """One vector per slot (tensor): its links' entries summed per unit, NaN where the slot has none."""
    by_slot: dict[int, np.ndarray] = {}
    for link, entries, block in parts:
        v = _to_group(link, entries, block, group.size)
        have = by_slot.get(id(link.slot))
        by_slot[id(link.slot)] = v if have is None else np.where(
            np.isnan(have) & np.isnan(v), np.nan, np.nan_to_num(have) + np.nan_to_num(v))
    return list(by_slot.values())


def consumer_links(group: Group) -> list[Link]:
    return [k for k in group.links if k.slot.role == "consumer"]


def needed_values(groups: list[Group]) -> dict[str, int]:
    """Values whose per-channel statistics data-driven importance needs (the consumers' inputs), each with the
    axis its consumer reads as channels (a MatMul reads the last: [N, T, D] holds D channels)."""
    axes: dict[str, int] = {}
    for g in groups:
        for k in consumer_links(g):
            axes.setdefault(k.slot.node.inputs[0].name, input_channel_axis(k.slot.node))
    return axes


def consumer_stats(model: ir.Model, groups: list[Group], data, threads: int,
                   max_samples: int) -> dict[str, TensorStats]:
    """Running statistics of every consumer input, its channels moved to axis 1 (where TensorStats keeps
    per-channel sums): one data pass."""
    axes = needed_values(groups)
    stats = {name: TensorStats() for name in axes}
    for acts in stream(model, list(axes), data, threads, max_samples):
        for name, s in stats.items():
            x = np.asarray(acts[name])
            if x.ndim > 2 and axes[name] % x.ndim != 1:
                x = np.moveaxis(x, axes[name], 1)
            s.update(x)
    return stats


class Importance:
    """A criterion: ``score`` gives one score per channel of each removal unit of a group (higher = keep)."""

    name: ClassVar[str]
    needs_data: ClassVar[bool] = False  # scores from calibration statistics of :func:`needed_values`

    def vectors(self, group: Group, stats: dict[str, TensorStats] | None) -> list[np.ndarray] | None:
        """One vector per member tensor over the group's units (NaN where absent); None: nothing to measure."""
        raise NotImplementedError

    def score(self, group: Group, stats: dict[str, TensorStats] | None = None) -> tuple[np.ndarray, str]:
        """(score per channel of each removal unit, the criterion actually used — l1 when this one has
        nothing to measure)."""
        vectors = self.vectors(group, stats)
        if vectors is None:
            return L1().score(group, stats)
        scores = combine(vectors, group.size)
        if group.unit_sizes is not None:
            scores = scores / np.asarray(group.unit_sizes, dtype=np.float64)
        return scores, self.name


class L1(Importance):
    """L1 norm of the producers' output filters (weight slices; biases excluded)."""

    name = "l1"

    def vectors(self, group: Group, stats: dict[str, TensorStats] | None) -> list[np.ndarray]:
        parts = []
        for link in group.links:
            slot = link.slot
            if slot.role == "producer" and slot.index == 1:
                w = const_array(slot.node.inputs[1])
                if w is not None:
                    parts.append((link, _per_entry(w, slot.axis, self.name), slot.block))
        return _per_slot(group, parts)


class L2(L1):
    """L2 norm of the producers' output filters."""

    name = "l2"


class BatchNormScale(Importance):
    """|γ| of the group's BatchNorms and per-channel Mul scales (network slimming)."""

    name = "bn"

    def vectors(self, group: Group, stats: dict[str, TensorStats] | None) -> list[np.ndarray] | None:
        parts = []
        for link in group.links:
            slot = link.slot
            op = slot.node.op_type
            if (op == "BatchNormalization" and slot.index == 1) or (op == "Mul" and slot.role == "member"):
                c = const_array(slot.node.inputs[slot.index])
                if c is not None:
                    parts.append((link, _per_entry(c, slot.axis, "abs"), slot.block))
        return _per_slot(group, parts) or None


class Activation(Importance):
    """Mean |x| of the channel where consumer layers read it (calibration data)."""

    name = "activation"
    needs_data = True

    def vectors(self, group: Group, stats: dict[str, TensorStats] | None) -> list[np.ndarray] | None:
        if stats is None:
            return None
        parts = [(link, s.channel_mean_abs() / link.slot.block, link.slot.block)
                 for link, s in _consumer_stats(group, stats)]
        return _per_slot(group, parts) or None


class Reconstruction(Importance):
    """E[x²]·‖W_next[:, c]‖² summed over consumers: the first-order error of their outputs when c is removed."""

    name = "reconstruction"
    needs_data = True

    def vectors(self, group: Group, stats: dict[str, TensorStats] | None) -> list[np.ndarray] | None:
        if stats is None:
            return None
        parts = []
        for link, s in _consumer_stats(group, stats):
            slot = link.slot
            w = const_array(slot.node.inputs[1])
            if w is None:
                continue
            col = _per_entry(w, slot.axis, "sq")  # ‖W[:, entry]‖² over outputs (and kernel taps)
            parts.append((link, s.channel_sumsq / max(s.channel_count, 1) * col, slot.block))
        vectors = _per_slot(group, parts)
        if not vectors:
            return None
        stack = np.array(vectors)  # first-order errors of all consumers add up: one vector
        seen = np.isfinite(stack).any(axis=0)
        return [np.where(seen, np.nansum(stack, axis=0), np.nan)]


def _consumer_stats(group: Group, stats: dict[str, TensorStats]) -> list[tuple[Link, TensorStats]]:
    """Consumer links whose input statistics are laid out as the slot (the capture's channel axis is 1)."""
    out = []
    for link in consumer_links(group):
        slot = link.slot
        s = stats.get(slot.node.inputs[0].name)
        if s is not None and s.channel_sum is not None and s.channel_sum.size == slot.channels * slot.block:
            out.append((link, s))
    return out


CRITERIA: dict[str, type[Importance]] = {c.name: c for c in (L1, L2, BatchNormScale, Activation, Reconstruction)}
KINDS = tuple(CRITERIA)


def criterion(name: str) -> Importance:
    """The criterion named by channel_prune's ``importance`` option."""
    if name not in CRITERIA:
        raise ValueError(f"unknown channel importance {name!r} (one of {', '.join(KINDS)})")
    return CRITERIA[name]()


def group_scores(group: Group, kind: str, stats: dict[str, TensorStats] | None = None) -> tuple[np.ndarray, str]:
    """:meth:`Importance.score` of the criterion named ``kind``."""
    return criterion(kind).score(group, stats)
