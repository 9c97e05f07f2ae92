"""Matcher for the attention subgraph of an exported encoder → com.microsoft MultiHeadAttention.

What torch (and TF) exporters write for one attention, read from the root back:

    out    = Transpose(P·V)                       [b, s, heads, dv]  (the merge Reshape after it stays)
    P      = Softmax(scores [+ mask])             [Where(IsNaN(P), 0, P): torch's SDPA export zeroes NaN rows]
    scores = (Q·Kᵀ) [* c | / c]
    Q      = Transpose(Reshape(q3 → [b, s, heads, d])) [* c]     q3 = [y * c] [+ bias], y typically x·Wq
    Kᵀ     = Transpose(Reshape(k3 → [b, t, heads, d])), perm [0, 2, 3, 1] or two Transposes [* c]
    V      = Transpose(Reshape(v3 → [b, t, heads, dv]))

with identity Reshapes allowed between P·V and the root (torch's SDPA writes one, its target computed from Shapes
of Q, V and P·V: those Shape side chains go with the match). Every scalar factor on Q, K or the scores is
multiplied into MultiHeadAttention's ``scale``; heads and head sizes are read from the head split's target
(:mod:`~graphopt.passes.fuse.heads`), never assumed.

The mask is passed unchanged as ``attention_bias``, which MultiHeadAttention adds to the scaled scores as the Add
did — after an Expand to [.., .., s, t] unless its last two dims are provably s and t (the op does not broadcast
those). torch's NaN guard becomes Where(IsNaN(out), 0, out): a query row whose mask is all -inf is NaN in the
fused op and zero after the guard, as it was (other rows are NaN only for non-finite inputs, in both).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from graphopt.graphs import attr, is_default_domain
from graphopt.passes.fuse.heads import Layout, entries, shape_side_nodes
from graphopt.passes.fuse.match import (
    Match, Miss, const, fail, folded_scalar, near, not_float32, producer, source,
)
from graphopt.passes.fuse.packed import columns, flat_softmax, pick
from graphopt.weights import set_initializer

MS_DOMAIN = "com.microsoft"
# Axis order each MatMul operand must have, in the labels of the head split's output [b, s, n, d].
WANTED = {"q": "bnsd", "k": "bnds", "v": "bnsd"}


@dataclasses.dataclass
class Side:
    """One of Q, K, V: the 3-D input MultiHeadAttention takes, its bias (absorbed Add) and scalar factor, the
    hidden states it was projected from (``base``), the head split, and the nodes on the way."""

    input: ir.Value
    bias: np.ndarray | None
    factor: float
    base: ir.Value
    heads: int
    size: int
    nodes: list[ir.Node]
    part: int | None = None  # packed Q/K/V: ``input`` holds every part; this side is columns part·H·d + [0, H·d)


def _scalar_factor(node: ir.Node | None) -> tuple[ir.Value, float] | None:
    """(operand, factor) when ``node`` is a default-domain Mul by or Div by a scalar constant."""
    if node is None or not is_default_domain(node) or len(node.inputs) != 2:
        return None
    if node.op_type == "Div":
        c = folded_scalar(node.inputs[1])
        return (node.inputs[0], 1.0 / c) if c else None
    if node.op_type == "Mul":
        for a, b in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
            c = folded_scalar(b)
            if c is not None and folded_scalar(a) is None:
                return a, c
    return None


def _bias_add(node: ir.Node | None) -> tuple[ir.Value, ir.Value] | None:
    """(y, bias) when ``node`` is y + bias with a constant float vector."""
    if node is None or node.op_type != "Add" or not is_default_domain(node) or len(node.inputs) != 2:
        return None
    for y, b in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
        array = const(b)
        if array is not None and array.ndim == 1 and np.issubdtype(array.dtype, np.floating) and const(y) is None:
            return y, b
    return None


def _only_use(value: ir.Value, node: ir.Node) -> bool:
    return not value.is_graph_output() and {u.node for u in value.uses()} == {node}


def _projection_chain(q3: ir.Value) -> tuple[list[ir.Value], int | None]:
    """The values from q3 up to the hidden states it was projected from ([c *] (x·W [+ bias]), W a 2-D
    constant): they share batch and sequence. Also the hidden size when a weight or bias tells it."""
    chain, hidden = [q3], None
    value = q3
    while (node := value.producer()) is not None and len(chain) < 5:
        scaled, biased = _scalar_factor(node), _bias_add(node)
        if scaled is not None:
            value = scaled[0]
        elif biased is not None:
            value, hidden = biased[0], hidden or int(const(biased[1]).shape[0])
        elif node.op_type == "MatMul" and is_default_domain(node) and (w := const(node.inputs[1])) is not None \
                and w.ndim == 2:
            chain.append(node.inputs[0])
            return chain, hidden or int(w.shape[1])
        else:
            break
        chain.append(value)
    return chain, hidden


def _is_merged_transpose(reshape: ir.Node) -> bool:
    """Reshape(Transpose(Reshape(4-D → 3-D), perm [0, 2, 1]) → 4-D): torch's dynamo export of Kᵀ."""
    t3 = producer(reshape.inputs[0], "Transpose")
    r1 = producer(t3.inputs[0], "Reshape") if t3 is not None else None
    return r1 is not None and _rank(r1.inputs[0]) == 4 and list(attr(t3, "perm", [])) == [0, 2, 1]


