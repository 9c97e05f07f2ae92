"""A linear layer seen as one matrix: y_rows = x_rows @ W + b, for Gemm, MatMul and Conv (groups=1).

Every data-aware pass (refits, data-aware low-rank, channel repair) works on this view, so Conv and Gemm share
one path: a Conv's input is unfolded (im2col) into rows of (c, k1, k2, ...) patches and its weight
W[o, c, k1, k2] becomes a [(c, k1, k2), o] matrix.

Conventions (documented choices):
- Gemm: transA=1 is not supported (``as_linear`` returns None). alpha and beta are folded into the view:
  ``matrix()`` is alpha·B' and ``bias_vector()`` is beta·C; ``set_matrix`` writes the view back and sets
  alpha = beta = 1. A C that is not a per-output vector (e.g. [M, N]) → None.
- MatMul: constant rank-2 weight on the right; the left input may have any rank (rows = leading dims
  flattened). A following Add of a constant [d_out] (or [1, d_out]) vector that is the MatMul's only consumer
  is taken as the layer's bias; then ``output`` is the Add's output. ``set_matrix`` with a bias on a MatMul
  that has none inserts such an Add.
- Conv: any number of spatial dims, strides/pads/dilations/auto_pad; groups > 1 → None.
- Weights must be plain float initializers; compressed forms (weights.encoding_of) → None. Sparse-storage
  marks are kept when writing back.
- ``set_matrix`` writes new tensors (same dtype), into private copies when an initializer is shared. A matrix of
  a different shape is allowed (shapes follow it), but downstream value shapes are not updated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphopt.errors import GraphoptError
from graphopt.graphs import attr as _attr, is_default_domain
from graphopt.weights import constant_array, encoding_of, set_initializer, write_input

_FLOAT_KINDS = "f"


def _float_const(value: ir.Value | None) -> np.ndarray | None:
    array = constant_array(value)
    if array is None or encoding_of(value) is not None or array.dtype.kind not in _FLOAT_KINDS:
        return None
    return array


@dataclass
class LinearLayer:
    node: ir.Node
    kind: str  # "gemm" | "matmul" | "conv"
    weight: ir.Value
    bias: ir.Value | None
    bias_node: ir.Node | None = None  # matmul only: the Add that carries the bias
    # conv geometry (spatial dims only); empty for gemm/matmul
    strides: tuple[int, ...] = field(default=())
    dilations: tuple[int, ...] = field(default=())
    pads: tuple[int, ...] = field(default=())  # begins then ends, as in ONNX
    auto_pad: str = "NOTSET"

    # --- shapes ------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """Key of the layer in result dicts: the node's name, else its output's name."""
        return self.node.name or self.node.outputs[0].name or f"{self.node.op_type}@{id(self.node)}"

    @property
    def input(self) -> ir.Value:
        return self.node.inputs[0]

    @property
    def output(self) -> ir.Value:
        """The layer's output value (after the bias Add for a matmul with a bias)."""
        return (self.bias_node or self.node).outputs[0]

    def _weight_array(self) -> np.ndarray:
        array = constant_array(self.weight)
        if array is None:
            raise GraphoptError(f"layer {self.name!r}: weight {self.weight.name!r} is no longer a constant")
        return array

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self._weight_array().shape[2:]) if self.kind == "conv" else ()

    @property
    def in_channels(self) -> int:
        shape = self._weight_array().shape
        return shape[1] if self.kind == "conv" else self.d_in

    @property
    def d_in(self) -> int:
        shape = self._weight_array().shape
        if self.kind == "conv":
            return int(np.prod(shape[1:]))
        if self.kind == "gemm" and _attr(self.node, "transB", 0):
            return shape[1]
        return shape[0]

    @property
    def d_out(self) -> int:
        shape = self._weight_array().shape
        if self.kind == "conv":
            return shape[0]
        if self.kind == "gemm" and _attr(self.node, "transB", 0):
            return shape[0]
        return shape[1]

    def input_columns(self, channels: np.ndarray | list[int]) -> np.ndarray:
        """Rows of ``matrix()`` that belong to the given input channels (conv: all their kernel taps)."""
        channels = np.asarray(channels, dtype=np.int64)
        if self.kind != "conv":
            return channels
        taps = int(np.prod(self.kernel))
        return (channels[:, None] * taps + np.arange(taps)[None, :]).reshape(-1)

    # --- the matrix view ---------------------------------------------------------------------------------
    def view(self, array: np.ndarray) -> np.ndarray:
        """An array shaped like the weight, laid out as ``matrix()`` lays the weight out: [d_in, d_out] (a view,
        alpha not applied). kmeans' refit reads the codes of a weight this way."""
        if self.kind == "conv":
            return array.reshape(array.shape[0], -1).T
        if self.kind == "gemm" and _attr(self.node, "transB", 0):
            return array.T
        return array

    @property
    def alpha(self) -> float:
        """The scale ``matrix()`` applies to ``view()`` of the weight: a Gemm's alpha, else 1."""
        return float(_attr(self.node, "alpha", 1.0)) if self.kind == "gemm" else 1.0

    def matrix(self) -> np.ndarray:
        """W as [d_in, d_out] float64 so that y_rows = unfold(x) @ W + b."""
        w = self.view(self._weight_array().astype(np.float64))
        if self.kind == "gemm":
            return self.alpha * w
        return w.copy()

    def bias_vector(self) -> np.ndarray:
        """[d_out] float64; zeros if the layer has no bias."""
        b = constant_array(self.bias)
        if b is None:
            return np.zeros(self.d_out)
        b = np.broadcast_to(b.astype(np.float64).reshape(-1), (self.d_out,)).copy()
        if self.kind == "gemm":
            b *= float(_attr(self.node, "beta", 1.0))
        return b

    def set_matrix(self, w: np.ndarray, b: np.ndarray | None = None) -> None:
        """Write W [d_in, d_out] (and b [d_out]; None keeps the current bias) back into the layer."""
        w = np.asarray(w, dtype=np.float64)
        if w.ndim != 2:
            raise GraphoptError(f"layer {self.name!r}: set_matrix needs a 2-D matrix, got shape {w.shape}")
        old = self._weight_array()
        dtype = old.dtype
        if b is None and self.bias is not None:
            b = self.bias_vector()  # rewritten so that beta can be reset to 1
        if self.kind == "conv":
            taps = int(np.prod(old.shape[2:]))
            if w.shape[0] % taps:
                raise GraphoptError(f"layer {self.name!r}: {w.shape[0]} rows is not a multiple of the "
                                    f"kernel size {taps}")
            array = w.T.reshape(w.shape[1], w.shape[0] // taps, *old.shape[2:])
        elif self.kind == "gemm" and _attr(self.node, "transB", 0):
            array = w.T
        else:
            array = w
        self.weight = _write(self.node, 1, self.weight, np.ascontiguousarray(array).astype(dtype))
        if self.kind == "gemm":
            self.node.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0)
            self.node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        if b is None:
            return
        b = np.asarray(b, dtype=np.float64).reshape(-1)
        if b.size != w.shape[1]:
            raise GraphoptError(f"layer {self.name!r}: bias has {b.size} entries, the matrix {w.shape[1]} outputs")
        old_b = constant_array(self.bias)
        shape = old_b.shape if old_b is not None and old_b.size == b.size else (b.size,)
        bias = b.reshape(shape).astype(dtype)
        if self.bias is not None:
            owner = self.bias_node or self.node
            index = list(owner.inputs).index(self.bias)
            self.bias = _write(owner, index, self.bias, bias)
        elif self.kind == "matmul":
            self._insert_bias_add(bias)
        else:
            graph = _graph_of(self.node)
            self.bias = set_initializer(graph, f"{self.weight.name}_bias", bias)
            if len(self.node.inputs) < 3:
                self.node.resize_inputs(3)
            self.node.replace_input_with(2, self.bias)

    def _insert_bias_add(self, bias: np.ndarray) -> None:
        graph = _graph_of(self.node)
        out = self.node.outputs[0]
        self.bias = set_initializer(graph, f"{self.weight.name}_bias", bias)
        add = ir.Node("", "Add", [out, self.bias], name=f"{self.node.name or out.name}_bias")
        new_out = add.outputs[0]
        new_out.type, new_out.shape = out.type, out.shape
        was_output = out.is_graph_output()
        out.replace_all_uses_with(new_out, replace_graph_outputs=True)
        add.replace_input_with(0, out)  # replace_all_uses_with rewired the Add's own input as well
        name = out.name
        if was_output:  # the graph output keeps its name
            out.name, new_out.name = f"{name}_nobias", name
        else:
            new_out.name = f"{name}_biased"
        graph.insert_after(self.node, add)
        self.bias_node = add


