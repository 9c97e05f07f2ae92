"""The graph builder the op families write into: tensors with shapes we compute ourselves (so every op is chosen
valid for its input, nothing is generated and then filtered), seeded weights, and the opset-dependent spellings
of Split/Squeeze/Unsqueeze/ReduceMean (attribute before 13 or 18, input after).

Decisions go through hypothesis (``self.draw``), so a failing model shrinks op by op; weight values come from a
numpy generator seeded by a hypothesis-drawn seed, so they shrink as one number."""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Sequence

import numpy as np
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

BATCH = "N"  # the batch dimension in our own shapes (declared as "N" or as the fixed batch size)
MAX_CHANNELS = 16
MAX_SPATIAL = 12
# How exporters name things: node names unique or empty (onnxruntime refuses repeated ones), and value names
# plain or with the separators real exporters write (PyTorch's "/blk/Relu_output_0", TensorFlow's ":0").
NODE_NAMES = ("unique", "empty")
VALUE_NAMES = {"plain": "{}", "torch": "/blk/{}_output_0", "tf": "model/{}:0", "onnx": "onnx::{}.1"}


@dataclasses.dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple  # ints, with BATCH where the batch dimension is (axis 0 except inside a transposed Gemm)

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        """Elements per sample."""
        return math.prod(d for d in self.shape if d != BATCH)


