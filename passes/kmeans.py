"""kmeans: weight sharing. A layer's weight becomes Gather(codebook, Cast(indices)).

Per layer (default) a float codebook of at most 2^bits centroids; per output channel a codebook [O, K] read
with per-row offsets, Gather(codebook, Add(Cast(indices), row·K)). Indices are uint8, or packed UINT4 when
bits ≤ 4 (the model's opset is raised to 21 for it). Exact zeros (from pruning) keep a reserved zero code and
do not pull centroids. bits=1 is sign × a scale per output channel (no zero code). With ``data_aware`` each
element's error is weighted by the mean square of its input channel on calibration data, so centroids serve
the layer outputs. onnxruntime constant-folds the Gather at load: run time equals the float model.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import ml_dtypes
import numpy as np
import onnx_ir as ir

from graphopt.errors import GraphoptError
from graphopt.options import BaseOptions, option
from graphopt.passbase import GraphoptPass, GraphoptResult
from graphopt.passes.kmeans1d import HIST_MIN_SIZE, INITS, kmeans1d, kmeans1d_hist
from graphopt.passes.prune import Target, find_targets
from graphopt.proto_handoff import ensure_opset
from graphopt.graphs import attr, input_channel_axis
from graphopt.weights import set_initializer

UINT4_OPSET = 21


@dataclasses.dataclass
class Codebook:
    """codebook [K] (per layer) or [O, K] (per channel, rows along ``out_axis``); indices shaped like w."""

    codebook: np.ndarray
    indices: np.ndarray  # uint8, values < K
    out_axis: int
    zero_code: bool

    @property
    def per_channel(self) -> bool:
        return self.codebook.ndim == 2

    def reconstruct(self) -> np.ndarray:
        if not self.per_channel:
            return self.codebook[self.indices.astype(np.int64)]
        idx = np.moveaxis(self.indices.astype(np.int64), self.out_axis, 0)
        rows = np.arange(idx.shape[0]).reshape((-1,) + (1,) * (idx.ndim - 1))
        return np.moveaxis(self.codebook[rows, idx], 0, self.out_axis)


def _cluster(values: np.ndarray, weights: np.ndarray | None, k: int, init: str, zero_code: bool,
             seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Centroids (code 0 = 0.0 when ``zero_code``) and uint8 codes shaped like ``values`` for one group.

    Large groups go through the histogram k-means: no sort, no full-size float64 or int64 copies."""
    if values.size > HIST_MIN_SIZE:
        cents, codes = kmeans1d_hist(values, k - int(zero_code), weights, init, seed=seed, zero_code=zero_code)
        return (np.concatenate([[0.0], cents]) if zero_code else cents), codes.astype(np.uint8, copy=False)
    flat = values.reshape(-1)
    flat_w = None if weights is None else weights.reshape(-1)
    if not zero_code:
        cents, labels = kmeans1d(flat, k, flat_w, init, seed=seed)
        return cents, labels.astype(np.uint8).reshape(values.shape)
    codes = np.zeros(flat.shape, np.uint8)
    nz = flat != 0
    cents, labels = kmeans1d(flat[nz], k - 1, None if flat_w is None else flat_w[nz], init, seed=seed)
    codes[nz] = labels + 1
    return np.concatenate([[0.0], cents]), codes.reshape(values.shape)


def quantize(w: np.ndarray, bits: int, init: str = "linear", importance: np.ndarray | None = None,
             per_channel: bool = False, out_axis: int = 0, seed: int = 0) -> Codebook:
    """Cluster ``w`` into a codebook of at most 2^bits values (importance: per-element error weights)."""
    k = 2 ** bits
    axis = out_axis % w.ndim
    if bits == 1:  # binary: sign × per-channel scale (weighted mean |w| minimizes the weighted error)
        rows = np.moveaxis(np.abs(w.astype(np.float64)), axis, 0).reshape(w.shape[axis], -1)
        h = np.ones_like(rows) if importance is None else np.moveaxis(importance, axis, 0).reshape(rows.shape)
        scale = (rows * h).sum(1) / np.maximum(h.sum(1), 1e-30)
        book = np.stack([-scale, scale], axis=1).astype(w.dtype)
        return Codebook(book, (w >= 0).astype(np.uint8), axis, False)
    zero_code = bool(np.any(w == 0))
    if not per_channel:
        cents, codes = _cluster(w, importance, k, init, zero_code, seed)
        return Codebook(cents.astype(w.dtype), codes, axis, zero_code)
    rows = np.moveaxis(w, axis, 0)  # float32 as is: kmeans1d widens only its sorted distinct values
    hrows = None if importance is None else np.moveaxis(importance, axis, 0)
    book = np.zeros((rows.shape[0], k), w.dtype)
    idx = np.zeros(rows.shape, np.uint8)
    for o in range(rows.shape[0]):
        cents, codes = _cluster(rows[o], None if hrows is None else hrows[o], k, init, zero_code, seed)
        book[o, :cents.size] = cents
        book[o, cents.size:] = cents[-1] if cents.size else 0  # unused codes: harmless filler
        idx[o] = codes
    return Codebook(book, np.moveaxis(idx, 0, axis), axis, zero_code)