def _side(operand: ir.Value, name: str, layout: Layout) -> Side | str:
    """Walk one MatMul operand up through scalar factors, Transposes and Reshapes to the head split [b, s, hidden]
    → [b, s, heads, size], then check, going down, that the operand is that split in the order ``WANTED``."""
    factor, nodes, value = 1.0, [], operand
    while True:
        node = value.producer()
        if node is None or not is_default_domain(node) or len(nodes) > 8:
            return f"{name} comes from {source(value)}, not from a head split"
        scaled = _scalar_factor(node)
        nodes.append(node)
        if scaled is not None:
            value, factor = scaled[0], factor * scaled[1]
        elif node.op_type == "Transpose" and attr(node, "perm", None) is not None:
            value = node.inputs[0]
        elif node.op_type == "Reshape" and (_rank(node.inputs[0]) == 4 or _is_merged_transpose(node)):
            value = node.inputs[0]
        elif node.op_type == "Reshape":
            break
        elif node.op_type in ("Squeeze", "Gather"):
            return _packed_side(node, nodes[:-1], name, factor, layout)
        else:
            return f"{name} comes from {node.op_type}, not from a head split"
    split, q3 = nodes[-1], nodes[-1].inputs[0]
    if _rank(q3) != 3:
        return f"{name}'s projection is not known to be of rank 3"
    chain, hidden = _projection_chain(q3)
    hidden = q3.shape[2] if isinstance(q3.shape[2], int) else hidden
    base = chain[-1]
    for value in chain:  # the batch and sequence of these values are the base's
        if _rank(value) == 3:
            layout.set(value, [("batch", base), ("seq", base), None])
    found = layout.split(split, hidden)
    if isinstance(found, str):
        return f"{name}: {found}"
    heads, size = found
    layout.set(split.outputs[0], [("batch", base), ("seq", base), heads, size])
    labels = dict(zip("bsnd", layout.of[split.outputs[0]]))  # static dims are their sizes
    for node in reversed(nodes[:-1]):  # down from the split to the operand
        symbols = layout.of.get(node.inputs[0]) if node.op_type != "Reshape" else layout.reshaped(node)
        if symbols is None:
            return f"a {node.op_type} on the way to {name} that is not provably a transpose"
        if node.op_type == "Transpose":
            symbols = [symbols[int(p)] for p in attr(node, "perm", [])]
        layout.set(node.outputs[0], symbols)
    if layout.of[operand] != [labels[a] for a in WANTED[name]]:
        return f"{name} is not the head split in the order {''.join(WANTED[name])}"
    side = Side(q3, None, factor, base, heads, size, nodes)
    node, reader = q3.producer(), split  # what the 3-D side absorbs: [Mul/Div by c] then [Add(bias)]
    scaled = _scalar_factor(node)
    if scaled is not None and _only_use(side.input, reader):
        side.input, side.factor, reader = scaled[0], factor * scaled[1], node
        side.nodes.append(node)
        node = side.input.producer()
    biased = _bias_add(node)
    if biased is not None and _only_use(side.input, reader) and const(biased[1]).shape[0] == heads * size:
        side.input, side.bias = biased[0], const(biased[1])
        side.nodes.append(node)
    return side


