"""Per-op channel rules of the analysis (the walk in :mod:`deps` dispatches here).

Each rule reads the input :class:`Chan` states, records in the :class:`Analysis` the slots/fixups that follow
the pruning and sets the output state, or blocks the atoms it cannot prove (with a reason). Grouped convs and
channel shuffles do not block: they add *constraints* (``an.colorings``: removal must take equal counts from
each colour; ``an.ties``: channels removed together) that :mod:`units` turns into removal units.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from graphopt.graphs import attr as _attr
from graphopt.passes.channels.state import Analysis
from graphopt.passes.channels.types import Chan, Seg, const_array, cut, label, to_segs
from graphopt.weights import encoding_of

UNARY = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "Gelu", "Mish", "Erf", "Exp", "Log", "Sqrt", "Neg", "Abs", "Reciprocal",
    "Identity", "Dropout", "Cast", "Floor", "Ceil", "Round", "ThresholdedRelu", "Sin", "Cos", "Sign",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool", "IsNaN", "IsInf",
    "Not"})
POOLS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"})
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow"})
PRODUCERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
NORMALIZATIONS = frozenset({"BatchNormalization", "InstanceNormalization"})
# onnxruntime's fused activations (com.microsoft): element-wise, with an optional per-channel bias.
CONTRIB_ELEMENTWISE = frozenset({"Gelu", "FastGelu", "BiasGelu", "QuickGelu"})


def _axis(an: Analysis, value: ir.Value, axis: int) -> int | None:
    """``axis`` of ``value`` counted from the end (as Chan.axis), None when the rank is unknown."""
    rank = len(an.dims(value) or ())
    return (axis - rank if axis >= 0 else axis) if rank else None


def _only_use(value: ir.Value, op: str) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output() or uses[0].idx != 0 or uses[0].node.op_type != op:
        return None
    return uses[0].node


def unary(an: Analysis, node: ir.Node, chan: Chan) -> None:
    """An op that keeps every channel where it is (activations, casts, pools on a spatial layout)."""
    op, out = node.op_type, node.outputs[0]
    if op in POOLS and chan.axis != -(len(an.dims(out) or ()) - 1):
        an.block(chan, f"{op} {label(node)!r} on a non-spatial layout")
        return
    if len(node.outputs) > 1 and node.outputs[1] is not None and node.outputs[1].uses():
        an.block(chan, f"second output of {op} {label(node)!r} is used")
    an.set_state(out, chan)


def elementwise(an: Analysis, node: ir.Node, ins: list[Chan | None]) -> None:
    """A residual join or a per-channel constant (Add/Mul/…/PRelu): channels that meet must line up."""
    chans = [c for c in ins if c is not None]
    first = chans[0]
    for other in chans[1:]:
        if not an.merge(first, other) and not an.tie(first, other):
            reason = f"{node.op_type} {label(node)!r} joins tensors whose channels do not line up"
            for c in chans:
                an.block(c, reason)
            return
    out_rank = len(an.dims(node.outputs[0]) or ())
    for i, (value, chan) in enumerate(zip(node.inputs, ins)):
        if chan is not None or value is None:
            continue
        dims = an.dims(value)
        const = const_array(value)
        shape = const.shape if const is not None else dims
        if shape is None:
            an.block(first, f"{node.op_type} {label(node)!r}: input {value.name!r} has an unknown shape")
            return
        pos = len(shape) + first.axis
        if node.op_type == "PRelu" and const is not None and len(shape) == 1 and out_rank > 2:
            pos = -1 if shape[0] == 1 else 0  # PRelu slope [C]: per channel (as exporters write it)
        if pos < 0 or shape[pos] == 1:
            continue  # broadcast along the channel axis: unchanged by pruning
        if const is None or shape[pos] != first.total * first.block or first.per > 1:
            what = "per head" if first.per > 1 else "channel-wise but not a constant"
            an.block(first, f"{node.op_type} {label(node)!r}: input {value.name!r} is {what}")
            return
        an.link(node, i, pos, first, "member")
    an.set_state(node.outputs[0], first)


def normalization(an: Analysis, node: ir.Node, ins: list[Chan | None], chan: Chan) -> None:
    op = node.op_type
    last = 5 if op == "BatchNormalization" else 3
    if ins[0] is None or any(c is not None for c in ins[1:]):
        an.block(chan, f"{op} {label(node)!r} normalizes a channel-mixed tensor")
        return
    if _axis(an, node.inputs[0], 1) != chan.axis:  # e.g. a MatMul's channels (last axis) under a [N, C, K] BN
        an.block(chan, f"{op} {label(node)!r} normalizes axis 1, not the channel axis")
        return
    if any(const_array(v) is None for v in node.inputs[1:last]) or len(node.outputs) > 1 and any(
            o.uses() for o in node.outputs[1:] if o is not None):
        an.block(chan, f"{op} {label(node)!r} parameters are not constants")
        return
    for i in range(1, last):
        an.link(node, i, 0, chan, "member")
    an.set_state(node.outputs[0], chan)


def layer(an: Analysis, node: ir.Node, ins: list[Chan | None]) -> None:
    """A producer (Conv, ConvTranspose, Gemm, MatMul): consumes its input's channels through its weight and,
    with a plain constant weight, creates an atom of its output channels."""
    op = node.op_type
    w_val = node.inputs[1] if len(node.inputs) > 1 else None
    w = const_array(w_val)
    encoded = w_val is not None and encoding_of(w_val) is not None
    group = int(_attr(node, "group", 1))
    x = ins[0]
    if any(c is not None for c in ins[1:]):
        for c in ins:
            an.block(c, f"{op} {label(node)!r} takes channels as its weight")
        return
    ok = w is not None and not encoded and w.dtype.kind == "f"
    if op == "Gemm" and (_attr(node, "transA", 0) or (w is not None and w.ndim != 2)):
        ok = False
    if op == "MatMul" and (w is None or w.ndim != 2):
        ok = False
    if op == "Conv" and ok and group > 1:
        _grouped(an, node, x, w, group)
        return
    if op == "ConvTranspose" and group != 1:
        ok = False
    if x is not None:
        _consume(an, node, x, ok)
    if ok:
        _produce(an, node, w)


def _grouped(an: Analysis, node: ir.Node, x: Chan | None, w: np.ndarray, group: int) -> None:
    if x is not None and w.shape[1] == 1 and group == w.shape[0] == x.total * x.block and x.block == 1:
        an.link(node, 1, 0, x, "member")  # depthwise: its input and output channels are one
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            an.link(node, 2, 0, x, "member")
        an.fixups[node] = {"kind": "depthwise", "value": node.inputs[0]}
        an.set_state(node.outputs[0], x)
    elif w.shape[1] > 1 or w.shape[0] > group:
        grouped_conv(an, node, x, w, group)
    else:
        an.block(x, f"grouped Conv {label(node)!r} (group={group}) ties channels within groups")


def _consume(an: Analysis, node: ir.Node, x: Chan, ok: bool) -> None:
    """The layer's weight slot on its input-channel axis (a consumer of ``x``)."""
    op = node.op_type
    rank = len(an.dims(node.inputs[0]) or ())
    want = -1 if op in ("Gemm", "MatMul") else (1 - rank if rank else None)
    if not ok:
        an.block(x, f"{op} {label(node)!r} weight is not a plain constant (compressed or computed)")
    elif x.axis != want or (x.block != 1 and op in ("Conv", "ConvTranspose")):
        an.block(x, f"{op} {label(node)!r} reads the channels on another axis")
    else:
        axis = {"Conv": 1, "ConvTranspose": 0, "MatMul": 0}.get(op, 1 if _attr(node, "transB", 0) else 0)
        an.link(node, 1, axis, x, "consumer")