def errors(w: np.ndarray, cb: Codebook, h: np.ndarray | None) -> tuple[float, float | None]:
    """(relative error, importance-weighted relative error) of the reconstruction, block by block.

    Float64 sums over blocks of output channels: never a full-size float64 or int64 copy of a big weight."""
    axis = cb.out_axis
    wr = np.moveaxis(w, axis, 0)
    ir_ = np.moveaxis(cb.indices, axis, 0)
    hr = None if h is None else np.moveaxis(h, axis, 0)
    step = max(1, (1 << 20) // max(1, w.size // max(1, wr.shape[0])))
    sums = np.zeros(4)  # Σd², Σw², Σh·d², Σh·w²
    for start in range(0, wr.shape[0], step):
        x = np.asarray(wr[start:start + step], np.float64)
        codes = ir_[start:start + step].astype(np.intp)
        if cb.per_channel:
            rows = np.arange(start, start + x.shape[0]).reshape((-1,) + (1,) * (x.ndim - 1))
            approx = cb.codebook[rows, codes]
        else:
            approx = cb.codebook[codes]
        d2 = (approx - x) ** 2
        x2 = x * x
        sums[:2] += d2.sum(), x2.sum()
        if hr is not None:
            hb = hr[start:start + step]
            sums[2:] += np.sum(hb * d2), np.sum(hb * x2)
    rel = float(np.sqrt(sums[0]) / (np.sqrt(sums[1]) or 1.0))
    return rel, (None if h is None else float(np.sqrt(sums[2] / (sums[3] or 1))))


def _codes_used(indices: np.ndarray) -> int:
    counts = np.zeros(256, np.int64)
    flat = indices.reshape(-1)
    for start in range(0, flat.size, 1 << 20):
        counts += np.bincount(flat[start:start + (1 << 20)], minlength=256)
    return int(np.count_nonzero(counts))


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
    from graphopt.capture import stream

    calib = context.require_calib("kmeans")
    wanted = {}
    for t in targets:
        if t.node.graph is not model.graph:  # capture reads main-graph values only
            continue
        x = t.node.inputs[1 - t.index if t.node.op_type == "MatMul" else 0]
        if x is not None and x.name:
            wanted[t.layer] = (x.name, input_channel_axis(t.node, t.index))
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    names = sorted({name for name, _ in wanted.values()})
    for acts in stream(model, names, calib, threads=context.threads, max_samples=max_samples):
        for layer, (name, axis) in wanted.items():
            x = np.moveaxis(np.asarray(acts[name], np.float64), axis, 0)
            x = x.reshape(x.shape[0], -1)
            sums[layer] = sums.get(layer, 0) + np.einsum("ij,ij->i", x, x)
            counts[layer] = counts.get(layer, 0) + x.shape[1]
    return {layer: sums[layer] / max(counts[layer], 1) for layer in sums}


class KMeans(GraphoptPass):
    """Share weights through a per-layer (or per-channel) codebook: weight = Gather(codebook, Cast(indices))."""

    name = "kmeans"
    summary = "weight sharing: k-means codebook of 2^bits values per layer/channel, uint8 or UINT4 indices"
    size_objective = True  # the Gather that decodes the codebook costs time

    @classmethod
    def needs_data(cls, options) -> str | None:
        return "data_aware weighs each weight by its input's activations" if options.data_aware else None

    @dataclasses.dataclass(frozen=True)
    class Options(BaseOptions):
        bits: int = option(4, "index bits: 2^bits codes (1 = sign × per-channel scale)", low=1, high=8)
        init: Literal["linear", "density", "kmeans++"] = option(
            "linear", "centroid initialization: linear over [min, max], density (quantiles), kmeans++",
            choices=INITS)
        per_channel: bool = option(False, "one codebook per output channel instead of per layer")
        data_aware: bool = option(
            False, "weight each element's error by its input channel's mean square on calibration data")
        uint4: bool = option(True, "store indices as packed UINT4 when bits <= 4 (raises the opset to 21)")
        skip_nodes: list[str] = option([], "node or weight names left alone")
        skip_ops: list[str] = option([], "op types left alone (Conv, ConvTranspose, Gemm, MatMul)")
        min_size: int = option(0, "layers with fewer weight elements are left alone", low=0)
        max_samples: int = option(128, "calibration samples for data_aware", low=1)
        seed: int = option(0, "seed of kmeans++ initialization")

    def call(self, model: ir.Model) -> GraphoptResult:
        opts = self.options
        notes: list[str] = []
        targets = find_targets(model, opts.skip_nodes, opts.skip_ops, opts.min_size, [], "shared")
        packed = False
        if targets and opts.bits <= 4 and opts.uint4:

            try:  # the upgrade rebuilds the graph, so the targets are found again afterwards
                raised = ensure_opset(model, UINT4_OPSET)
                packed = True
                if raised:
                    notes.append(f"opset raised from {raised[0]} to {raised[1]} for UINT4 indices")
            except GraphoptError as err:
                notes.append(f"UINT4 indices need opset {UINT4_OPSET} ({err}); uint8 indices used")
        targets = find_targets(model, opts.skip_nodes, opts.skip_ops, opts.min_size, notes, "shared")
        energy = input_mean_squares(self.context, model, targets, opts.max_samples) if opts.data_aware else {}

        rows = []
        for t in targets:
            h = importance_of(t, energy[t.layer]) if t.layer in energy else None
            if opts.data_aware and h is None:
                notes.append(f"{t.layer}: input activation not captured; plain k-means used")
            cb = quantize(t.array, opts.bits, opts.init, h, opts.per_channel or opts.bits == 1, t.out_axis, opts.seed)
            index_bytes = (t.array.size + 1) // 2 if packed else t.array.size
            new_bytes = index_bytes + cb.codebook.nbytes + (4 * cb.codebook.shape[0] if cb.per_channel else 0)
            if new_bytes >= t.array.nbytes:
                notes.append(f"{t.layer}: a codebook would not be smaller ({new_bytes} vs {t.array.nbytes} bytes); "
                             "left as it is")
                continue
            rel, weighted = errors(t.array, cb, h)
            row = {"layer": t.layer, "op": t.node.op_type, "weight": t.value.name, "elements": int(t.array.size),
                   "bits": opts.bits, "codes_used": _codes_used(cb.indices),
                   "codebook": list(cb.codebook.shape), "zero_code": cb.zero_code,
                   "indices": "uint4" if packed else "uint8", "bytes_before": int(t.array.nbytes),
                   "bytes_after": int(new_bytes), "rel_error": round(rel, 5)}
            if weighted is not None:
                row["weighted_rel_error"] = round(weighted, 5)
            self._rewrite(t, cb, packed)
            rows.append(row)
        if rows:
            before = sum(r["bytes_before"] for r in rows)
            after = sum(r["bytes_after"] for r in rows)
            notes.append(f"{len(rows)} layer(s) shared: weights {before} -> {after} bytes ({before / after:.1f}x)")
        return self.result(model, rows, notes)

    def _rewrite(self, t: Target, cb: Codebook, packed: bool) -> None:
        """weight input of the node ← Gather(codebook, Cast(indices)) [+ row offsets when per channel]."""
        graph = t.node.graph
        base = t.value.name or t.layer
        idx = cb.indices.astype(ml_dtypes.uint4) if packed else cb.indices
        indices = set_initializer(graph, f"{base}_indices", idx)
        book = set_initializer(graph, f"{base}_codebook", cb.codebook.reshape(-1))
        cast = self.mark(ir.node("Cast", [indices], {"to": ir.DataType.INT32}, name=f"{t.layer}_kmeans_cast"))
        new_nodes = [cast]
        codes = cast.outputs[0]
        if cb.per_channel:
            k = cb.codebook.shape[1]
            shape = [1] * cb.indices.ndim
            shape[cb.out_axis] = cb.codebook.shape[0]
            offsets = set_initializer(graph, f"{base}_row_offsets",
                                      (np.arange(cb.codebook.shape[0], dtype=np.int32) * k).reshape(shape))
            add = self.mark(ir.node("Add", [codes, offsets], name=f"{t.layer}_kmeans_rows"))
            new_nodes.append(add)
            codes = add.outputs[0]
        gather = self.mark(ir.node("Gather", [book, codes], {"axis": 0}, name=f"{t.layer}_kmeans_gather"))
        new_nodes.append(gather)
        out = gather.outputs[0]
        out.name = f"{base}_shared"
        out.shape = ir.Shape(t.array.shape)
        out.type = ir.TensorType(ir.DataType.from_numpy(t.array.dtype))
        graph.insert_before(t.node, new_nodes)
        t.node.replace_input_with(t.index, out)
        owner = t.value.graph
        if owner is not None and not t.value.uses() and t.value.name in owner.initializers:
            del owner.initializers[t.value.name]
