"""Channel dependency groups for structured pruning (analysis only: nothing here edits the model).

Model (after Torch-Pruning's DepGraph, redone for ONNX graphs): every prunable layer (Conv group=1,
ConvTranspose group=1, Gemm, MatMul with a constant weight) creates an *atom*: its output channels. A value
that carries channels has a :class:`Chan` state: a list of segments (atom, start, length) laid out along its
channel axis (Concat appends segments, Split cuts them), the axis counted from the end (broadcasting aligns
from the right) and a ``block`` (Flatten of C×H×W makes every channel a block of H·W features). Residual
joins (Add/Sum/Mul/Sub/…) unite the atoms meeting there (union-find): one group prunes the same indices.

Every tensor that must shrink is a :class:`Slot` (a constant input of a node and its axis); each atom records
:class:`Link` s telling where its channels land in each slot. Anything that cannot be proven (an unknown op,
a channel shuffle, a graph output, a grouped conv) *blocks* the atoms it touches, with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphopt.weights import attr as _attr, encoding_of

UNARY = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "Gelu", "Mish", "Erf", "Exp", "Log", "Sqrt", "Neg", "Abs", "Reciprocal",
    "Identity", "Dropout", "Cast", "Floor", "Ceil", "Round", "ThresholdedRelu", "Sin", "Cos", "Sign",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"})
POOLS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"})
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow"})
PRODUCERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def label(node: ir.Node) -> str:
    return node.name or (node.outputs[0].name if node.outputs else "") or node.op_type


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """A plain float/int constant behind ``value``: an initializer, a Constant node, or Unsqueeze/Reshape/
    Squeeze/Identity of one (the per-channel constants old exporters apply through Unsqueeze)."""
    if value is None:
        return None
    if value.const_value is not None and encoding_of(value) is None:
        return value.const_value.numpy()
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Constant":
        attr = node.attributes.get("value")
        return None if attr is None else np.asarray(attr.value.numpy())
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
    """A constant input of ``node`` (``index``) whose ``axis`` runs over ``channels`` × ``block`` entries."""

    node: ir.Node
    index: int
    axis: int
    channels: int
    block: int = 1
    role: str = "member"  # producer | member | consumer


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

    @property
    def total(self) -> int:
        return sum(s.length for s in self.segs)


@dataclass
class Atom:
    id: int
    size: int
    producers: list[ir.Node] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)
    values: list[tuple[ir.Value, Link]] = field(default_factory=list)  # where channels appear (slot unused)
    reasons: list[str] = field(default_factory=list)


@dataclass
class Group:
    """Atoms that must lose the same channel indices (one union-find class)."""

    id: int
    size: int
    producers: list[ir.Node]
    links: list[Link]
    values: list[tuple[ir.Value, Link]]
    reasons: list[str]

    @property
    def prunable(self) -> bool:
        return not self.reasons

    def members(self) -> list[str]:
        names = [label(n) for n in self.producers]
        names += [label(k.slot.node) for k in self.links if label(k.slot.node) not in names]
        return list(dict.fromkeys(names))


class Analysis:
    def __init__(self, model: ir.Model, shapes: dict[str, tuple]) -> None:
        self.model, self.shapes = model, shapes
        self.atoms: list[Atom] = []
        self.parent: list[int] = []
        self.state: dict[ir.Value, Chan] = {}
        self.fixups: dict[ir.Node, dict] = {}  # nodes whose attributes/shape inputs follow the pruning

    # --- union-find ------------------------------------------------------------------------------------
    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def new_atom(self, size: int, producer: ir.Node) -> int:
        self.atoms.append(Atom(len(self.atoms), size, [producer]))
        self.parent.append(len(self.parent))
        return len(self.atoms) - 1

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    def block(self, chan: Chan | None, reason: str) -> None:
        for seg in chan.segs if chan else []:
            self.atoms[seg.atom].reasons.append(reason)

    # --- recording -------------------------------------------------------------------------------------
    def set_state(self, value: ir.Value, chan: Chan) -> None:
        self.state[value] = chan
        offset = 0
        for seg in chan.segs:
            self.atoms[seg.atom].values.append((value, Link(None, offset, seg.start, seg.length)))  # type: ignore
            offset += seg.length
        if value.is_graph_output():
            self.block(chan, f"reaches the graph output {value.name!r}")

    def link(self, node: ir.Node, index: int, axis: int, chan: Chan, role: str) -> Slot:
        slot = Slot(node, index, axis, chan.total, chan.block, role)
        offset = 0
        for seg in chan.segs:
            self.atoms[seg.atom].links.append(Link(slot, offset, seg.start, seg.length))
            offset += seg.length
        return slot

    def dims(self, value: ir.Value | None) -> tuple | None:
        if value is None:
            return None
        dims = self.shapes.get(value.name)
        if dims is None and value.shape is not None:
            dims = tuple(d if isinstance(d, int) else None for d in value.shape)
        return dims

    # --- the walk --------------------------------------------------------------------------------------
    def run(self) -> list[Group]:
        graph = self.model.graph
        for node in graph:
            self.visit(node)
        for node in graph:  # values captured by If/Loop bodies: the body's shapes are out of reach
            for attr in node.attributes.values():
                if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                    subs = attr.value if isinstance(attr.value, (list, tuple)) else [attr.value]
                    for sub in subs:
                        for inner in ir.traversal.RecursiveGraphIterator(sub):
                            for v in inner.inputs:
                                self.block(self.state.get(v), f"used inside the subgraph of {label(node)!r}")
        return self.groups()

    def groups(self) -> list[Group]:
        by_root: dict[int, Group] = {}
        for atom in self.atoms:
            root = self.find(atom.id)
            group = by_root.setdefault(root, Group(root, atom.size, [], [], [], []))
            group.producers += atom.producers
            group.links += atom.links
            group.values += atom.values
            group.reasons += [r for r in atom.reasons if r not in group.reasons]
        return list(by_root.values())

    def visit(self, node: ir.Node) -> None:
        ins = [self.state.get(v) if v is not None else None for v in node.inputs]
        if node.domain not in ("", "ai.onnx"):
            for chan in ins:
                self.block(chan, f"custom op {node.domain}::{node.op_type} ({label(node)!r})")
            return
        op = node.op_type
        if op in PRODUCERS:
            self.layer(node, ins)
            return
        if not any(ins):
            return
        out = node.outputs[0] if node.outputs else None
        chan = next(c for c in ins if c is not None)
        if op in UNARY and ins[0] is not None:
            if op in POOLS and chan.axis != -(len(self.dims(out) or ()) - 1):
                self.block(chan, f"{op} {label(node)!r} on a non-spatial layout")
                return
            if len(node.outputs) > 1 and node.outputs[1] is not None and node.outputs[1].uses():
                self.block(chan, f"second output of {op} {label(node)!r} is used")
            self.set_state(out, chan)
        elif op in BINARY or op == "PRelu":
            self.elementwise(node, ins)
        elif op in ("BatchNormalization", "InstanceNormalization"):
            last = 5 if op == "BatchNormalization" else 3
            if ins[0] is None or any(c is not None for c in ins[1:]):
                self.block(chan, f"{op} {label(node)!r} normalizes a channel-mixed tensor")
                return
            if any(const_array(v) is None for v in node.inputs[1:last]) or len(node.outputs) > 1 and any(
                    o.uses() for o in node.outputs[1:] if o is not None):
                self.block(chan, f"{op} {label(node)!r} parameters are not constants")
                return
            for i in range(1, last):
                self.link(node, i, 0, chan, "member")
            self.set_state(out, chan)
        elif op == "Concat":
            self.concat(node, ins)
        elif op == "Split":
            self.split(node, chan)
        elif op in ("Flatten", "Reshape"):
            self.reshape(node, chan)
        else:
            for c in ins:
                self.block(c, f"{op} {label(node)!r} is not channel-preserving (or not supported)")

    def layer(self, node: ir.Node, ins: list[Chan | None]) -> None:
        op = node.op_type
        w_val = node.inputs[1] if len(node.inputs) > 1 else None
        w = const_array(w_val)
        encoded = w_val is not None and encoding_of(w_val) is not None
        group = int(_attr(node, "group", 1))
        x = ins[0]
        if any(c is not None for c in ins[1:]):
            for c in ins:
                self.block(c, f"{op} {label(node)!r} takes channels as its weight")
            return
        ok = w is not None and not encoded and w.dtype.kind == "f"
        if op == "Gemm" and (_attr(node, "transA", 0) or (w is not None and w.ndim != 2)):
            ok = False
        if op == "MatMul" and (w is None or w.ndim != 2):
            ok = False
        if op == "Conv" and ok and group > 1:
            if x is not None and w.shape[1] == 1 and group == w.shape[0] == x.total * x.block and x.block == 1:
                self.link(node, 1, 0, x, "member")  # depthwise: its input and output channels are one
                if len(node.inputs) > 2 and node.inputs[2] is not None:
                    self.link(node, 2, 0, x, "member")
                self.fixups[node] = {"kind": "depthwise", "value": node.inputs[0]}
                self.set_state(node.outputs[0], x)
            else:
                self.block(x, f"grouped Conv {label(node)!r} (group={group}) ties channels within groups")
            return
        if op == "ConvTranspose" and group != 1:
            ok = False
        if x is not None:
            rank = len(self.dims(node.inputs[0]) or ())
            want = -1 if op in ("Gemm", "MatMul") else (1 - rank if rank else None)
            if not ok:
                self.block(x, f"{op} {label(node)!r} weight is not a plain constant (compressed or computed)")
            elif x.axis != want or (x.block != 1 and op in ("Conv", "ConvTranspose")):
                self.block(x, f"{op} {label(node)!r} reads the channels on another axis")
            else:
                axis = {"Conv": 1, "ConvTranspose": 0, "MatMul": 0}.get(op, 1 if _attr(node, "transB", 0) else 0)
                self.link(node, 1, axis, x, "consumer")
        if not ok:
            return
        out = node.outputs[0]
        if op == "Conv":
            size, axis, out_axis = w.shape[0], 0, 1 - w.ndim
        elif op == "ConvTranspose":
            size, axis, out_axis = w.shape[1], 1, 1 - w.ndim
        elif op == "Gemm":
            transb = _attr(node, "transB", 0)
            size, axis, out_axis = w.shape[0] if transb else w.shape[1], 0 if transb else 1, -1
        else:
            size, axis, out_axis = w.shape[1], 1, -1
        atom = self.new_atom(int(size), node)
        chan = Chan([Seg(atom, 0, int(size))], out_axis)
        self.link(node, 1, axis, chan, "producer")
        if op != "MatMul" and len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = const_array(node.inputs[2])
            if bias is None:
                self.block(chan, f"{op} {label(node)!r} bias is not a constant")
            elif bias.size == size:
                self.link(node, 2, bias.ndim - 1, chan, "producer")
            elif bias.size != 1:
                self.block(chan, f"{op} {label(node)!r} bias is not a per-channel vector")
        self.set_state(out, chan)

    def elementwise(self, node: ir.Node, ins: list[Chan | None]) -> None:
        chans = [c for c in ins if c is not None]
        first = chans[0]
        for other in chans[1:]:
            if not self.merge(first, other):
                reason = f"{node.op_type} {label(node)!r} joins tensors whose channels do not line up"
                for c in chans:
                    self.block(c, reason)
                return
        out_rank = len(self.dims(node.outputs[0]) or ())
        for i, (value, chan) in enumerate(zip(node.inputs, ins)):
            if chan is not None or value is None:
                continue
            dims = self.dims(value)
            const = const_array(value)
            shape = const.shape if const is not None else dims
            if shape is None:
                self.block(first, f"{node.op_type} {label(node)!r}: input {value.name!r} has an unknown shape")
                return
            pos = len(shape) + first.axis
            if node.op_type == "PRelu" and const is not None and len(shape) == 1 and out_rank > 2:
                pos = -1 if shape[0] == 1 else 0  # PRelu slope [C]: per channel (as exporters write it)
            if pos < 0 or shape[pos] == 1:
                continue  # broadcast along the channel axis: unchanged by pruning
            if const is None or shape[pos] != first.total * first.block:
                self.block(first, f"{node.op_type} {label(node)!r}: input {value.name!r} is channel-wise but "
                                  "not a constant")
                return
            self.link(node, i, pos, first, "member")
        self.set_state(node.outputs[0], first)

    def merge(self, a: Chan, b: Chan) -> bool:
        if a.axis != b.axis or a.block != b.block or len(a.segs) != len(b.segs):
            return False
        for sa, sb in zip(a.segs, b.segs):
            if sa.length != sb.length:
                return False
            if self.find(sa.atom) == self.find(sb.atom) and sa.start == sb.start:
                continue
            whole = all(s.start == 0 and s.length == self.atoms[s.atom].size for s in (sa, sb))
            if not whole:
                return False
        for sa, sb in zip(a.segs, b.segs):
            self.union(sa.atom, sb.atom)
        return True

    def concat(self, node: ir.Node, ins: list[Chan | None]) -> None:
        dims = self.dims(node.outputs[0])
        axis = int(_attr(node, "axis", 1))
        rank = len(dims) if dims else 0
        known = [c for c in ins if c is not None]
        if not rank or any(c is None for c in ins):
            for c in known:
                self.block(c, f"Concat {label(node)!r} joins a tensor whose channels are not tracked")
            return
        if (axis - rank if axis >= 0 else axis) != known[0].axis:
            self.elementwise(node, ins)  # joined along another axis: channels must line up
            return
        if any(c.axis != known[0].axis or c.block != 1 for c in known):
            for c in known:
                self.block(c, f"Concat {label(node)!r} mixes channel layouts")
            return
        segs = [Seg(s.atom, s.start, s.length) for c in known for s in c.segs]
        self.set_state(node.outputs[0], Chan(segs, known[0].axis))

    def split(self, node: ir.Node, chan: Chan) -> None:
        dims = self.dims(node.inputs[0])
        rank = len(dims) if dims else 0
        axis = int(_attr(node, "axis", 0))
        if not rank or (axis - rank if axis >= 0 else axis) != chan.axis or chan.block != 1:
            self.block(chan, f"Split {label(node)!r} is not on the channel axis")
            return
        sizes = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        sizes = list(np.asarray(sizes if sizes is not None else _attr(node, "split", []), dtype=int).reshape(-1))
        if not sizes:
            n = len(node.outputs)
            if chan.total % n:
                self.block(chan, f"Split {label(node)!r}: uneven split")
                return
            sizes = [chan.total // n] * n
        start = 0
        for out, size in zip(node.outputs, sizes):
            self.set_state(out, Chan(_cut(chan.segs, start, start + size), chan.axis))
            start += size
        self.fixups[node] = {"kind": "split", "value": node.inputs[0], "sizes": sizes}

    def reshape(self, node: ir.Node, chan: Chan) -> None:
        src, dst = self.dims(node.inputs[0]), self.dims(node.outputs[0])
        why = f"{node.op_type} {label(node)!r} moves the channel axis (cannot be proven)"
        if not src or not dst or None in src[1:] or None in dst[1:] or chan.axis != 1 - len(src):
            self.block(chan, why)
            return
        if node.op_type == "Flatten" and int(_attr(node, "axis", 1)) != 1:
            self.block(chan, why)
            return
        # Provable layouts: [N, C, *S] -> [N, C·prod(S)] (flatten) and [N, C] -> [N, C, 1, ...] (unflatten).
        spatial = math.prod(src[2:])
        if len(dst) == 2 and dst[1] == src[1] * spatial:
            out = Chan(chan.segs, -1, chan.block * spatial)
        elif len(src) == 2 and dst[1] == src[1] and all(d == 1 for d in dst[2:]):
            out = Chan(chan.segs, 1 - len(dst), chan.block)
        else:
            self.block(chan, why)
            return
        if node.op_type == "Reshape":
            shape = const_array(node.inputs[1])
            if shape is None:
                self.block(chan, f"Reshape {label(node)!r} shape is computed")
                return
            self.fixups[node] = {"kind": "reshape", "value": node.inputs[0], "shape": shape,
                                 "unit": out.block if len(dst) == 2 else chan.block}
        self.set_state(node.outputs[0], out)


def _cut(segs: list[Seg], lo: int, hi: int) -> list[Seg]:
    """The segments covering channels [lo, hi) of a value."""
    out, pos = [], 0
    for s in segs:
        a, b = max(lo, pos), min(hi, pos + s.length)
        if a < b:
            out.append(Seg(s.atom, s.start + a - pos, b - a))
        pos += s.length
    return out


def analyze(model: ir.Model, shapes: dict[str, tuple]) -> tuple[Analysis, list[Group]]:
    """Dependency groups of the main graph (``shapes``: inferred value dims, as graphopt.bench.infer_shapes);
    the Analysis also holds the nodes whose attributes follow the pruning (``fixups``)."""
    analysis = Analysis(model, shapes)
    return analysis, analysis.run()