def _packed_side(last: ir.Node, below: list[ir.Node], name: str, factor: float, layout: Layout) -> Side | str:
    """One of Q, K, V picked from a packed projection (:func:`~graphopt.passes.fuse.packed.pick`): ``last`` is
    the pick, ``below`` the scalar factors and Transposes from it down to the MatMul operand."""
    found = pick(last)
    if isinstance(found, str):
        return f"{name} comes from {found}"
    split, packed = found.split, found.split.inputs[0]
    if _rank(packed) != 3:
        return f"{name}'s packed projection is not known to be of rank 3"
    chain, hidden = _projection_chain(packed)
    hidden = packed.shape[2] if isinstance(packed.shape[2], int) else hidden
    base = chain[-1]
    for value in chain:
        if _rank(value) == 3:
            layout.set(value, [("batch", base), ("seq", base), None])
    sizes = layout.split(split, hidden, packed=True)
    if isinstance(sizes, str):
        return f"{name}: {sizes}"
    parts, heads, size = sizes
    if found.part >= parts or found.pieces not in (None, parts):
        return f"{name} is not one of the {parts} parts of its packed projection"
    labels = found.labels
    for node in reversed(below):  # down from the pick to the operand: scalar factors and Transposes only
        if node.op_type == "Transpose":
            labels = "".join(labels[int(p)] for p in attr(node, "perm", []))
        elif _scalar_factor(node) is None:
            return f"a {node.op_type} on the way to {name} that is not provably a transpose"
    if labels != WANTED[name]:
        return f"{name} is not the head split in the order {WANTED[name]}"
    side = Side(packed, None, factor, base, heads, size, [*below, *found.nodes], found.part)
    biased = _bias_add(packed.producer())
    if biased is not None and _only_use(packed, split) and const(biased[1]).shape[0] == parts * heads * size:
        width = heads * size
        side.input, side.bias = biased[0], const(biased[1])[found.part * width:(found.part + 1) * width]
        side.nodes.append(packed.producer())
    return side


def _softmax(probs: ir.Value) -> tuple[ir.Node | None, list[ir.Node], ir.Value | None]:
    """(the Softmax, the NaN guard's nodes or the Flatten/Shape/Reshape of the old-opset form, the scores it
    normalizes) for P = Softmax(·), Where(IsNaN(P), 0, P), or :func:`~graphopt.passes.fuse.packed.flat_softmax`."""
    where = producer(probs, "Where")
    if where is not None and len(where.inputs) == 3:
        cond, zero, kept = where.inputs
        isnan = producer(cond, "IsNaN")
        softmax = producer(kept, "Softmax")
        if isnan is not None and isnan.inputs[0] is kept and softmax is not None and folded_scalar(zero) == 0.0:
            return softmax, [isnan, where], softmax.inputs[0]
        return None, [], None
    flat = flat_softmax(probs)
    if flat is not None:
        return flat
    softmax = producer(probs, "Softmax")
    return softmax, [], softmax.inputs[0] if softmax is not None else None


def _softmax_miss(softmax: ir.Node) -> str | None:
    axis = attr(softmax, "axis", None)
    if axis is None:
        opset = softmax.graph.opset_imports.get("", 0) if isinstance(softmax.graph, ir.Graph) else 0
        return None if opset >= 13 else "Softmax without an axis below opset 13"
    return None if int(axis) in (-1, 3) else f"Softmax over axis {axis}, not the last"


def _scores(s: ir.Value) -> list[tuple[ir.Value, ir.Value | None, list[ir.Node]]]:
    """Ways to read Softmax's input: (scores, mask or None, the Add) — either Add operand may be the mask."""
    add = producer(s, "Add")
    if add is None or len(add.inputs) != 2:
        return [(s, None, [])]
    a, b = add.inputs
    return [(a, b, [add]), (b, a, [add])]


PACKED_OFF = ("Q, K and V are columns of one packed projection: family packed_attention fuses them (off by default: "
              "slower than the unfused block on PP-OCRv4 rec's SVTR neck)")


def match_attention(node: ir.Node, packed: bool = False) -> Match | Miss:
    """Q/K/V head splits, Q·Kᵀ, scale, [mask], Softmax, ·V, head merge → MultiHeadAttention (see the module).
    ``packed``: match only Q, K, V picked from one packed projection (family ``packed_attention``), the other
    sites are then no near-misses (family ``attention`` reports them); without it, a packed site is one."""
    if node.op_type != "Transpose" or not is_default_domain(node):
        return fail(f"{node.op_type} is no attention root")
    chain, value = [node], node.inputs[0]
    while (up := producer(value, "Transpose", "Reshape", "MatMul")) is not None and up.op_type != "MatMul":
        chain.append(up)
        value = up.inputs[0]
        if len(chain) > 4:
            return fail("no ·V MatMul under the Transposes")
    pv = up
    softmax, guard, normalized = _softmax(pv.inputs[0]) if pv is not None else (None, [], None)
    if softmax is None or normalized is None:
        return fail("not Softmax(…)·V")
    why = _softmax_miss(softmax)
    misses = []
    for scores, mask, add in _scores(normalized) if why is None else []:
        found = _match(node, chain, pv, guard, softmax, scores, mask, add)
        if isinstance(found, Match):
            if (found.family == "packed_attention") == packed:
                return found
            return near(PACKED_OFF, softmax) if not packed else fail("Q, K, V are not one packed projection")
        misses.append(found)
    return fail(why or misses[0]) if packed else near(why or misses[0], softmax)


