"""Channel dependency groups for structured pruning (analysis only: nothing here edits the model).

Model (after Torch-Pruning's DepGraph, redone for ONNX graphs): every prunable layer (Conv, ConvTranspose
group=1, Gemm, MatMul with a constant weight) creates an *atom*: its output channels. A value that carries
channels has a :class:`Chan` state: a list of segments (atom, start, length) laid out along its channel axis
(Concat appends segments, Split/Slice cut them, a channel shuffle permutes them), the axis counted from the
end (broadcasting aligns from the right) and a ``block`` (Flatten of C×H×W makes every channel a block of
H·W features). Residual joins (Add/Sum/Mul/Sub/…) unite the atoms meeting there (union-find): one group
prunes the same indices. Grouped convs and shuffles add constraints (equal counts per conv group, shuffle
columns removed whole) that :mod:`channel_units` solves into removal units of several channels.

Every tensor that must shrink is a :class:`Slot` (a constant input of a node and its axis); each atom records
:class:`Link` s telling where its channels land in each slot. Anything that cannot be proven (an unknown op,
a graph output, a reshape that moves the channel axis) *blocks* the atoms it touches, with the reason.
Op-specific rules live in :mod:`channel_ops`.
"""

from __future__ import annotations

import onnx_ir as ir

from graphopt.passes import channel_ops as ops
from graphopt.passes.channel_types import Atom, Chan, Group, Link, Seg, Slot, const_array, label
from graphopt.passes.channel_units import build_groups
from graphopt.graphs import attr as _attr, is_default_domain
from graphopt.weights import encoding_of

UNARY = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "Gelu", "Mish", "Erf", "Exp", "Log", "Sqrt", "Neg", "Abs", "Reciprocal",
    "Identity", "Dropout", "Cast", "Floor", "Ceil", "Round", "ThresholdedRelu", "Sin", "Cos", "Sign",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"})
POOLS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"})
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow"})
PRODUCERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})

Element = tuple[int, int]  # (atom, channel)


class Analysis:
    def __init__(self, model: ir.Model, shapes: dict[str, tuple]) -> None:
        self.model, self.shapes = model, shapes
        self.atoms: list[Atom] = []
        self.parent: list[int] = []
        self.state: dict[ir.Value, Chan] = {}
        self.fixups: dict[ir.Node, dict] = {}  # nodes whose attributes/shape inputs follow the pruning
        self.colorings: list[tuple[str, list[list[Element]]]] = []  # removal takes equal counts per colour
        self.ties: list[list[Element]] = []  # channels removed together

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

    def base_groups(self) -> dict[int, Group]:
        """One group per union-find class, in atom order (keyed by root atom)."""
        by_root: dict[int, Group] = {}
        for atom in self.atoms:
            root = self.find(atom.id)
            group = by_root.setdefault(root, Group(root, atom.size, [], [], [], []))
            group.producers += atom.producers
            group.links += atom.links
            group.values += atom.values
            group.reasons += [r for r in atom.reasons if r not in group.reasons]
        return by_root

    def groups(self) -> list[Group]:
        return build_groups(self.base_groups(), self.find, self.colorings, self.ties)

    def visit(self, node: ir.Node) -> None:
        ins = [self.state.get(v) if v is not None else None for v in node.inputs]
        if not is_default_domain(node):
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
            self.normalization(node, ins, chan)
        elif op == "Concat":
            ops.concat(self, node, ins)
        elif op == "Split":
            ops.split(self, node, chan)
        elif op in ("Flatten", "Reshape") and ins[0] is not None:
            ops.reshape(self, node, chan)
        elif op == "Slice" and ins[0] is not None and not any(ins[1:]):
            ops.slice_(self, node, chan)
        elif op in ("Squeeze", "Unsqueeze") and ins[0] is not None and not any(ins[1:]):
            ops.squeeze(self, node, chan)
        else:
            for c in ins:
                self.block(c, f"{op} {label(node)!r} is not channel-preserving (or not supported)")

    def normalization(self, node: ir.Node, ins: list[Chan | None], chan: Chan) -> None:
        op = node.op_type
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
        self.set_state(node.outputs[0], chan)

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
            elif w.shape[1] > 1 or w.shape[0] > group:
                ops.grouped_conv(self, node, x, w, group)
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
            if not self.merge(first, other) and not self.tie(first, other):
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
        if a.axis != b.axis or a.block != b.block or a.total != b.total:
            return False
        pairs = list(zip(a.elements(), b.elements()))
        if len(a.segs) == len(b.segs) and all(sa.length == sb.length for sa, sb in zip(a.segs, b.segs)):
            if all(self.find(sa.atom) == self.find(sb.atom) and sa.start == sb.start for sa, sb in zip(a.segs, b.segs)):
                return True
        # Whole atoms meeting index for index unite; otherwise the same channels must already be one.
        atoms: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for (xa, ia), (xb, ib) in pairs:
            if self.find(xa) == self.find(xb) and ia == ib:
                continue
            atoms.setdefault((xa, xb), []).append((ia, ib))
        for (xa, xb), idx in atoms.items():
            if len(idx) != self.atoms[xa].size or self.atoms[xa].size != self.atoms[xb].size or any(
                    i != j for i, j in idx):
                return False
        for xa, xb in atoms:
            self.union(xa, xb)
        return True


    def tie(self, a: Chan, b: Chan) -> bool:
        """Channels that line up position by position but not atom by atom (a residual Add of a conv and a
        Concat): tie each pair; :mod:`channel_units` removes tied channels together."""
        if a.axis != b.axis or a.block != b.block or a.total != b.total:
            return False
        for (xa, ia), (xb, ib) in zip(a.elements(), b.elements()):
            if self.find(xa) != self.find(xb) or ia != ib:
                self.ties.append([(xa, ia), (xb, ib)])
        return True


def analyze(model: ir.Model, shapes: dict[str, tuple]) -> tuple[Analysis, list[Group]]:
    """Dependency groups of the main graph (``shapes``: inferred value dims, as graphopt.bench.infer_shapes);
    the Analysis also holds the nodes whose attributes follow the pruning (``fixups``)."""
    analysis = Analysis(model, shapes)
    return analysis, analysis.run()