def _graph_of(node: ir.Node) -> ir.Graph:
    graph = node.graph
    if not isinstance(graph, ir.Graph):
        raise GraphoptError(f"node {node.name!r} is not in a graph")
    return graph


def _write(node: ir.Node, index: int, value: ir.Value, array: np.ndarray) -> ir.Value:
    """Give ``node``'s input ``index`` (``value``) new contents; a private copy when the initializer is shared."""
    assert node.inputs[index] is value
    return write_input(node, index, array)


# --- recognising layers --------------------------------------------------------------------------------


def _matmul_bias(node: ir.Node, d_out: int) -> tuple[ir.Node, ir.Value] | None:
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return None
    add = uses[0].node
    if add.op_type != "Add" or not is_default_domain(add) or len(add.inputs) != 2:
        return None
    other = add.inputs[1 - uses[0].idx]
    array = _float_const(other)
    if array is None or array.shape not in ((d_out,), (1, d_out)):
        return None
    return add, other


def as_linear(node: ir.Node) -> LinearLayer | None:
    """The node as a linear layer, or None if it is not a supported op with a constant, plain float weight."""
    if not is_default_domain(node) or len(node.inputs) < 2 or node.inputs[0] is None:
        return None
    weight = node.inputs[1]
    w = _float_const(weight)
    if w is None:
        return None
    op = node.op_type
    if op == "Gemm":
        if w.ndim != 2 or _attr(node, "transA", 0) or float(_attr(node, "alpha", 1.0)) == 0.0:
            return None
        d_out = w.shape[0] if _attr(node, "transB", 0) else w.shape[1]
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None:
            b = _float_const(bias)
            if b is None or b.size not in (1, d_out) or (b.ndim == 2 and b.shape[0] != 1) or b.ndim > 2:
                return None
        return LinearLayer(node, "gemm", weight, bias)
    if op == "MatMul":
        if w.ndim != 2:
            return None
        found = _matmul_bias(node, w.shape[1])
        return LinearLayer(node, "matmul", weight, found[1] if found else None, found[0] if found else None)
    if op == "Conv":
        if w.ndim < 3 or int(_attr(node, "group", 1)) != 1:
            return None
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None and (_float_const(bias) is None or _float_const(bias).size != w.shape[0]):
            return None
        nsp = w.ndim - 2
        kshape = tuple(_attr(node, "kernel_shape", w.shape[2:]))
        if kshape != tuple(w.shape[2:]):
            return None
        auto_pad = _attr(node, "auto_pad", "NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        return LinearLayer(node, "conv", weight, bias,
                           strides=tuple(_attr(node, "strides", (1,) * nsp)),
                           dilations=tuple(_attr(node, "dilations", (1,) * nsp)),
                           pads=tuple(_attr(node, "pads", (0,) * (2 * nsp))), auto_pad=auto_pad)
    return None