def match_packed_attention(node: ir.Node) -> Match | Miss:
    """Attention whose Q, K and V are columns of one packed projection (family ``packed_attention``)."""
    return match_attention(node, packed=True)


def _match(root: ir.Node, chain: list[ir.Node], pv: ir.Node, guard: list[ir.Node], softmax: ir.Node,
           scores: ir.Value, mask: ir.Value | None, add: list[ir.Node]) -> Match | str:
    """The match for one reading of the scores, or why not."""
    factor, nodes = 1.0, [root, *chain, pv, *guard, softmax, *add]
    while (scaled := _scalar_factor(scores.producer())) is not None:
        nodes.append(scores.producer())
        scores, factor = scaled[0], factor * scaled[1]
    qk = producer(scores, "MatMul")
    if qk is None:
        return f"the scores come from {source(scores)}, not from Q·Kᵀ"
    layout = Layout()
    sides = [_side(qk.inputs[0], "q", layout), _side(qk.inputs[1], "k", layout), _side(pv.inputs[1], "v", layout)]
    for side in sides:
        if isinstance(side, str):
            return side
    q, k, v = sides
    why = not_float32(q.input) or not_float32(k.input) or not_float32(v.input)
    if why is not None:
        return why
    if v.factor != 1.0:
        return "V is scaled"
    if not (q.heads == k.heads == v.heads and q.size == k.size):
        return f"Q, K, V split into {q.heads}, {k.heads}, {v.heads} heads of {q.size}, {k.size}, {v.size}"
    if k.base is not v.base or (q.base is not k.base and not _same_dim(q.input, 0, k.input, 0)):
        return "Q, K and V do not provably share batch and key sequence"
    why = _merge_miss(root, chain, pv, q, v, layout) or _mask_miss(mask)
    if why is not None:
        return why
    nodes += [qk, *q.nodes, *k.nodes, *v.nodes]
    side_chains = shape_side_nodes(set(nodes), root.outputs[0]) or []
    order = {n: i for i, n in enumerate(root.graph)} if root.graph is not None else {}
    nodes = sorted(set(nodes + side_chains), key=lambda n: order.get(n, -1))
    expand = mask is not None and not (_rank(mask) == 4 and _same_dim(mask, 2, q.input, 1)
                                       and _same_dim(mask, 3, k.input, 1))
    build = _builder(q, k, v, q.factor * k.factor * factor, mask, expand, any(n.op_type == "IsNaN" for n in guard))
    inputs = [q.input, k.input, v.input, None, None, mask]
    family = "packed_attention" if any(s.part is not None for s in sides) else "attention"
    return Match(family, nodes, "MultiHeadAttention", inputs, {"num_heads": q.heads}, domain=MS_DOMAIN,
                 anchor=softmax, build=build)


def _rank(value: ir.Value | None) -> int | None:
    return value.shape.rank() if value is not None and value.shape is not None else None


def _same_dim(a: ir.Value, i: int, b: ir.Value, j: int) -> bool:
    """Dim i of a and dim j of b are provably equal: the same static size or the same symbolic name."""
    if a.shape is None or b.shape is None or a.shape.rank() is None or b.shape.rank() is None:
        return False
    if not (0 <= i < a.shape.rank() and 0 <= j < b.shape.rank()):
        return False
    x, y = a.shape[i], b.shape[j]
    if isinstance(x, int) or isinstance(y, int):
        return x == y
    return x.value is not None and x.value == y.value


