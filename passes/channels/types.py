"""Data model of the channel analysis, shared by every module of the package.

A value that carries channels has a :class:`Chan` state: segments (atom, start, length) laid out along its
channel axis; attention heads lay ``per`` consecutive channels on each position of the axis (the head axis),
their ``per`` features on an ``inner`` axis, or on none once a score MatMul contracted them. Every tensor
that must shrink is a :class:`Slot`; a :class:`Link` says where a range of a group's channels lands in a
slot. A :class:`Group` is what the pass prunes: ``size`` removal units, each unit
one channel — or, under grouped-conv / channel-shuffle constraints, a fixed set of channels (``unit_sizes``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphopt.graphs import attr as _attr, is_default_domain
from graphopt.weights import constant_array


Element = tuple[int, int]  # (atom, channel)
_INTEGER_TYPES = frozenset(int(t) for t in (ir.DataType.INT8, ir.DataType.INT16, ir.DataType.INT32, ir.DataType.INT64,
                                            ir.DataType.UINT8, ir.DataType.UINT16, ir.DataType.UINT32,
                                            ir.DataType.UINT64))


def label(node: ir.Node) -> str:
    return node.name or (node.outputs[0].name if node.outputs else "") or node.op_type


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """A plain float/int constant behind ``value``: an initializer, a Constant node, or Unsqueeze/Reshape/
    Squeeze/Identity/Cast of one (the per-channel constants old exporters apply through Unsqueeze)."""
    if value is None:
        return None
    array = constant_array(value, nodes=True)  # graph-input defaults are not constants
    if array is not None or value.is_graph_input():
        return array
    node = value.producer()
    if node is None or not is_default_domain(node):
        return None
    if node.op_type == "Cast":
        # Integers only (Paddle's exports build Reshape targets from Cast(int32 constant)); a Cast weight
        # (float16 stored, float32 computed) is left as it is, so no pass rewrites its storage type.
        data = const_array(node.inputs[0])
        to = int(_attr(node, "to", 0))
        if data is None or data.dtype.kind not in "iu" or to not in _INTEGER_TYPES:
            return None
        return data.astype(ir.DataType(to).numpy())
    if node.op_type in ("Identity", "Unsqueeze", "Squeeze", "Reshape"):
        data = const_array(node.inputs[0])
        if data is None:
            return None
        if node.op_type == "Identity":
            return data
        second = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if node.op_type == "Reshape":
            return None if second is None or np.any(second <= 0) else data.reshape(second.astype(int))
        axes = second if second is not None else _attr(node, "axes", None)
        if axes is None:
            return np.squeeze(data) if node.op_type == "Squeeze" else None
        axes = [int(a) for a in np.asarray(axes).reshape(-1)]
        if node.op_type == "Squeeze":
            return np.squeeze(data, axis=tuple(a % data.ndim for a in axes))
        rank = data.ndim + len(axes)
        return np.expand_dims(data, tuple(sorted(a % rank for a in axes)))
    return None


@dataclass(eq=False)
class Slot:
    """A constant input of ``node`` (``index``) whose ``axis`` runs over ``channels`` × ``block`` entries.
    ``groups`` > 1: the input-channel axis of a grouped Conv weight — the slot's channel indices are the
    Conv's input channels (``channels`` of them) while the weight axis holds channels/groups; each group
    loses its own columns (equal counts, guaranteed by the analysis)."""

    node: ir.Node
    index: int
    axis: int
    channels: int
    block: int = 1
    role: str = "member"  # producer | member | consumer
    groups: int = 1


@dataclass
class Link:
    slot: Slot
    offset: int  # slot channel of the atom's channel ``start``
    start: int
    length: int


@dataclass
class Seg:
    atom: int
    start: int
    length: int


@dataclass
class Chan:
    segs: list[Seg]
    axis: int  # negative: counted from the end
    block: int = 1
    per: int = 1  # channels per position of the axis (attention heads: the head size)
    inner: int | None = None  # per > 1: the axis of a head's channels (from the end), None once contracted

    @property
    def layout(self) -> tuple:
        """What two tensors must share for their channels to meet position by position."""
        return self.axis, self.block, self.per, self.inner

    @property
    def total(self) -> int:
        return sum(s.length for s in self.segs)

    def elements(self) -> list[tuple[int, int]]:
        """(atom, channel) at each position of the channel axis."""
        return [(s.atom, s.start + i) for s in self.segs for i in range(s.length)]


@dataclass
class Atom:
    id: int
    size: int
    producers: list[ir.Node] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)
    values: list[tuple[ir.Value, Link]] = field(default_factory=list)  # where channels appear (slot unused)
    reasons: list[str] = field(default_factory=list)
    followers: list[ir.Node] = field(default_factory=list)  # weightless nodes whose MACs scale with the atom


@dataclass
class Group:
    """Channels that must be removed together (one union-find class, or several tied by grouped convs)."""

    id: int
    size: int
    producers: list[ir.Node]
    links: list[Link]
    values: list[tuple[ir.Value, Link]]
    reasons: list[str]
    unit_sizes: list[int] | None = None  # channels per removal unit; None: one channel each
    followers: list[ir.Node] = field(default_factory=list)  # attention score MatMuls: MACs follow the group

    @property
    def prunable(self) -> bool:
        return not self.reasons

    @property
    def channels(self) -> int:
        return self.size if self.unit_sizes is None else sum(self.unit_sizes)

    def members(self) -> list[str]:
        names = [label(n) for n in self.producers]
        names += [label(k.slot.node) for k in self.links if label(k.slot.node) not in names]
        return list(dict.fromkeys(names + [label(n) for n in self.followers]))


def to_segs(elements: list[tuple[int, int]]) -> list[Seg]:
    """Segments for a list of (atom, channel) positions, consecutive runs merged."""
    segs: list[Seg] = []
    for atom, idx in elements:
        last = segs[-1] if segs else None
        if last is not None and last.atom == atom and last.start + last.length == idx:
            last.length += 1
        else:
            segs.append(Seg(atom, idx, 1))
    return segs


def cut(segs: list[Seg], lo: int, hi: int) -> list[Seg]:
    """The segments covering channels [lo, hi) of a value."""
    out, pos = [], 0
    for s in segs:
        a, b = max(lo, pos), min(hi, pos + s.length)
        if a < b:
            out.append(Seg(s.atom, s.start + a - pos, b - a))
        pos += s.length
    return out