def _produce(an: Analysis, node: ir.Node, w: np.ndarray) -> None:
    """A new atom: the layer's output channels, linked to its weight (and bias) on the output axis."""
    op = node.op_type
    if op == "Conv":
        size, axis, out_axis = w.shape[0], 0, 1 - w.ndim
    elif op == "ConvTranspose":
        size, axis, out_axis = w.shape[1], 1, 1 - w.ndim
    elif op == "Gemm":
        transb = _attr(node, "transB", 0)
        size, axis, out_axis = w.shape[0] if transb else w.shape[1], 0 if transb else 1, -1
    else:
        size, axis, out_axis = w.shape[1], 1, -1
    atom = an.new_atom(int(size), node)
    chan = Chan([Seg(atom, 0, int(size))], out_axis)
    an.link(node, 1, axis, chan, "producer")
    if op != "MatMul" and len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = const_array(node.inputs[2])
        if bias is None:
            an.block(chan, f"{op} {label(node)!r} bias is not a constant")
        elif bias.size == size:
            an.link(node, 2, bias.ndim - 1, chan, "producer")
        elif bias.size != 1:
            an.block(chan, f"{op} {label(node)!r} bias is not a per-channel vector")
    an.set_state(node.outputs[0], chan)


def grouped_conv(an: Analysis, node: ir.Node, x: Chan | None, w: np.ndarray, group: int) -> None:
    """A Conv with 1 < group < channels: its input channels read in ``group`` blocks, its output channels
    written in ``group`` blocks; both sides must lose equal counts per block (weight stays rectangular,
    ``group`` unchanged). The input side is a group-sliced weight slot, the output side a new atom."""
    cin = int(w.shape[1]) * group
    if x is not None:
        if x.axis != 1 - len(an.dims(node.inputs[0]) or ()) or x.block != 1 or x.total != cin:
            an.block(x, f"grouped Conv {label(node)!r} (group={group}) reads the channels on another axis")
        else:
            slot = an.link(node, 1, 1, x, "member")
            slot.groups = group
            elems = x.elements()
            per = cin // group
            an.colorings.append((label(node), [elems[k * per:(k + 1) * per] for k in range(group)]))
    cout = int(w.shape[0])
    if cout % group:
        an.block(x, f"grouped Conv {label(node)!r}: {cout} outputs in {group} groups")
        return
    atom = an.new_atom(cout, node)
    chan = Chan([Seg(atom, 0, cout)], 1 - w.ndim)
    an.link(node, 1, 0, chan, "producer")
    per = cout // group
    an.colorings.append((label(node), [[(atom, k * per + i) for i in range(per)] for k in range(group)]))
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = const_array(node.inputs[2])
        if bias is None or bias.size != cout:
            an.block(chan, f"Conv {label(node)!r} bias is not a constant per-channel vector")
        else:
            an.link(node, 2, 0, chan, "producer")
    an.set_state(node.outputs[0], chan)


