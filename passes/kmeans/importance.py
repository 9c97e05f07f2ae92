"""kmeans with ``data_aware``: how much each weight element matters, from the layer's input on calibration data.

An element's clustering error is weighted by the mean square of the input channel it multiplies
(E[x_c²]), so centroids serve the layer's outputs rather than the weights themselves. An embedding table is a
weight met by a one-hot input: the mean square of row r's channel is the share of gathered positions that read
row r. A calibration set covers a small part of a vocabulary, so that share is mixed half and half with a
uniform one (1/rows): rows it never reads still count.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.capture import stream
from graphopt.errors import GraphoptError
from graphopt.graphs import attr, input_channel_axis
from graphopt.weight_targets import Target


def importance_of(target: Target, mean_square: np.ndarray) -> np.ndarray:
    """Per-element error weights: the mean square of the input channel each weight element multiplies."""
    w = target.array
    in_axis = target.in_axis % w.ndim
    h = np.asarray(mean_square, np.float64).reshape(-1)
    if target.node.op_type == "Conv":
        group = int(attr(target.node, "group", 1))
        per = w.shape[1]
        out_per = w.shape[0] // group
        h = h.reshape(group, per)[np.arange(w.shape[0]) // out_per]  # [O, C/g]
        return np.broadcast_to(h.reshape(h.shape + (1,) * (w.ndim - 2)), w.shape)
    if h.size != w.shape[in_axis]:
        raise GraphoptError(f"pass 'kmeans': layer {target.layer!r}: {h.size} input channels measured, "
                            f"weight has {w.shape[in_axis]}")
    shape = [1] * w.ndim
    shape[in_axis] = h.size
    return np.broadcast_to(h.reshape(shape), w.shape)


def input_mean_squares(context, model: ir.Model, targets: list[Target], max_samples: int) -> dict[str, np.ndarray]:
    """Mean square of each layer's input activation per input channel, over calibration samples."""
    calib = context.require_calib("kmeans")
    wanted = {}
    for t in targets:
        if t.node.graph is not model.graph:  # capture reads main-graph values only
            continue
        if t.table:
            ids = t.node.inputs[1]
            if ids is not None and ids.name:
                wanted[t.layer] = (ids.name, None)
            continue
        x = t.node.inputs[1 - t.index if t.node.op_type == "MatMul" else 0]
        if x is not None and x.name:
            wanted[t.layer] = (x.name, input_channel_axis(t.node, t.index))
    rows = {t.layer: t.array.shape[t.in_axis] for t in targets if t.table}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    names = sorted({name for name, _ in wanted.values()})
    for acts in stream(model, names, calib, threads=context.threads, max_samples=max_samples):
        for layer, (name, axis) in wanted.items():
            if axis is None:  # a table's indices: how often each row is read (negative indices count from the end)
                ids = np.asarray(acts[name]).reshape(-1).astype(np.int64)
                ids = np.where(ids < 0, ids + rows[layer], ids)
                sums[layer] = sums.get(layer, 0) + np.bincount(ids, minlength=rows[layer])[:rows[layer]]
                counts[layer] = counts.get(layer, 0) + ids.size
                continue
            x = np.moveaxis(np.asarray(acts[name], np.float64), axis, 0)
            x = x.reshape(x.shape[0], -1)
            sums[layer] = sums.get(layer, 0) + np.einsum("ij,ij->i", x, x)
            counts[layer] = counts.get(layer, 0) + x.shape[1]
    out = {layer: sums[layer] / max(counts[layer], 1) for layer in sums}
    for layer, n in rows.items():
        if layer in out:
            out[layer] = 0.5 * out[layer] / max(out[layer].sum(), 1e-30) + 0.5 / n
    return out
