"""Op families: each takes the builder and the current tensor, draws valid attributes for that tensor's shape,
writes one or a few nodes and returns the new current tensor. ``FAMILIES`` says which apply to which tensors.

Shapes are computed here (ONNX's formulas), not inferred: the strategy checks them against onnx's strict shape
inference and against onnxruntime's actual outputs, so a wrong formula shows up as a strategy bug at once."""

from __future__ import annotations

from typing import Callable

from tests.fuzz.builder import BATCH, MAX_CHANNELS, MAX_SPATIAL, Builder, Tensor
from tests.fuzz.layout import (concat, divisors, flatten, reshape, self_concat_axes, slice_, split, squeeze,
                               transpose, unsqueeze)


def _window(b: Builder, size: int, pool: bool) -> tuple[int, int, int, int, int, int]:
    """(kernel, stride, dilation, pad_begin, pad_end, out) along one spatial axis of ``size``: the effective
    kernel fits the input, total padding stays below it (so the output is never larger than the input), and
    pooling pads stay below the kernel itself (onnxruntime refuses larger ones)."""
    k = b.int(1, min(3, size))
    d = b.int(1, 2) if b.opset >= 10 else 1
    if d * (k - 1) + 1 > size:
        d = 1
    eff = d * (k - 1) + 1
    s = b.int(1, 2)
    pad_room = (k - 1) if pool else (eff - 1)
    pb = b.int(0, pad_room)
    pe = b.int(0, min(pad_room, eff - 1 - pb))
    return k, s, d, pb, pe, (size + pb + pe - eff) // s + 1


# --- weight ops ------------------------------------------------------------------------------------------------

