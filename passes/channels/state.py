"""The record the channel analysis fills in while it walks the graph (what :mod:`ops` rules write to).

:class:`Analysis` holds the :class:`Chan` state of every value that carries channels, the atoms (a prunable
layer's output channels) in a union-find, the slots each atom reaches, the nodes whose attributes follow the
pruning (``fixups``) and the constraints of grouped convs and channel shuffles (``colorings``, ``ties``). Its
methods are the primitives every op rule uses: make an atom, link a tensor, set a value's state, block atoms
with a reason, unite or tie channels that meet. Nothing here knows an op type.
"""

from __future__ import annotations

import onnx_ir as ir

from graphopt.passes.channels.types import Atom, Chan, Element, Group, Link, Slot


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

    def follow(self, chan: Chan, node: ir.Node) -> None:
        """``node`` computes on ``chan`` without a weight to slice (its MACs shrink with the group)."""
        for seg in chan.segs:
            if node not in self.atoms[seg.atom].followers:
                self.atoms[seg.atom].followers.append(node)

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

    # --- channels meeting (residual joins) --------------------------------------------------------------
    def merge(self, a: Chan, b: Chan) -> bool:
        if a.layout != b.layout or a.total != b.total:
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
        Concat): tie each pair; :mod:`units` removes tied channels together."""
        if a.layout != b.layout or a.total != b.total:
            return False
        for (xa, ia), (xb, ib) in zip(a.elements(), b.elements()):
            if self.find(xa) != self.find(xb) or ia != ib:
                self.ties.append([(xa, ia), (xb, ib)])
        return True

    # --- result ----------------------------------------------------------------------------------------
    def base_groups(self) -> dict[int, Group]:
        """One group per union-find class, in atom order (keyed by root atom)."""
        by_root: dict[int, Group] = {}
        for atom in self.atoms:
            root = self.find(atom.id)
            group = by_root.setdefault(root, Group(root, atom.size, [], [], [], []))
            group.producers += atom.producers
            group.links += atom.links
            group.values += atom.values
            group.followers += [n for n in atom.followers if n not in group.followers]
            group.reasons += [r for r in atom.reasons if r not in group.reasons]
        return by_root
