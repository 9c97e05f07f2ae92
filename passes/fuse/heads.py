"""Reading an export's head split and merge: shape tensors as entries, dims named by symbols, Shape side chains.

An exporter builds the Reshape targets of attention from the graph itself: ``x.view(batch, -1, heads, head_dim)``
becomes Concat(Unsqueeze(Gather(Shape(x), 0)), [-1], [heads], [head_dim]). :func:`entries` reads such a target
as a list of entries — a constant, a ``(value, axis)`` dim reference, or None — and a :class:`Layout` names each
dim of the values of one attention site by a symbol (the batch of the hidden states, their sequence, the head
count), so a Reshape can be proven to split only the hidden axis into (heads, head size), or to change nothing.
"""

from __future__ import annotations

from typing import Hashable, Union

import numpy as np
import onnx_ir as ir

from graphopt.graphs import attr, is_default_domain
from graphopt.passes.fuse.match import folded, producer

Entry = Union[int, tuple[ir.Value, int], None]  # a constant, the size of (value, axis), or unknown
Symbol = Hashable  # an int (a static dim) or a name shared by dims known to be equal
SHAPE_OPS = ("Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast", "Reshape", "Identity")


def _rank(value: ir.Value | None) -> int | None:
    return value.shape.rank() if value is not None and value.shape is not None else None


def _refs(value: ir.Value | None) -> list[Entry] | None:
    """The entries of a 1-D shape tensor built from Shapes: Shape(v)[a:b], Slice or Gather of it, through
    Unsqueeze/Squeeze/Reshape/Cast/Identity. None when it is something else."""
    node = value.producer() if value is not None else None
    if node is None or not is_default_domain(node):
        return None
    if node.op_type in ("Cast", "Identity"):
        return _refs(node.inputs[0])
    if node.op_type in ("Unsqueeze", "Squeeze", "Reshape"):
        found = _refs(node.inputs[0])
        return found if found is not None and len(found) == 1 else None
    if node.op_type == "Shape":
        rank = _rank(node.inputs[0])
        if rank is None:
            return None
        start, end = int(attr(node, "start", 0)), attr(node, "end", None)
        axes = range(rank)[slice(start, None if end is None else int(end))]
        return [(node.inputs[0], a) for a in axes]
    whole = _refs(node.inputs[0]) if node.op_type in ("Gather", "Slice") else None
    if whole is None:
        return None
    if node.op_type == "Gather" and int(attr(node, "axis", 0)) == 0:
        index = folded(node.inputs[1])
        if index is not None and index.size == 1 and -len(whole) <= int(index.ravel()[0]) < len(whole):
            return [whole[int(index.ravel()[0])]]
    if node.op_type == "Slice" and 3 <= len(node.inputs) <= 5:
        begin, end = folded(node.inputs[1]), folded(node.inputs[2])
        axes, steps = (folded(node.inputs[i]) if len(node.inputs) > i and node.inputs[i] is not None else default
                       for i, default in ((3, 0), (4, 1)))  # absent: axis 0, step 1
        if begin is not None and end is not None and begin.size == end.size == 1 and axes is not None and \
                steps is not None and int(np.ravel(axes)[0]) == 0 and int(np.ravel(steps)[0]) == 1:
            return whole[slice(int(begin.ravel()[0]), int(end.ravel()[0]))]
    return None


def entries(target: ir.Value | None) -> list[Entry] | None:
    """A Reshape target as one entry per output dim, or None when even its length is unknown."""
    parts = producer(target, "Concat")
    out: list[Entry] = []
    for part in parts.inputs if parts is not None else [target]:
        array = folded(part)
        if array is not None:
            if not np.issubdtype(array.dtype, np.integer):
                return None
            out += [int(v) for v in np.asarray(array).ravel()]
            continue
        found = _refs(part)
        if found is None and (part is None or part.shape is None or list(part.shape) != [1]):
            return None
        out += found if found is not None else [None]
    return out