def _merge_miss(root: ir.Node, chain: list[ir.Node], pv: ir.Node, q: Side, v: Side, layout: Layout) -> str | None:
    """Why P·V's way to the root is not [b, n, s, dv] → [b, s, n, dv] through Transposes and identity Reshapes,
    or why the root's readers could not take the fused [b, s, n·dv] instead."""
    layout.set(pv.outputs[0], [("batch", q.base), v.heads, ("seq", q.base), v.size])
    symbols = layout.of[pv.outputs[0]]
    for node in reversed(chain):
        if node.op_type == "Reshape" and layout.reshaped(node) != symbols:
            return "a Reshape after P·V that is not provably identity"
        if node.op_type == "Transpose":
            symbols = [symbols[int(p)] for p in attr(node, "perm", [])]
        layout.set(node.outputs[0], symbols)
        symbols = layout.of[node.outputs[0]]
    if symbols != [layout.of[pv.outputs[0]][i] for i in (0, 2, 1, 3)]:
        return "the output is not P·V transposed to [batch, sequence, heads, head size]"
    out = root.outputs[0]
    if out.is_graph_output():
        return "the attention's 4-D output is a graph output"
    for use in out.uses():
        reader = use.node
        found = entries(reader.inputs[1]) if reader.op_type == "Reshape" and use.idx == 0 else None
        if found is None or any(e is None or (e == 0 and not attr(reader, "allowzero", 0)) for e in found[2:]):
            return f"the attention's output is read by {reader.op_type}, not by a Reshape merging the heads"
    return None


def _mask_miss(mask: ir.Value | None) -> str | None:
    if mask is None:
        return None
    if mask.type is not None and not mask.type.dtype.is_floating_point():
        return f"the mask is {mask.type.dtype}, not float"
    rank = _rank(mask)
    return None if rank is not None and rank <= 4 else "the mask's rank is unknown or above 4"


def _builder(q: Side, k: Side, v: Side, scale: float, mask: ir.Value | None, expand: bool, guard: bool):
    """MultiHeadAttention(q, k, v, bias, -, attention_bias) [→ Where(IsNaN(out), 0, out)]."""
    def build(graph: ir.Graph, name: str) -> tuple[list[ir.Node], list[ir.Value]]:
        nodes: list[ir.Node] = []
        bias = None
        if any(s.bias is not None for s in (q, k, v)):
            dtype = next(s.bias.dtype for s in (q, k, v) if s.bias is not None)
            parts = [s.bias if s.bias is not None else np.zeros(s.heads * s.size, dtype) for s in (q, k, v)]
            bias = set_initializer(graph, f"{name}_qkv_bias", np.concatenate(parts).astype(dtype))
        attention_bias = mask
        if expand:  # [.., .., s, t]: the query's and the key's sequence lengths, read at run time
            lengths = [ir.node("Gather", [ir.node("Shape", [s.input]).outputs[0],
                                          set_initializer(graph, f"{name}_axis1", np.array([1], np.int64))])
                       for s in (q, k)]
            nodes += [n.inputs[0].producer() for n in lengths] + lengths
            ones = set_initializer(graph, f"{name}_ones", np.array([1, 1], np.int64))
            shape = ir.node("Concat", [ones, *(n.outputs[0] for n in lengths)], {"axis": 0})
            expanded = ir.node("Expand", [mask, shape.outputs[0]])
            nodes += [shape, expanded]
            attention_bias = expanded.outputs[0]
        sliced = [columns(graph, f"{name}_{label}", s.input, s.part, s.heads * s.size) if s.part is not None
                  else (None, s.input) for s, label in ((q, "q"), (k, "k"), (v, "v"))]
        nodes += [n for n, _ in sliced if n is not None]
        inputs = [*(value for _, value in sliced), bias, None, attention_bias]
        while inputs[-1] is None:
            inputs.pop()
        mha = ir.node("MultiHeadAttention", inputs, {"num_heads": q.heads, "scale": float(scale)},
                      domain=MS_DOMAIN, name=name)
        nodes.append(mha)
        out = mha.outputs[0]
        out.type = q.input.type  # [batch, sequence, heads · v size]: ONNX shape inference does not know the op
        if q.input.shape is not None and out.type is not None:  # a shape without a type is not serialized
            out.shape = ir.Shape([*list(q.input.shape)[:2], v.heads * v.size])
        if guard:
            dtype = q.input.type.dtype.numpy() if q.input.type is not None else np.float32
            isnan = ir.node("IsNaN", [out])
            zero = set_initializer(graph, f"{name}_zero", np.zeros((), dtype))
            where = ir.node("Where", [isnan.outputs[0], zero, out])
            nodes += [isnan, where]
            where.outputs[0].shape, where.outputs[0].type = out.shape, out.type
            out = where.outputs[0]
        return nodes, [out]
    return build
