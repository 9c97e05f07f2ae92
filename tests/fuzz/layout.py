"""Layout op families: Concat, Split, Slice, Reshape, Transpose, Flatten, Squeeze, Unsqueeze (families.py
registers them). Each keeps the batch on axis 0 and works on the other axes only."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st

from tests.fuzz.builder import BATCH, MAX_CHANNELS, MAX_SPATIAL, Builder, Tensor

INT64_MAX = np.iinfo(np.int64).max


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def self_concat_axes(x: Tensor) -> list[int]:
    """Axes along which x may be concatenated with itself and stay small."""
    return [a for a in range(1, x.rank) if 2 * x.shape[a] <= MAX_CHANNELS] if x.size <= 1024 else []


def concat(b: Builder, x: Tensor) -> Tensor:
    """Concat along the channel (or last) axis with a 1×1 conv / matmul branch, or along an axis with x itself."""
    axis = 1 if x.rank == 4 else x.rank - 1
    room = MAX_CHANNELS - x.shape[axis]
    if room >= 1 and (not self_concat_axes(x) or b.bool()):
        m = b.int(1, room)
        if x.rank == 4:
            other = b.tensor("Conv", [x.name, b.weight([m, x.shape[1], 1, 1], x.shape[1])],
                             (BATCH, m, *x.shape[2:]), kernel_shape=[1, 1])
        else:
            other = b.tensor("MatMul", [x.name, b.weight([x.shape[-1], m], x.shape[-1])], x.shape[:-1] + (m,))
        parts = [x, other] if b.bool() else [other, x]
    else:
        axis = b.pick(self_concat_axes(x))
        parts = [x, x]
    shape = list(x.shape)
    shape[axis] = sum(p.shape[axis] for p in parts)
    written_axis = axis - x.rank if b.bool() else axis  # negative axes are valid from opset 11
    return b.tensor("Concat", [p.name for p in parts], tuple(shape), axis=written_axis)


def split(b: Builder, x: Tensor) -> Tensor:
    axes = [a for a in range(1, x.rank) if x.shape[a] >= 2]
    axis = b.pick(axes)
    size = x.shape[axis]
    count = b.int(2, min(3, size))
    if size % count == 0 and b.bool():
        sizes = [size // count] * count
    else:  # count - 1 distinct cut points: any composition of size into count positive parts
        cuts = sorted(b.draw(st.permutations(range(1, size)))[:count - 1])
        sizes = [e - s for s, e in zip([0] + cuts, cuts + [size])]
    parts = b.split(x, axis, sizes)
    mode = b.pick(["continue", "concat_back", "outputs"])
    if mode == "concat_back":  # reversed order: a channel shuffle of sorts
        return b.tensor("Concat", [p.name for p in reversed(parts)], x.shape, axis=axis)
    keep = b.pick(range(len(parts)))
    for i, part in enumerate(parts):
        if i != keep and (mode == "outputs" or b.bool()):
            b.side_outputs.append(part)
    return parts[keep]


# --- data movement -----------------------------------------------------------------------------------------------

def slice_(b: Builder, x: Tensor) -> Tensor:
    axis = b.pick([a for a in range(1, x.rank) if x.shape[a] >= 2])
    size = x.shape[axis]
    start = b.int(0, size - 1)
    end = b.int(start + 1, size)
    step = b.pick([1, 2])
    shape = list(x.shape)
    shape[axis] = math.ceil((end - start) / step)
    starts = start - size if b.bool() else start
    ends = INT64_MAX if end == size and b.bool() else end
    axes = axis - x.rank if b.bool() else axis
    inputs = [x.name, b.ints([starts]), b.ints([ends]), b.ints([axes])]
    if step != 1 or b.bool():
        inputs.append(b.ints([step]))
    return b.tensor("Slice", inputs, tuple(shape))


def reshape(b: Builder, x: Tensor) -> Tensor:
    rest = x.shape[1:]
    total = math.prod(rest)
    options = [("flat0", (0, -1), (BATCH, total)), ("flat-1", (-1, total), (BATCH, total))]
    if x.rank == 4:
        options.append(("merge_hw", (0, rest[0], -1), (BATCH, rest[0], rest[1] * rest[2])))
    if x.rank <= 3:
        a = b.pick(divisors(total))
        options.append(("to3", (0, a, total // a), (BATCH, a, total // a)))
        c = b.pick(divisors(total))
        h = b.pick(divisors(total // c))
        if c <= MAX_CHANNELS and max(h, total // c // h) <= MAX_SPATIAL:
            options.append(("to4", (0, c, h, -1), (BATCH, c, h, total // c // h)))
    _, target, shape = b.pick(options)
    return b.tensor("Reshape", [x.name, b.ints(target)], shape)


def transpose(b: Builder, x: Tensor) -> Tensor:
    perm = [0] + list(b.draw(st.permutations(range(1, x.rank))))
    return b.tensor("Transpose", [x.name], tuple(x.shape[p] for p in perm), perm=perm)


def flatten(b: Builder, x: Tensor) -> Tensor:
    return b.tensor("Flatten", [x.name], (BATCH, math.prod(x.shape[1:])), axis=b.pick([1, 1 - x.rank]))


def unsqueeze(b: Builder, x: Tensor) -> Tensor:
    axis = b.int(1, x.rank)
    shape = x.shape[:axis] + (1,) + x.shape[axis:]
    written = axis - (x.rank + 1) if b.bool() else axis
    return b.with_axes("Unsqueeze", x, [written], shape)


def squeeze(b: Builder, x: Tensor) -> Tensor:
    ones = [a for a in range(1, x.rank) if x.shape[a] == 1]
    all_ok = len(ones) < x.rank - 1  # keep at least one non-batch axis
    axes = ones if all_ok and b.bool() else [b.pick(ones)]
    shape = tuple(d for a, d in enumerate(x.shape) if a not in axes)
    return b.with_axes("Squeeze", x, axes, shape)
