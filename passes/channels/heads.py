"""Channel rules for attention blocks: heads found through the Reshape/Transpose of the export, not by name.

A projection's output [.., D] reshaped to [.., H, d] becomes a *head layout*: the Chan keeps the D channels,
``per`` = d of them on each position of the head axis, their d features on the ``inner`` axis. Channel
h·d+j of Q meets channel h·d+j of K where the score MatMul contracts them, and the scores meet V position by
position (head by head), so Q, K, V and the merged context are one group; ties make each head (d channels) one
removal unit — the Reshape keeps d and loses heads. Transposes move both axes; the score MatMul contracts the
inner axis (the scores keep only the head axis); Softmax must normalize along another axis; the merge-back
Reshape [.., H, d] -> [.., H·d] returns to a plain channel axis that the output projection reads.

Every Reshape target must be rewritable (:mod:`targets`): the entry that changes (H, or the width H·d) a
constant or -1, every other entry a constant or a read of a dimension that keeps its size. Otherwise the group
is blocked and the reason names the Reshape. A Shape of a tensor with channels may feed Reshape targets (their
rules check them) and anything that reads only sizes the pruning keeps (the head size for SDPA's scale).
"""

from __future__ import annotations

import onnx_ir as ir

from graphopt.graphs import attr as _attr, default_opset
from graphopt.passes.channels import targets
from graphopt.passes.channels.state import Analysis
from graphopt.passes.channels.targets import Entry
from graphopt.passes.channels.types import Chan, label

SHAPE_PLUMBING = frozenset({"Slice", "Gather", "Concat", "Unsqueeze", "Squeeze", "Cast", "Identity"})


def _rank(an: Analysis, value: ir.Value) -> int | None:
    dims = an.dims(value)
    return len(dims) if dims else None


def changing_axis(an: Analysis, value: ir.Value) -> int | None:
    """The axis of ``value`` whose size a pruning of its channels changes (non-negative), None if none."""
    chan = an.state.get(value)
    rank = _rank(an, value)
    return None if chan is None or rank is None else rank + chan.axis


def steady(an: Analysis, entry: Entry | None) -> bool:
    """An entry that keeps its value under any pruning: a constant, or a read of an axis that keeps its size."""
    if entry is None:
        return False
    if entry.read is None:
        return True
    value, axis = entry.read
    return _rank(an, value) is not None and axis != changing_axis(an, value)


def is_const(entry: Entry | None, *values: int) -> bool:
    return entry is not None and entry.read is None and entry.value in values


def sole_user(value: ir.Value, op: str) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output() or uses[0].idx != 0 or uses[0].node.op_type != op:
        return None
    return uses[0].node


def fixup(an: Analysis, node: ir.Node, value: ir.Value, unit: int, edits: list[Entry], between=()) -> None:
    an.fixups[node] = {"kind": "target", "value": value, "unit": unit, "edits": edits, "between": list(between)}


# --- Reshape ---------------------------------------------------------------------------------------------------


def reshape(an: Analysis, node: ir.Node, chan: Chan) -> bool:
    """A head split, merge, layout-keeping Reshape or folded transpose; False when ``node`` is none of these
    on a plain channel axis (the plain rules then decide)."""
    if chan.per == 1:
        return split_heads(an, node, chan)
    if fold(an, node, chan):
        return True
    src, ents = an.dims(node.inputs[0]), targets.entries(node, an.dims)
    if ents is None:
        an.block(chan, f"Reshape {label(node)!r}: its target is neither a constant nor a Concat of constants and "
                       "shape reads (it cannot follow the head count)")
    elif src and len(ents) == len(src) - 1:
        merge_heads(an, node, chan, ents)
    elif src and len(ents) == len(src):
        keep_heads(an, node, chan, ents, src)
    else:
        an.block(chan, f"Reshape {label(node)!r} neither merges the heads nor keeps their layout")
    return True


