"""Attention whose Q, K and V come from one projection (ViT/SVTR exports: ``qkv(x).reshape(B, T, 3, H, d)
.permute(2, 0, 3, 1, 4)``, then the parts picked out on the leading axis).

The projection's P·H·d output channels are P parts of H heads of d: part k, head h is channels
k·H·d + h·d ... + d. A Reshape [.., P·H·d] -> [.., P, H, d], an optional Transpose, then every use of the
result picks one part on the parts axis — Gather of a constant scalar, Slice of one part then Squeeze, or
Split into single parts then Squeeze. Each picked part is a head layout (as :func:`heads.split_heads` makes)
over its third of the channels, and head h of every part is tied into one removal unit of P·d channels, so
the Reshape keeps P and d and loses heads. The rest (scores, Softmax, context, merge, output projection) is
the rules of :mod:`heads`. Anything else reading the packed tensor blocks the group, with the reason.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.graphs import attr as _attr, default_opset, is_default_domain
from graphopt.passes.channels import heads, targets
from graphopt.passes.channels.state import Analysis
from graphopt.passes.channels.types import Chan, const_array, cut, label


def split(an: Analysis, node: ir.Node, chan: Chan) -> bool:
    """Reshape ``node`` of a plain channel axis into [.., P, H, d] with its parts picked out; False when it is
    not that shape of Reshape (the plain rules then decide)."""
    src, dst = an.dims(node.inputs[0]), an.dims(node.outputs[0])
    ents = targets.entries(node, an.dims)
    rank = len(ents) if ents is not None else len(dst) if dst else None
    if chan.axis != -1 or chan.block != 1 or chan.per != 1 or not src or len(src) < 2 or rank != len(src) + 2:
        return False
    sizes = _sizes(ents, dst, chan.total)
    if sizes is None:
        return False
    parts, count, size = sizes
    picked = _picks(an, node, rank, parts)
    if picked is None:
        return False  # no use picks a part: not this layout (a Gemm unflattened to a conv map, say)
    if isinstance(picked, str):
        an.block(chan, f"Reshape {label(node)!r} packs Q/K/V: {picked}")
        return True
    if ents is None:
        an.block(chan, f"Reshape {label(node)!r}: its target is neither a constant nor a Concat of constants and "
                       "shape reads (the head count of the packed Q/K/V cannot be rewritten)")
        return True
    edits = heads.changing_entry(an, node, ents[-2], count, "head count", chan)
    if edits is None or not heads.leading_ok(an, node, ents, chan, rank - 3):
        return True
    for entry, what, value in ((ents[-3], "part count", parts), (ents[-1], "head size", size)):
        if not (heads.is_const(entry, value) or heads.is_const(entry, -1) and heads.is_const(ents[-2], count)):
            an.block(chan, f"Reshape {label(node)!r}: the {what} of the packed Q/K/V in its target is computed")
            return True
    outs, between, layout = picked
    elems = chan.elements()
    width = count * size
    an.ties.extend([elems[k * width + h * size + j] for k in range(parts)] for h in range(count) for j in range(size))
    an.ties.extend(elems[h * size:(h + 1) * size] for h in range(count))
    heads.fixup(an, node, node.inputs[0], parts * size, edits, between)
    head_axis, inner = layout
    for k, out in outs:
        an.set_state(out, Chan(cut(chan.segs, k * width, (k + 1) * width), head_axis, 1, size, inner))
    return True


def _sizes(ents, dst: tuple | None, total: int) -> tuple[int, int, int] | None:
    """(P, H, d) from the inferred output dims, else the constant entries (one of them may be -1)."""
    found: list[int | None] = []
    for pos in (-3, -2, -1):
        if dst and len(dst) >= 3 and dst[pos] is not None:
            found.append(int(dst[pos]))
        elif ents is not None and ents[pos] is not None and ents[pos].read is None and (ents[pos].value or 0) > 0:
            found.append(ents[pos].value)
        else:
            found.append(None)
    missing = [i for i, v in enumerate(found) if v is None]
    if len(missing) == 1:
        known = int(np.prod([v for v in found if v is not None]))
        if known and total % known == 0:
            found[missing[0]] = total // known
    if None in found:
        return None
    parts, count, size = (int(v) for v in found)  # type: ignore[arg-type]
    if parts < 2 or count < 2 or parts * count * size != total:
        return None
    return parts, count, size


def _picks(an: Analysis, node: ir.Node, rank: int, parts: int):
    """The picked parts [(k, value)], the values in between (their shapes follow) and the head layout
    (head axis, inner axis, from the end) of each part; why not when some use is not a pick; None when none
    is."""
    packed, between = node.outputs[0], [node.outputs[0]]
    order = list(range(rank))
    trans = heads.sole_user(packed, "Transpose")
    if trans is not None:
        order = [int(p) for p in _attr(trans, "perm", list(range(rank - 1, -1, -1)))]
        packed = trans.outputs[0]
        between.append(packed)
    axis = order.index(rank - 3)
    # the head and inner axes after the parts axis is dropped, counted from the end of the rank-1 parts
    place = [order.index(p) for p in (rank - 2, rank - 1)]
    layout = tuple(p - (p > axis) - (rank - 1) for p in place)
    outs: list[tuple[int, ir.Value]] = []
    others = []
    for use in packed.uses():
        got = _pick(an, use.node, use.idx, axis, rank, parts)
        if got is None:
            others.append(use.node)
            continue
        outs += got[0]
        between += got[1]
    if not outs:
        return None
    if others:
        return f"{others[0].op_type} {label(others[0])!r} does not pick one part on the parts axis"
    if packed.is_graph_output():
        return "the packed tensor is a graph output"
    return outs, between, layout


def _pick(an: Analysis, user: ir.Node, idx: int, axis: int, rank: int, parts: int):
    """([(part, value with the parts axis dropped)], [values in between]) for one use, None if not a pick."""
    if idx != 0 or not is_default_domain(user):
        return None
    op = user.op_type
    if op == "Gather":
        index = const_array(user.inputs[1])
        if index is None or index.ndim != 0 or int(_attr(user, "axis", 0)) % rank != axis or not (
                -parts <= int(index) < parts):
            return None
        return [(int(index) % parts, user.outputs[0])], []
    if op == "Slice":
        part = _one_part(user, axis, rank)
        part = part if part is not None and part < parts else None
        squeeze = heads.sole_user(user.outputs[0], "Squeeze")
        if part is None or squeeze is None or _squeezed(an, squeeze, rank) != axis:
            return None
        return [(part, squeeze.outputs[0])], [user.outputs[0]]
    if op == "Split" and int(_attr(user, "axis", 0)) % rank == axis and _unit_split(user, parts):
        outs, between = [], []
        for k, out in enumerate(user.outputs):
            if out is None or not out.uses():
                continue
            squeeze = heads.sole_user(out, "Squeeze")
            if squeeze is None or _squeezed(an, squeeze, rank) != axis:
                return None
            outs.append((k, squeeze.outputs[0]))
            between.append(out)
        return outs, between
    return None


def _one_part(node: ir.Node, axis: int, rank: int) -> int | None:
    """k when Slice ``node`` keeps exactly part k of the parts axis (constant bounds, step 1)."""
    bounds = [const_array(node.inputs[i]) if len(node.inputs) > i and node.inputs[i] is not None else None
              for i in range(1, 5)]
    starts, ends, axes, steps = bounds
    if starts is None or ends is None or starts.size != 1 or (len(node.inputs) > 3 and node.inputs[3] is not None
                                                             and axes is None):
        return None
    if (axes is not None and int(axes.reshape(-1)[0]) % rank != axis) or (axes is None and axis != 0):
        return None
    if steps is not None and int(steps.reshape(-1)[0]) != 1:
        return None
    lo, hi = int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])
    return lo if lo >= 0 and hi == lo + 1 else None


def _unit_split(node: ir.Node, parts: int) -> bool:
    """Split into the ``parts`` single parts (given sizes all 1, or none given and one output per part)."""
    given = len(node.inputs) > 1 and node.inputs[1] is not None
    sizes = const_array(node.inputs[1]) if given else _attr(node, "split", None)
    if sizes is None:
        return not given and len(node.outputs) == parts
    return all(int(s) == 1 for s in np.asarray(sizes).reshape(-1))


def _squeezed(an: Analysis, node: ir.Node, rank: int) -> int | None:
    """The one axis Squeeze ``node`` drops (non-negative), None when it drops another count of axes."""
    axes = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if axes is None and default_opset(an.model, 13) < 13:
        axes = _attr(node, "axes", None)
    if axes is None or np.asarray(axes).size != 1:
        return None
    return int(np.asarray(axes).reshape(-1)[0]) % rank