class Layout:
    """Symbols for the dims of the values of one attention site: ``of[value]`` lists one per axis (None when
    nothing is known); static dims are ints. A dim shape inference named (``batch``, ``unk__3``) stands for the
    symbol first given to a dim of that name: values outside the site (an input's Shape) then resolve too."""

    def __init__(self) -> None:
        self.of: dict[ir.Value, list[Symbol]] = {}
        self.names: dict[str, Symbol] = {}

    def set(self, value: ir.Value, symbols: list[Symbol]) -> None:
        dims = list(value.shape) if value.shape is not None and value.shape.rank() == len(symbols) else None
        if dims is not None:  # a static dim is its own symbol: it then matches constant entries too
            symbols = [d if isinstance(d, int) else s for d, s in zip(dims, symbols)]
            for d, s in zip(dims, symbols):
                if not isinstance(d, int) and d.value is not None and s is not None:
                    self.names.setdefault(d.value, s)
        self.of[value] = list(symbols)

    def symbol(self, entry: Entry) -> Symbol:
        if not isinstance(entry, tuple):
            return None
        value, axis = entry
        symbols = self.of.get(value)
        if symbols is not None:
            return symbols[axis] if 0 <= axis < len(symbols) else None
        dim = value.shape[axis] if value.shape is not None and 0 <= axis < (value.shape.rank() or 0) else None
        return dim if isinstance(dim, int) or dim is None else self.names.get(dim.value) if dim.value else None

    def _same(self, entry: Entry, symbol: Symbol) -> bool:
        if symbol is None:
            return False
        return entry == symbol if isinstance(entry, int) else self.symbol(entry) == symbol

    def _matches(self, reshape: ir.Node, found: list[Entry], symbols: list[Symbol]) -> bool:
        """Every entry is the symbol at its place, a copy (0) of the input's dim there, or the one -1."""
        copies = not attr(reshape, "allowzero", 0)
        inputs = self.of.get(reshape.inputs[0], [])
        free = 0
        for i, (entry, symbol) in enumerate(zip(found, symbols)):
            if entry == -1:
                free += 1
            elif not (self._same(entry, symbol) or (entry == 0 and copies and i < len(inputs)
                                                    and inputs[i] == symbol and symbol is not None)):
                return False
        return free <= 1 and len(found) == len(symbols)

    def reshaped(self, reshape: ir.Node) -> list[Symbol] | None:
        """The output's symbols when the Reshape provably changes nothing, merges the first two axes of a rank-4
        input (torch's dynamo export transposes Kᵀ in 3-D), or splits such a merged axis back; else None."""
        symbols = self.of.get(reshape.inputs[0])
        found = entries(reshape.inputs[1])
        if symbols is None or found is None or any(s is None for s in symbols):
            return None
        if len(found) == len(symbols) and self._matches(reshape, found, symbols):
            return symbols
        if len(symbols) == 4 and len(found) == 3 and found[0] == -1:
            merged = [("merged", symbols[0], symbols[1]), *symbols[2:]]
            return merged if self._matches(reshape, found, merged) else None
        head = symbols[0]
        if len(symbols) == 3 and len(found) == 4 and isinstance(head, tuple) and head[0] == "merged":
            split = [head[1], head[2], *symbols[1:]]
            return split if self._matches(reshape, found, split) else None
        return None

    def split(self, reshape: ir.Node, hidden: int | None, packed: bool = False) -> tuple[int, ...] | str:
        """(heads, head size) when the Reshape turns its input [b, s, hidden] into [b, s, heads, head size]
        — with ``packed``, (parts, heads, head size) for [b, s, parts, heads, head size] (one projection
        computing Q, K and V) — else why not. ``hidden``: the input's last dim when static."""
        symbols = self.of.get(reshape.inputs[0])
        found = entries(reshape.inputs[1])
        if symbols is None or len(symbols) != 3:
            return "the head split's input is not of rank 3"
        want = 5 if packed else 4
        if found is None or len(found) != want:
            return f"the head split's target is not a shape of {want} readable entries"
        free = [i for i, e in enumerate(found) if e == -1]
        for i in (0, 1):
            kept = self._same(found[i], symbols[i]) or (found[i] == 0 and not attr(reshape, "allowzero", 0))
            if not kept and found[i] != -1:
                return f"the head split's dim {i} is not the input's"
        sizes = found[2:]
        if not all(isinstance(v, int) and (v > 0 or v == -1) for v in sizes) or len(free) > 1:
            return f"the head split's target {found} has no constant heads and head size"
        if -1 in sizes:
            known = int(np.prod([v for v in sizes if v != -1]))
            if hidden is None or hidden % known:
                return "the head count is not readable (-1 and an unknown hidden size)"
            sizes = [hidden // known if v == -1 else v for v in sizes]
        if (hidden is not None and int(np.prod(sizes)) != hidden) or (hidden is None and free):
            parts = f"{sizes[0]} parts of " if packed else ""
            return f"{parts}{sizes[-2]} heads of {sizes[-1]} do not make the hidden size {hidden}"
        return tuple(int(v) for v in sizes)


def shape_side_nodes(inside: set[ir.Node], exposed: ir.Value) -> list[ir.Node] | None:
    """The Shape side chains the nodes ``inside`` need besides themselves: nodes that read an inside value (but
    ``exposed``) only through Shape and whose results reach inside nodes only. None when one is read otherwise."""
    extra: set[ir.Node] = set()
    for node in inside:
        for value in node.outputs:
            for use in value.uses() if value is not exposed else ():
                if use.node in inside or use.node in extra:
                    continue
                chain = _shape_chain(use.node, inside)
                if chain is None:
                    return None
                extra |= chain
    return list(extra)


def _shape_chain(start: ir.Node, inside: set[ir.Node]) -> set[ir.Node] | None:
    """``start`` (a Shape) and the shape arithmetic after it, when every path ends at a node ``inside``."""
    if start.op_type != "Shape" or not is_default_domain(start):
        return None
    chain: set[ir.Node] = set()
    todo = [start]
    while todo:
        node = todo.pop()
        if node in chain:
            continue
        if node.op_type not in SHAPE_OPS or not is_default_domain(node) or len(chain) > 64:
            return None
        chain.add(node)
        for value in node.outputs:
            if value.is_graph_output():
                return None
            todo += [u.node for u in value.uses() if u.node not in inside]
    return chain