def split_heads(an: Analysis, node: ir.Node, chan: Chan) -> bool:
    """[.., D] -> [.., H, d] on the channel axis (the last): a head layout over the same channels."""
    src, dst = an.dims(node.inputs[0]), an.dims(node.outputs[0])
    if chan.axis != -1 or chan.block != 1 or not src or len(src) < 3:
        return False
    ents = targets.entries(node, an.dims)
    rank = len(ents) if ents is not None else len(dst) if dst else None
    if rank != len(src) + 1:
        return False
    heads, size = _last_two(ents, dst, chan.total)
    if heads is None or size is None or heads * size != chan.total or heads < 2:
        return False
    if ents is None:
        an.block(chan, f"Reshape {label(node)!r}: its target is neither a constant nor a Concat of constants and "
                       "shape reads (the head count cannot be rewritten)")
        return True
    edits = changing_entry(an, node, ents[-2], heads, "head count", chan)
    if edits is None or not leading_ok(an, node, ents, chan, rank - 2):
        return True
    last = ents[-1]
    if last is None or (last.read is None and last.value not in (size, -1)) or not steady(an, last):
        an.block(chan, f"Reshape {label(node)!r}: the head size in its target is computed")
        return True
    elems = chan.elements()
    an.ties.extend(elems[h * size:(h + 1) * size] for h in range(heads))
    fixup(an, node, node.inputs[0], size, edits)
    an.set_state(node.outputs[0], Chan(chan.segs, -2, 1, size, -1))
    return True


def _last_two(ents: list[Entry | None] | None, dst: tuple | None, total: int) -> tuple[int | None, int | None]:
    """(H, d) from the inferred output dims, else from positive constant target entries, else one from the
    other (a -1 entry)."""
    found: list[int | None] = [None, None]
    for k in (0, 1):
        pos = k - 2
        if dst and len(dst) >= 2 and dst[pos] is not None:
            found[k] = int(dst[pos])
        elif ents is not None and len(ents) >= 2:
            entry = ents[pos]
            if entry is not None and entry.read is None and entry.value is not None and entry.value > 0:
                found[k] = entry.value
    for k in (0, 1):
        other = found[1 - k]
        if found[k] is None and other and total % other == 0:
            found[k] = total // other
    return found[0], found[1]


def changing_entry(an: Analysis, node: ir.Node, entry: Entry | None, expected: int, what: str,
                    chan: Chan) -> list[Entry] | None:
    """The edits of the entry that holds ``what`` (its value ``expected``): [] for -1, None (blocked) when it
    is not a constant."""
    if is_const(entry, -1):
        return []
    if is_const(entry, expected):
        return [entry]  # type: ignore[list-item]
    an.block(chan, f"Reshape {label(node)!r}: the {what} in its target is not a constant that can be rewritten")
    return None


def leading_ok(an: Analysis, node: ir.Node, ents: list[Entry | None], chan: Chan, n: int) -> bool:
    for i, entry in enumerate(ents[:n]):
        if not steady(an, entry):
            an.block(chan, f"Reshape {label(node)!r}: target entry {i} is computed (it cannot be proven to keep "
                           "its value when heads are pruned)")
            return False
    return True


def merge_heads(an: Analysis, node: ir.Node, chan: Chan, ents: list[Entry | None]) -> None:
    """[.., H, d] -> [.., H·d]: heads back on one channel axis (the last) for the output projection."""
    dst = an.dims(node.outputs[0])
    width = bool(dst and dst[-1] == chan.total) or is_const(ents[-1], chan.total)
    if chan.axis != -2 or chan.inner != -1 or not (width or is_const(ents[-1], -1)):
        an.block(chan, f"Reshape {label(node)!r} does not merge the heads back into the last axis")
        return
    edits = changing_entry(an, node, ents[-1], chan.total, "width (heads x head size)", chan)
    if edits is None or not leading_ok(an, node, ents, chan, len(ents) - 1):
        return
    fixup(an, node, node.inputs[0], 1, edits)
    an.set_state(node.outputs[0], Chan(chan.segs, -1))


def keep_heads(an: Analysis, node: ir.Node, chan: Chan, ents: list[Entry | None], src: tuple) -> None:
    """A Reshape that keeps the head layout ([N, H, T, d] -> [-1, H, T, d], as torch's ``view`` after SDPA)."""
    x, rank = node.inputs[0], len(src)
    head, inner = rank + chan.axis, None if chan.inner is None else rank + chan.inner
    edits: list[Entry] = []
    for i, entry in enumerate(ents):
        here = entry is not None and entry.read == (x, i) or is_const(entry, 0) and not int(_attr(node, "allowzero", 0))
        if i == head and is_const(entry, src[i]):
            edits.append(entry)  # type: ignore[arg-type]
        elif here or is_const(entry, -1) or (i != head and src[i] is not None and is_const(entry, src[i])):
            continue
        else:
            what = "the head count" if i == head else "the head size" if i == inner else f"entry {i}"
            an.block(chan, f"Reshape {label(node)!r} on attention heads: {what} in its target is not a constant "
                           "or a read of the same dimension")
            return
    fixup(an, node, x, chan.per, edits)
    an.set_state(node.outputs[0], chan)