def conv(b: Builder, x: Tensor) -> Tensor:
    _, cin, h, w = x.shape
    kind = b.pick(["plain", "depthwise", "grouped"])
    if kind == "depthwise":
        group, cout = cin, cin * b.int(1, max(1, MAX_CHANNELS // cin))
    elif kind == "grouped" and len(divisors(cin)) > 1:
        group = b.pick(divisors(cin)[1:])
        cout = group * b.int(1, MAX_CHANNELS // group)
    else:
        group, cout = 1, b.int(1, MAX_CHANNELS)
    (kh, sh, dh, pt, pb_, oh), (kw, sw, dw, pl, pr, ow) = _window(b, h, False), _window(b, w, False)
    attrs = {"kernel_shape": [kh, kw], "strides": [sh, sw], "dilations": [dh, dw]}
    if group != 1 or b.bool():
        attrs["group"] = group
    auto_pad = b.pick(["NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"])
    if auto_pad == "NOTSET":
        attrs["pads"] = [pt, pl, pb_, pr]
    else:
        attrs["auto_pad"] = auto_pad
        if auto_pad != "VALID":  # onnxruntime has no dilated SAME convolution
            attrs["dilations"], dh, dw = [1, 1], 1, 1
        if auto_pad == "VALID":
            oh, ow = (h - (dh * (kh - 1) + 1)) // sh + 1, (w - (dw * (kw - 1) + 1)) // sw + 1
        else:
            oh, ow = -(-h // sh), -(-w // sw)
    inputs = [x.name, b.weight([cout, cin // group, kh, kw], cin // group * kh * kw)]
    if b.bool():
        inputs.append(b.weight([cout], 4, "b"))
    return b.tensor("Conv", inputs, (BATCH, cout, oh, ow), **attrs)


def conv_transpose(b: Builder, x: Tensor) -> Tensor:
    _, cin, h, w = x.shape
    group = b.pick([1] + divisors(cin)[1:])
    cout = group * b.int(1, MAX_CHANNELS // group)
    dims = []
    for size in (h, w):
        k, s = b.int(1, 3), b.int(1, 2)
        op = b.int(0, s - 1)
        pb = b.int(0, k - 1)
        pe = b.int(0, k - 1 - pb)
        out = s * (size - 1) + op + k - pb - pe
        if out > MAX_SPATIAL + 4:  # keep spatial sizes small: stride 1, all the padding it allows
            s, op, pb, pe = 1, 0, (k - 1) // 2, k - 1 - (k - 1) // 2
            out = size
        dims.append((k, s, op, pb, pe, out))
    (kh, sh, oph, pt, pb_, oh), (kw, sw, opw, pl, pr, ow) = dims
    attrs = {"kernel_shape": [kh, kw], "strides": [sh, sw], "pads": [pt, pl, pb_, pr]}
    if oph or opw:
        attrs["output_padding"] = [oph, opw]
    if group != 1:
        attrs["group"] = group
    inputs = [x.name, b.weight([cin, cout // group, kh, kw], cin // group * kh * kw)]
    if b.bool():
        inputs.append(b.weight([cout], 4, "b"))
    return b.tensor("ConvTranspose", inputs, (BATCH, cout, oh, ow), **attrs)


def gemm(b: Builder, x: Tensor) -> Tensor:
    _, k = x.shape
    m = b.int(1, MAX_CHANNELS)
    alpha, beta = b.pick([1.0, 0.5, 2.0]), b.pick([1.0, 0.5])
    if b.pick(["activation_a", "weight_a"]) == "activation_a":
        trans_b = b.bool()
        inputs = [x.name, b.weight([m, k] if trans_b else [k, m], k)]
        bias = b.pick(["none", "vector", "row", "scalar"])
        if bias != "none":
            inputs.append(b.weight({"vector": [m], "row": [1, m], "scalar": []}[bias], 4, "b"))
        return b.tensor("Gemm", inputs, (BATCH, m), transB=int(trans_b), alpha=alpha, beta=beta)
    # W · xᵀ: the batch moves to axis 1, and a Transpose brings it back.
    trans_a = b.bool()
    inputs = [b.weight([k, m] if trans_a else [m, k], k), x.name]
    bias = b.pick(["none", "column", "scalar"])
    if bias != "none":
        inputs.append(b.weight({"column": [m, 1], "scalar": []}[bias], 4, "b"))
    y = b.tensor("Gemm", inputs, (m, BATCH), transA=int(trans_a), transB=1, alpha=alpha, beta=beta)
    b.pool.remove(y)  # batch not on axis 0: no residual partner
    return b.tensor("Transpose", [y.name], (BATCH, m), perm=[1, 0])


def matmul(b: Builder, x: Tensor) -> Tensor:
    k, m = x.shape[-1], b.int(1, MAX_CHANNELS)
    if x.rank == 4 and b.bool():  # a weight with its own batch dim, broadcast against x's channels
        w = b.weight([x.shape[1], k, m], k)
    else:
        w = b.weight([k, m], k)
    y = b.tensor("MatMul", [x.name, w], x.shape[:-1] + (m,))
    if b.bool():
        y = b.tensor("Add", [y.name, b.weight([m], 4, "b")], y.shape)
    return y


def batchnorm(b: Builder, x: Tensor) -> Tensor:
    c = x.shape[1]
    params = [b.values([c], 0.5, 1.5, "gamma"), b.weight([c], 4, "beta"), b.weight([c], 16, "mean"),
              b.values([c], 0.5, 2.0, "var")]
    return b.tensor("BatchNormalization", [x.name, *params], x.shape, epsilon=b.pick([1e-5, 1e-3]))


def conv_block(b: Builder, x: Tensor) -> Tensor:
    """Conv (or Gemm) → BatchNormalization → activation: what fold_batchnorm and quantize look for."""
    y = conv(b, x) if x.rank == 4 else gemm(b, x)
    y = batchnorm(b, y)
    return activation(b, y) if b.bool() else y


def if_branch(b: Builder, x: Tensor) -> Tensor:
    """If (mean of the graph input > 0): a weight op on x, else an activation of x. The condition reads the
    graph input, so no rewrite of ours can flip it; the then-body's weight sits in the body, as a Constant
    there, or in the outer graph."""
    mean = b.with_axes("ReduceMean", b.root_input, [], (), keepdims=0)
    cond = b.tensor("Greater", [mean.name, b.scalar(0.0)], ())
    b.pool.remove(mean)  # a scalar and a bool: neither a residual partner nor a (float) output
    b.pool.remove(cond)
    then_b, else_b = b.sub(), b.sub()
    if x.rank == 4:
        c, k = x.shape[1], b.pick([1, 3])
        y = then_b.tensor("Conv", [x.name, then_b.weight([c, c, k, k], c * k * k)], x.shape,
                          kernel_shape=[k, k], pads=[k // 2] * 4)
    else:
        f = x.shape[-1]
        y = then_b.tensor("MatMul", [x.name, then_b.weight([f, f], f)], x.shape)
    z = activation(else_b, x) if b.bool() else else_b.tensor("Identity", [x.name], x.shape)
    return b.if_node(cond, then_b, y, else_b, z)


def head(b: Builder, x: Tensor) -> Tensor:
    """A classifier head: pooled or flattened features → Gemm to class scores ([N, C], or [N, T, C] per position
    from 3-D), sometimes with a Softmax: what agreement gates, distill refits and gap/channel_prune look for."""
    classes = b.int(2, 10)
    if x.rank == 3 and b.bool():
        y = b.tensor("MatMul", [x.name, b.weight([x.shape[-1], classes], x.shape[-1])], x.shape[:-1] + (classes,))
    else:
        if x.rank == 4 and b.bool():
            x = b.tensor(b.pick(["GlobalAveragePool", "GlobalMaxPool"]), [x.name], (BATCH, x.shape[1], 1, 1))
        if x.rank > 2:
            x = flatten(b, x)
        f = x.shape[1]
        y = b.tensor("Gemm", [x.name, b.weight([classes, f], f), b.weight([classes], 4, "b")], (BATCH, classes),
                     transB=1)
    return b.tensor("Softmax", [y.name], y.shape, axis=-1) if b.bool() else y


# --- pooling and reductions ------------------------------------------------------------------------------------

def pool(b: Builder, x: Tensor) -> Tensor:
    n, c, h, w = x.shape
    kind = b.pick(["MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "FullAveragePool"])
    if kind in ("GlobalAveragePool", "GlobalMaxPool"):
        return b.tensor(kind, [x.name], (n, c, 1, 1))
    if kind == "ReduceMean":
        keep = b.bool()
        return b.with_axes("ReduceMean", x, [2, 3], (n, c, 1, 1) if keep else (n, c), keepdims=int(keep))
    if kind == "FullAveragePool":  # a global pool spelled as a window (gap rewrites it)
        return b.tensor("AveragePool", [x.name], (n, c, 1, 1), kernel_shape=[h, w])
    (kh, sh, dh, pt, pb, oh), (kw, sw, dw, pl, pr, ow) = _window(b, h, True), _window(b, w, True)
    attrs = {"kernel_shape": [kh, kw], "strides": [sh, sw], "pads": [pt, pl, pb, pr]}
    if kind == "MaxPool":
        attrs["dilations"] = [dh, dw]
    else:  # AveragePool has dilations only from opset 19: recompute without them
        oh, ow = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
        attrs["count_include_pad"] = int(b.bool())
    return b.tensor(kind, [x.name], (n, c, oh, ow), **attrs)


# --- activations and elementwise -------------------------------------------------------------------------------

def activation(b: Builder, x: Tensor) -> Tensor:
    kind = b.pick(["Relu", "Sigmoid", "Tanh", "LeakyRelu", "Clip", "HardSigmoid", "gelu", "hardswish", "silu",
                   "Softmax", "HardSwish"])
    if kind == "HardSwish" and b.opset < 14:
        kind = "hardswish"
    if kind == "LeakyRelu":
        return b.tensor(kind, [x.name], x.shape, alpha=b.pick([0.01, 0.1, 0.2]))
    if kind == "HardSigmoid":
        return b.tensor(kind, [x.name], x.shape, **b.pick([{}, {"alpha": 1 / 6, "beta": 0.5}]))
    if kind == "Softmax":
        return b.tensor(kind, [x.name], x.shape, axis=-1)
    if kind == "Clip":  # min/max are optional inputs since opset 11: both, either, or none
        bounds = b.pick([(0.0, 6.0), (-1.0, 1.0), (0.0, None), (None, 1.0), (None, None)])
        inputs = [x.name] + ["" if v is None else b.scalar(v) for v in bounds]
        while inputs[-1] == "":
            inputs.pop()
        return b.tensor(kind, inputs, x.shape)
    if kind == "gelu":  # PyTorch's export: ((Erf(x / sqrt 2) + 1) * x) * 0.5, or x * 0.7071 instead of / sqrt 2
        div = b.pick([("Div", 1.4142135381698608), ("Mul", 0.7071067690849304)])
        e = b.tensor("Erf", [b.tensor(div[0], [x.name, b.scalar(div[1])], x.shape).name], x.shape)
        one = b.tensor("Add", [e.name, b.scalar(1.0)], x.shape)
        return b.tensor("Mul", [b.tensor("Mul", [x.name, one.name], x.shape).name, b.scalar(0.5)], x.shape)
    if kind == "hardswish":  # x * HardSigmoid(x) or x * Clip(x + 3, 0, 6) / 6
        if b.bool():
            hs = b.tensor("HardSigmoid", [x.name], x.shape, alpha=1 / 6, beta=0.5)
            return b.tensor("Mul", [x.name, hs.name], x.shape)
        shifted = b.tensor("Add", [x.name, b.scalar(3.0)], x.shape)
        clipped = b.tensor("Clip", [shifted.name, b.scalar(0.0), b.scalar(6.0)], x.shape)
        return b.tensor("Div", [b.tensor("Mul", [x.name, clipped.name], x.shape).name, b.scalar(6.0)], x.shape)
    if kind == "silu":
        return b.tensor("Mul", [x.name, b.tensor("Sigmoid", [x.name], x.shape).name], x.shape)
    return b.tensor(kind, [x.name], x.shape)


def affine(b: Builder, x: Tensor) -> Tensor:
    """Add/Mul/Sub/Div with a per-channel, last-axis or scalar constant (Conv + Mul/Add is a fuse family)."""
    op = b.pick(["Mul", "Add", "Sub", "Div"])
    shape = b.pick(["channel", "last", "scalar"] if x.rank >= 3 else ["last", "scalar"])
    cshape = {"channel": [x.shape[1]] + [1] * (x.rank - 2), "last": [x.shape[-1]], "scalar": []}[shape]
    if shape == "channel" and b.bool():
        cshape = [1] + cshape
    const = b.values(cshape, 0.5, 1.5) if op in ("Mul", "Div") else b.weight(cshape, 4, "b")
    inputs = [x.name, const] if op in ("Sub", "Div") or b.bool() else [const, x.name]
    return b.tensor(op, inputs, x.shape)


def layernorm(b: Builder, x: Tensor) -> Tensor:
    """LayerNorm spelled out over the last axis (what fuse's layernorm family matches)."""
    mean = b.with_axes("ReduceMean", x, [-1], x.shape[:-1] + (1,), keepdims=1)
    d = b.tensor("Sub", [x.name, mean.name], x.shape)
    sq = b.tensor("Pow", [d.name, b.scalar(2.0)], x.shape) if b.bool() else b.tensor("Mul", [d.name, d.name], x.shape)
    var = b.with_axes("ReduceMean", sq, [-1], mean.shape, keepdims=1)
    std = b.tensor("Sqrt", [b.tensor("Add", [var.name, b.scalar(1e-5)], var.shape).name], var.shape)
    y = b.tensor("Div", [d.name, std.name], x.shape)
    f = x.shape[-1]
    y = b.tensor("Mul", [y.name, b.values([f], 0.5, 1.5, "gamma")], x.shape)
    return b.tensor("Add", [y.name, b.weight([f], 4, "beta")], x.shape)


# --- structure: residuals, concat, split ------------------------------------------------------------------------

def _same_shape_branch(b: Builder, x: Tensor) -> Tensor:
    if x.rank == 4:
        c, k = x.shape[1], b.pick([1, 3])
        return b.tensor("Conv", [x.name, b.weight([c, c, k, k], c * k * k)], x.shape, kernel_shape=[k, k],
                        pads=[k // 2] * 4)
    f = x.shape[-1]
    if x.rank == 2 and b.bool():
        return b.tensor("Gemm", [x.name, b.weight([f, f], f), b.weight([f], 4, "b")], x.shape)
    return b.tensor("MatMul", [x.name, b.weight([f, f], f)], x.shape)


def residual(b: Builder, x: Tensor) -> Tensor:
    """Add of two branches: x and a weight op on x (with an activation), or x and an earlier tensor of its shape."""
    partners = [t for t in b.pool[:-1] if t.shape == x.shape and t.name != x.name]
    if partners and b.bool():
        other = b.pick(partners)
    else:
        other = _same_shape_branch(b, x)
        if b.bool():
            other = activation(b, other)
    inputs = [x.name, other.name] if b.bool() else [other.name, x.name]
    return b.tensor(b.pick(["Add", "Add", "Mul"]), inputs, x.shape)


def _fits4(x: Tensor) -> bool:
    """A 4-D tensor the conv and pool families may take: every dim small."""
    return x.rank == 4 and max(x.shape[1:]) <= MAX_CHANNELS


def _square_weight_ok(x: Tensor) -> bool:
    """A same-shape weight op fits: a C×C conv on small 4-D, an F×F matmul on a short last axis."""
    return _fits4(x) if x.rank == 4 else 2 <= x.rank <= 3 and x.shape[-1] <= 64


Family = tuple[str, Callable[[Tensor], bool], Callable[[Builder, Tensor], Tensor]]

# name, applies to (the current tensor), build. The strategy picks among those that apply.
# Weight ops come first and twice: hypothesis favours early entries, and passes have nothing to do without them.
FAMILIES: list[Family] = [
    ("conv_block", lambda x: x.rank == 2 or _fits4(x), conv_block),
    ("conv", _fits4, conv),
    ("gemm", lambda x: x.rank == 2, gemm),
    ("matmul", lambda x: 2 <= x.rank <= 4, matmul),
    ("residual", _square_weight_ok, residual),
    ("activation", lambda x: True, activation),
    ("conv_block", lambda x: x.rank == 2 or _fits4(x), conv_block),
    ("conv", _fits4, conv),
    ("gemm", lambda x: x.rank == 2, gemm),
    ("matmul", lambda x: 2 <= x.rank <= 4, matmul),
    ("batchnorm", lambda x: 2 <= x.rank <= 4, batchnorm),
    ("conv_transpose", _fits4, conv_transpose),
    ("pool", _fits4, pool),
    ("affine", lambda x: True, affine),
    ("if", _square_weight_ok, if_branch),
    ("concat", lambda x: MAX_CHANNELS > x.shape[1 if x.rank == 4 else -1] or bool(self_concat_axes(x)), concat),
    ("split", lambda x: any(d >= 2 for d in x.shape[1:]), split),
    ("slice", lambda x: any(d >= 2 for d in x.shape[1:]), slice_),
    ("reshape", lambda x: True, reshape),
    ("transpose", lambda x: x.rank >= 3, transpose),
    ("flatten", lambda x: x.rank >= 3, flatten),
    ("unsqueeze", lambda x: x.rank <= 2 or (x.rank == 3 and max(x.shape[1:]) <= MAX_CHANNELS), unsqueeze),
    ("squeeze", lambda x: x.rank >= 3 and 1 in x.shape[1:], squeeze),
    # width 1 normalizes to beta; onnxruntime 1.23 fuses it into a LayerNormalization that refuses to run
    ("layernorm", lambda x: x.rank in (2, 3) and x.shape[-1] > 1, layernorm),
]