# --- activations as rows -------------------------------------------------------------------------------


def _conv_pads(layer: LinearLayer, spatial: tuple[int, ...]) -> list[tuple[int, int]]:
    kernel = layer.kernel
    if layer.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for size, k, s, d in zip(spatial, kernel, layer.strides, layer.dilations):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            pads.append((small, large) if layer.auto_pad == "SAME_UPPER" else (large, small))
        return pads
    if layer.auto_pad == "VALID":
        return [(0, 0)] * len(spatial)
    n = len(spatial)
    return [(layer.pads[i], layer.pads[i + n]) for i in range(n)]


def _conv_windows(x: np.ndarray, layer: LinearLayer) -> np.ndarray:
    """A strided view [N, C, *out, *kernel] of the padded input (no copy of the patches)."""
    nsp = len(layer.kernel)
    if x.ndim != nsp + 2:
        raise GraphoptError(f"layer {layer.name!r}: conv input has rank {x.ndim}, expected {nsp + 2}")
    pads = _conv_pads(layer, tuple(x.shape[2:]))
    if any(p for pair in pads for p in pair):
        x = np.pad(x, [(0, 0), (0, 0), *pads])
    extent = tuple((k - 1) * d + 1 for k, d in zip(layer.kernel, layer.dilations))
    view = np.lib.stride_tricks.sliding_window_view(x, extent, axis=tuple(range(2, 2 + nsp)))
    index = (slice(None), slice(None), *(slice(None, None, s) for s in layer.strides),
             *(slice(None, None, d) for d in layer.dilations))
    return view[index]


def num_rows(x: np.ndarray, layer: LinearLayer) -> int:
    """How many rows ``unfold(x, layer)`` has (without building them)."""
    if layer.kind == "conv":
        shape = _conv_windows(x, layer).shape
        return shape[0] * int(np.prod(shape[2 : 2 + len(layer.kernel)]))
    return x.size // layer.d_in


def unfold(x: np.ndarray, layer: LinearLayer, rows: np.ndarray | None = None) -> np.ndarray:
    """Layer input activation -> rows [n_rows, d_in] (conv: im2col, row order (n, *out_spatial)).

    ``rows``: indices of the rows to keep (subsampling before the patches are copied)."""
    if layer.kind != "conv":
        flat = x.reshape(-1, layer.d_in)
        return flat if rows is None else flat[rows]
    windows = _conv_windows(x, layer)
    nsp = len(layer.kernel)
    n, out = windows.shape[0], windows.shape[2 : 2 + nsp]
    if rows is None:
        perm = (0, *range(2, 2 + nsp), 1, *range(2 + nsp, 2 + 2 * nsp))
        return windows.transpose(perm).reshape(n * int(np.prod(out)), -1)
    coords = np.unravel_index(np.asarray(rows), (n, *out))
    picked = windows[(coords[0], slice(None), *coords[1:])]  # advanced indices first: [R, C, *kernel]
    return picked.reshape(len(rows), -1)


def fold_output(y: np.ndarray, layer: LinearLayer, rows: np.ndarray | None = None) -> np.ndarray:
    """Layer output activation -> rows [n_rows, d_out] (conv: NCHW -> [(N, H, W), O])."""
    if layer.kind == "conv":
        flat = np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
    else:
        flat = y.reshape(-1, y.shape[-1])
    return flat if rows is None else flat[rows]


def linear_layers(graph: ir.Graph) -> list[LinearLayer]:
    """Every supported linear layer of one graph, in graph order."""
    return [layer for node in graph if (layer := as_linear(node)) is not None]