def keep_width(an: Analysis, node: ir.Node, chan: Chan) -> bool:
    """A Reshape whose output's last axis is the input's plain channel axis, whole ([B, T, D] -> [0, T, D], as the
    merge Reshape fuse leaves after MultiHeadAttention, or -> [B·T, D]): rows of D keep their order, so channel c
    stays at c. The width entry follows (a constant D, or a read of the input's last axis); the other entries must
    keep their values (constants, shape reads of kept axes, 0 copies, -1). False when it is not that."""
    x, src = node.inputs[0], an.dims(node.inputs[0])
    ents = targets.entries(node, an.dims)
    if chan.axis != -1 or chan.block != 1 or chan.per != 1 or not ents:
        return False
    last = ents[-1]
    if is_const(last, chan.total):
        edits = [last]
    elif src and last is not None and last.read == (x, len(src) - 1):
        edits = []
    else:
        return False
    copies = not int(_attr(node, "allowzero", 0))
    if not all(steady(an, e) or is_const(e, -1) or (copies and is_const(e, 0)) for e in ents[:-1]):
        return False
    fixup(an, node, x, 1, edits)
    an.set_state(node.outputs[0], chan)
    return True


def fold(an: Analysis, node: ir.Node, chan: Chan) -> bool:
    """Kᵀ as torch's SDPA decomposition spells it: Reshape [.., H, T, d] -> [-1, T, d], Transpose [0, 2, 1],
    Reshape back to [.., H, d, T] with the leading sizes read from the first input's Shape. The fold puts the
    heads inside the first axis (never split apart), so the chain is a transpose of the last two axes."""
    x = node.inputs[0]
    src = an.dims(x)
    trans = sole_user(node.outputs[0], "Transpose")
    last = sole_user(trans.outputs[0], "Reshape") if trans is not None else None
    if last is None or not src or len(src) < 4 or chan.axis > -3 or chan.inner not in (-1, -2):
        return False
    first, back = targets.entries(node, an.dims), targets.entries(last, an.dims)
    rank = len(src)
    if first is None or len(first) != 3 or list(_attr(trans, "perm", [])) != [0, 2, 1]:
        return False
    why = f"Reshape {label(last)!r}: the folded transpose of attention heads does not restore their layout"
    same = lambda e, axis: e is not None and (e.read == (x, axis) or src[axis] is not None  # noqa: E731
                                              and is_const(e, src[axis]) and axis != rank + chan.axis)
    if not (is_const(first[0], -1) and same(first[1], rank - 2) and same(first[2], rank - 1)):
        return False
    if back is None or len(back) != rank or not (same(back[-2], rank - 1) and same(back[-1], rank - 2)):
        an.block(chan, why)
        return True
    edits = []
    for i, entry in enumerate(back[:-2]):
        if i == rank + chan.axis and is_const(entry, src[i]):
            edits.append(entry)
        elif not (same(entry, i) or is_const(entry, -1)):
            an.block(chan, why)
            return True
    fixup(an, last, x, chan.per, edits, [node.outputs[0], trans.outputs[0]])
    an.set_state(last.outputs[0], Chan(chan.segs, chan.axis, chan.block, chan.per, -3 - chan.inner))
    return True


# --- Transpose, MatMul of activations, Softmax, Shape -------------------------------------------------------------


def transpose(an: Analysis, node: ir.Node, chan: Chan) -> None:
    rank = _rank(an, node.inputs[0])
    if rank is None:
        an.block(chan, f"Transpose {label(node)!r}: rank unknown")
        return
    perm = [int(p) for p in _attr(node, "perm", list(range(rank - 1, -1, -1)))]
    moved = lambda axis: perm.index(rank + axis) - rank  # noqa: E731
    inner = None if chan.inner is None else moved(chan.inner)
    an.set_state(node.outputs[0], Chan(chan.segs, moved(chan.axis), chan.block, chan.per, inner))


def batched_matmul(an: Analysis, node: ir.Node, ins: list[Chan | None]) -> None:
    """MatMul of two activations carrying the same channels on a batch axis (attention scores, scores·V)."""
    a, b = ins[0], ins[1] if len(ins) > 1 else None
    if a is None or b is None or a.axis > -3 or b.axis > -3:
        for c in (a, b):
            an.block(c, f"MatMul {label(node)!r} multiplies channels with a tensor that does not carry them "
                        "on a batch axis")
        return
    # A's inner axis -1 and B's -2 are contracted together; A's -2 or B's -1 stays in the output.
    contracted = (a.inner == -1, b.inner == -2)
    kept = [inner for inner in (a.inner if a.inner == -2 else None, b.inner if b.inner == -1 else None) if inner]
    if a.inner not in (None, -1, -2) or b.inner not in (None, -1, -2) or contracted[0] != contracted[1] or len(
            kept) > 1:
        for c in (a, b):
            an.block(c, f"MatMul {label(node)!r} contracts head channels with something else")
        return
    plain_a, plain_b = (Chan(c.segs, c.axis, c.block, c.per) for c in (a, b))
    if not an.merge(plain_a, plain_b) and not an.tie(plain_a, plain_b):
        for c in (a, b):
            an.block(c, f"MatMul {label(node)!r} meets channels that do not line up")
        return
    out = Chan(a.segs, a.axis, a.block, a.per, kept[0] if kept else None)
    an.follow(out, node)
    an.set_state(node.outputs[0], out)