def concat(an: Analysis, node: ir.Node, ins: list[Chan | None]) -> None:
    dims = an.dims(node.outputs[0])
    axis = int(_attr(node, "axis", 1))
    rank = len(dims) if dims else 0
    known = [c for c in ins if c is not None]
    if not rank or any(c is None for c in ins):
        for c in known:
            an.block(c, f"Concat {label(node)!r} joins a tensor whose channels are not tracked")
        return
    if (axis - rank if axis >= 0 else axis) != known[0].axis:
        elementwise(an, node, ins)  # joined along another axis: channels must line up
        return
    if any(c.axis != known[0].axis or c.block != 1 for c in known):
        for c in known:
            an.block(c, f"Concat {label(node)!r} mixes channel layouts")
        return
    segs = [Seg(s.atom, s.start, s.length) for c in known for s in c.segs]
    an.set_state(node.outputs[0], Chan(segs, known[0].axis))


def split(an: Analysis, node: ir.Node, chan: Chan) -> None:
    if _axis(an, node.inputs[0], int(_attr(node, "axis", 0))) != chan.axis or chan.block != 1:
        an.block(chan, f"Split {label(node)!r} is not on the channel axis")
        return
    sizes = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    sizes = list(np.asarray(sizes if sizes is not None else _attr(node, "split", []), dtype=int).reshape(-1))
    if not sizes:
        n = len(node.outputs)
        if chan.total % n:
            an.block(chan, f"Split {label(node)!r}: uneven split")
            return
        sizes = [chan.total // n] * n
    start = 0
    for out, size in zip(node.outputs, sizes):
        an.set_state(out, Chan(cut(chan.segs, start, start + size), chan.axis))
        start += size
    an.fixups[node] = {"kind": "split", "value": node.inputs[0], "sizes": sizes}


def slice_(an: Analysis, node: ir.Node, chan: Chan) -> None:
    """Slice with constant starts/ends/axes, step 1: on the channel axis it keeps a channel range (the
    bounds follow the pruning); on other axes the channels pass through."""
    why = f"Slice {label(node)!r} bounds are not constants with step 1"
    parts = [const_array(node.inputs[i]) if len(node.inputs) > i and node.inputs[i] is not None else None
             for i in range(1, 5)]
    starts, ends, axes, steps = parts
    if starts is None or ends is None or (len(node.inputs) > 3 and node.inputs[3] is not None and axes is None):
        an.block(chan, why)
        return
    axes = np.arange(starts.size) if axes is None else axes.reshape(-1)
    if steps is not None and np.any(steps != 1):
        an.block(chan, why)
        return
    # a negative axis counts from the end as Chan.axis does; a non-negative one needs the rank (unknown past an
    # op ONNX cannot infer, such as com.microsoft MultiHeadAttention): then the channels cannot be followed
    where = [int(a) if int(a) < 0 else _axis(an, node.inputs[0], int(a)) for a in axes]
    if None in where:
        an.block(chan, f"Slice {label(node)!r}: rank unknown")
        return
    mine = [i for i, a in enumerate(where) if a == chan.axis]
    if not mine:
        an.set_state(node.outputs[0], chan)
        return
    if chan.block != 1:
        an.block(chan, f"Slice {label(node)!r} cuts a flattened channel axis")
        return
    i, n = mine[0], chan.total
    lo, hi = (int(np.clip(b + n if b < 0 else b, 0, n)) for b in (int(starts.reshape(-1)[i]), int(ends.reshape(-1)[i])))
    an.set_state(node.outputs[0], Chan(cut(chan.segs, lo, max(lo, hi)), chan.axis))
    an.fixups[node] = {"kind": "slice", "value": node.inputs[0], "index": i, "lo": lo, "hi": hi}


def squeeze(an: Analysis, node: ir.Node, chan: Chan) -> None:
    """Squeeze/Unsqueeze of axes other than the channel axis: the channel axis moves, nothing shrinks."""
    src, dst = an.dims(node.inputs[0]), an.dims(node.outputs[0])
    axes = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    axes = axes if axes is not None else _attr(node, "axes", None)
    if src is None or dst is None or axes is None:
        an.block(chan, f"{node.op_type} {label(node)!r} axes or ranks are unknown")
        return
    pos = len(src) + chan.axis
    if node.op_type == "Squeeze":
        axes = {int(a) % len(src) for a in np.asarray(axes).reshape(-1)}
        if pos in axes:
            an.block(chan, f"Squeeze {label(node)!r} removes the channel axis")
            return
        new = pos - sum(a < pos for a in axes)
    else:
        axes = {int(a) % len(dst) for a in np.asarray(axes).reshape(-1)}
        kept = [p for p in range(len(dst)) if p not in axes]
        new = kept[pos]
    an.set_state(node.outputs[0], Chan(chan.segs, new - len(dst), chan.block))


def reshape(an: Analysis, node: ir.Node, chan: Chan) -> None:
    src, dst = an.dims(node.inputs[0]), an.dims(node.outputs[0])
    why = f"{node.op_type} {label(node)!r} moves the channel axis (cannot be proven)"
    if not src or not dst or None in src[1:] or None in dst[1:] or chan.axis != 1 - len(src):
        an.block(chan, why)
        return
    if node.op_type == "Flatten" and int(_attr(node, "axis", 1)) != 1:
        an.block(chan, why)
        return
    if node.op_type == "Reshape" and len(dst) == len(src) + 1 and shuffle(an, node, chan, src, dst):
        return
    # Provable layouts: [N, C, *S] -> [N, C·prod(S)] (flatten) and [N, C] -> [N, C, 1, ...] (unflatten).
    spatial = math.prod(src[2:])
    if len(dst) == 2 and dst[1] == src[1] * spatial:
        out = Chan(chan.segs, -1, chan.block * spatial)
    elif len(src) == 2 and dst[1] == src[1] and all(d == 1 for d in dst[2:]):
        out = Chan(chan.segs, 1 - len(dst), chan.block)
    else:
        an.block(chan, why)
        return
    if node.op_type == "Reshape":
        shape = const_array(node.inputs[1])
        if shape is None:
            an.block(chan, f"Reshape {label(node)!r} shape is computed")
            return
        an.fixups[node] = {"kind": "reshape", "value": node.inputs[0], "shape": shape,
                           "unit": out.block if len(dst) == 2 else chan.block}
    an.set_state(node.outputs[0], out)


def shuffle(an: Analysis, first: ir.Node, chan: Chan, src: tuple, dst: tuple) -> bool:
    """Channel shuffle: Reshape [N, C, *S] -> [N, a, b, *S], Transpose swapping axes 1 and 2, Reshape back
    to [N, C, *S]. Output channel j·a + k is input channel k·b + j. After pruning, the [a, b] grid must stay
    a grid whose transpose keeps the analysed order, so whole columns go: channel j of every one of the a
    blocks is removed together (a tie). Returns False when the chain is not exactly this."""
    a, b = dst[1], dst[2]
    if a * b != src[1] or tuple(dst[3:]) != tuple(src[2:]) or chan.block != 1 or a < 2 or b < 1:
        return False
    trans = _only_use(first.outputs[0], "Transpose")
    perm = list(_attr(trans, "perm", [])) if trans is not None else []
    if perm != [0, 2, 1] + list(range(3, len(dst))):
        return False
    last = _only_use(trans.outputs[0], "Reshape")
    out_dims = an.dims(last.outputs[0]) if last is not None else None
    if out_dims is None or tuple(out_dims[1:]) != tuple(src[1:]):
        return False
    shapes = [const_array(n.inputs[1]) for n in (first, last)]
    if any(s is None for s in shapes) or np.any(shapes[0][1:3] <= 0) or shapes[1][1] == 0:
        an.block(chan, f"channel shuffle at {label(first)!r}: reshape targets are not plain constants")
        return True
    elems = chan.elements()
    an.ties.extend([elems[k * b + j] for k in range(a)] for j in range(b))
    shuffled = [elems[(p % a) * b + p // a] for p in range(a * b)]
    an.fixups[first] = {"kind": "shuffle", "value": first.inputs[0], "a": a, "last": last, "first_shape": shapes[0],
                        "last_shape": shapes[1], "between": [first.outputs[0], trans.outputs[0]]}
    an.set_state(last.outputs[0], Chan(to_segs(shuffled), chan.axis))
    return True