class Builder:
    """Nodes, initializers and side outputs of one graph (``sub()`` gives an If body its own)."""

    def __init__(self, draw: Any, opset: int, rng: np.random.Generator, naming: tuple[str, str], batch: int | None,
                 root_input: Tensor, parent: Builder | None = None) -> None:
        self.draw, self.opset, self.rng, self.batch = draw, opset, rng, batch
        self.naming = naming  # (NODE_NAMES entry, VALUE_NAMES entry)
        self.root_input = root_input  # the graph input (If conditions read it)
        self.parent = parent
        self.nodes: list = []
        self.inits: dict[str, np.ndarray] = {}
        self.pool: list[Tensor] = []  # tensors produced so far: residual and concat partners
        self.side_outputs: list[Tensor] = []
        self._counter = parent._counter if parent is not None else collections.Counter()

    def sub(self) -> Builder:
        return Builder(self.draw, self.opset, self.rng, self.naming, self.batch, self.root_input, parent=self)

    # --- drawing ----------------------------------------------------------------------------------------------
    def int(self, low: int, high: int) -> int:
        return self.draw(st.integers(low, max(low, high)))

    def bool(self) -> bool:
        return self.draw(st.booleans())

    def pick(self, options: Sequence[Any]) -> Any:
        """One of ``options``; hypothesis shrinks towards the first, so put the plainest first."""
        return self.draw(st.sampled_from(list(options)))

    # --- names, nodes, constants ----------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        self._counter[hint] += 1
        return VALUE_NAMES[self.naming[1]].format(f"{hint}{self._counter[hint]}")

    def node(self, op: str, inputs: Sequence[str], outputs: Sequence[str] | int = 1, **attrs: Any) -> list[str]:
        """Append one node; ``outputs`` may be a count of fresh names. Returns the output names."""
        if isinstance(outputs, int):
            outputs = [self.fresh("t") for _ in range(outputs)]
        name = self.fresh(op.lower() + "_") if self.naming[0] == "unique" else ""
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs), name=name, **attrs))
        return list(outputs)

    def tensor(self, op: str, inputs: Sequence[str], shape: tuple, **attrs: Any) -> Tensor:
        """One node with one output of the given shape, added to the pool."""
        out = Tensor(self.node(op, inputs, 1, **attrs)[0], tuple(shape))
        self.pool.append(out)
        return out

    def const(self, array: np.ndarray, hint: str = "c") -> str:
        """A constant: an initializer (the plain form), a Constant node with a tensor, or (opset >= 12, for
        scalars and 1-D arrays) a Constant with value_float(s)/value_int(s). In an If body the weight may also
        live in the outer graph's initializers (outer-scope reference)."""
        array = np.asarray(array)
        forms = ["init", "constant"]
        if self.opset >= 12 and array.ndim <= 1 and array.dtype in (np.float32, np.int64):
            forms.append("constant_list")
        if self.parent is not None:
            forms.append("outer_init")
        form = self.pick(forms)
        name = self.fresh(hint)
        if form == "init":
            self.inits[name] = array
        elif form == "outer_init":
            root = self.parent
            while root.parent is not None:
                root = root.parent
            root.inits[name] = array
        elif form == "constant":
            self.node("Constant", [], [name], value=numpy_helper.from_array(array, name))
        else:
            scalar = array.ndim == 0
            key = ("value_float" if scalar else "value_floats") if array.dtype == np.float32 else \
                ("value_int" if scalar else "value_ints")
            value = array.item() if scalar else array.tolist()
            self.node("Constant", [], [name], **{key: value})
        return name

    def weight(self, shape: Sequence[int], fan_in: int, hint: str = "w") -> str:
        """Normal weights scaled by 1/sqrt(fan_in): activations stay near unit scale through a dozen layers."""
        w = self.rng.standard_normal(tuple(shape)).astype(np.float32) / np.float32(np.sqrt(max(fan_in, 1)))
        return self.const(w, hint)

    def values(self, shape: Sequence[int], low: float, high: float, hint: str = "p") -> str:
        return self.const(self.rng.uniform(low, high, tuple(shape)).astype(np.float32), hint)

    def scalar(self, value: float) -> str:
        return self.const(np.array(value, np.float32), "s")

    def ints(self, values: Sequence[int]) -> str:
        return self.const(np.array(list(values), np.int64), "i")

    def graph(self, name: str, inputs: list, outputs: list[Tensor], with_shapes: bool = True):
        return helper.make_graph(self.nodes, name, inputs, [value_info(t, self.batch, with_shapes) for t in outputs],
                                 [numpy_helper.from_array(a, n) for n, a in self.inits.items()])

    def if_node(self, cond: Tensor, then_b: Builder, y: Tensor, else_b: Builder, z: Tensor) -> Tensor:
        """If(cond): then_b's graph yields y, else_b's yields z (same shape)."""
        return self.tensor("If", [cond.name], y.shape, then_branch=then_b.graph(self.fresh("then"), [], [y]),
                           else_branch=else_b.graph(self.fresh("else"), [], [z]))

    # --- opset-dependent spellings --------------------------------------------------------------------------
    def with_axes(self, op: str, x: Tensor, axes: Sequence[int], shape: tuple, **attrs: Any) -> Tensor:
        """Squeeze/Unsqueeze (axes an input from 13) and ReduceMean (from 18); ``axes=[]`` reduces all axes."""
        as_input = self.opset >= (18 if op.startswith("Reduce") else 13)
        if not axes:
            return self.tensor(op, [x.name], shape, **attrs)
        if as_input:
            return self.tensor(op, [x.name, self.ints(axes)], shape, **attrs)
        return self.tensor(op, [x.name], shape, axes=list(axes), **attrs)

    def split(self, x: Tensor, axis: int, sizes: list[int]) -> list[Tensor]:
        """Split into ``sizes`` along ``axis``: ``split`` attribute before 13, input from 13; equal parts may omit
        both (before 18) or use ``num_outputs`` (from 18)."""
        equal = len(set(sizes)) == 1
        forms = ["explicit"] + (["implicit"] if equal else [])
        form = self.pick(forms)
        attrs: dict[str, Any] = {"axis": axis}
        inputs = [x.name]
        if form == "explicit":
            if self.opset >= 13:
                inputs.append(self.ints(sizes))
            else:
                attrs["split"] = sizes
        elif self.opset >= 18:
            attrs["num_outputs"] = len(sizes)
        names = self.node("Split", inputs, len(sizes), **attrs)
        parts = []
        for name, size in zip(names, sizes):
            shape = list(x.shape)
            shape[axis] = size
            parts.append(Tensor(name, tuple(shape)))
        self.pool.extend(parts)
        return parts


def declared(shape: tuple, batch: int | None) -> list:
    """A shape as written in the model: the batch symbol, or the fixed batch size."""
    return [(BATCH if batch is None else batch) if d == BATCH else d for d in shape]


def concrete(shape: tuple, batch: int) -> tuple[int, ...]:
    return tuple(batch if d == BATCH else d for d in shape)


def value_info(t: Tensor, batch: int | None, with_shape: bool = True):
    """``with_shape=False``: the rank only, every dim unknown (the checker wants a shape on graph outputs)."""
    shape = declared(t.shape, batch) if with_shape else [None] * t.rank
    return helper.make_tensor_value_info(t.name, TensorProto.FLOAT, shape)