def softmax(an: Analysis, node: ir.Node, chan: Chan) -> None:
    """Softmax/LogSoftmax along an axis other than the channel (and head) axes."""
    rank = _rank(an, node.inputs[0])
    if rank is None:
        an.block(chan, f"{node.op_type} {label(node)!r}: rank unknown")
        return
    old = default_opset(an.model, 13) < 13
    axis = int(_attr(node, "axis", 1 if old else -1))
    axis = axis + rank if axis < 0 else axis
    mine = [rank + chan.axis] + ([rank + chan.inner] if chan.inner is not None else [])
    # before opset 13 the op normalizes over all axes from `axis` on: the channel axes must come before it
    if (any(p >= axis for p in mine) if old else axis in mine):
        an.block(chan, f"{node.op_type} {label(node)!r} normalizes across channels")
        return
    an.set_state(node.outputs[0], chan)


def flat_softmax(an: Analysis, node: ir.Node, chan: Chan) -> bool:
    """The opset-13 spelling of an older Softmax over the trailing axes (onnx's version converter writes it):
    Flatten(x, axis=k) -> Softmax/LogSoftmax(axis=-1) -> Reshape to Shape(x). The channel (and head) axes
    come before k, so no row mixes channels, and the Reshape reads x's own shape back. False when ``node``
    is not that Flatten."""
    x = node.inputs[0]
    rank = _rank(an, x)
    soft = sole_user(node.outputs[0], "Softmax") or sole_user(node.outputs[0], "LogSoftmax")
    back = sole_user(soft.outputs[0], "Reshape") if soft is not None else None
    if rank is None or back is None or int(_attr(soft, "axis", -1)) not in (-1, 1):
        return False
    size_of = back.inputs[1].producer() if back.inputs[1] is not None else None
    if size_of is None or size_of.op_type != "Shape" or size_of.inputs[0] is not x or size_of.attributes:
        return False
    flat = int(_attr(node, "axis", 1))
    flat = flat + rank if flat < 0 else flat
    mine = [rank + chan.axis] + ([rank + chan.inner] if chan.inner is not None else [])
    if any(p >= flat for p in mine):
        an.block(chan, f"{soft.op_type} {label(soft)!r} normalizes across channels")
        return True
    fixup(an, back, x, 1, [], [node.outputs[0], soft.outputs[0]])  # no entry changes; the flat shapes do
    an.set_state(back.outputs[0], chan)
    return True


def shape(an: Analysis, node: ir.Node, chan: Chan) -> None:
    """Shape of a value with channels: its sizes may reach Reshape targets (checked by their rules) and
    anything else only if it reads none of the sizes a pruning changes (followed through Slice/Gather/Concat/
    Unsqueeze/Squeeze/Cast)."""
    todo, seen = [node.outputs[0]], set()
    while todo:
        value = todo.pop()
        if value in seen:
            continue
        seen.add(value)
        if value.is_graph_output():
            an.block(chan, f"Shape {label(node)!r} reaches a graph output")
            return
        for use in value.uses():
            user = use.node
            if user.op_type == "Reshape" and use.idx == 1:
                continue
            if user.op_type in SHAPE_PLUMBING and (use.idx == 0 or user.op_type == "Concat"):
                todo.extend(o for o in user.outputs if o is not None)
            elif not _reads_steady(an, value):
                an.block(chan, f"Shape {label(node)!r} feeds {user.op_type} {label(user)!r} a size the pruning "
                               "changes (or one that cannot be traced)")
                return


def _reads_steady(an: Analysis, vector: ir.Value) -> bool:
    """Every entry of a shape vector (or scalar) is a read of a dimension the pruning keeps."""
    dims = an.dims(vector)
    if dims is None or len(dims) > 1 or (dims and dims[0] is None):
        return False
    for i in range(dims[0] if dims else 1):
        source = targets.read(vector, i, an.dims)
        if source is None or not steady(an, Entry(read=source)):
            return False
    return True
