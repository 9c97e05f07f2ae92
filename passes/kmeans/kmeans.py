"""kmeans: weight sharing. A layer's weight becomes Gather(codebook, Cast(indices)).

Per layer (default) a float codebook of at most 2^bits centroids; per output channel a codebook [O, K] read
with per-row offsets, Gather(codebook, Add(Cast(indices), row·K)). Indices are uint8, or packed UINT4 when
bits ≤ 4 (the model's opset is raised to 21 for it). Exact zeros (from pruning) keep a reserved zero code and
do not pull centroids when they are at least 1/2^bits of the weight. bits=1 is sign × a scale per output channel
(no zero code). With ``data_aware`` each element's error is weighted by the mean square of its input channel on
calibration data, so centroids serve the layer outputs. With ``half_codebook`` float32 codebooks are stored as
float16 and a Cast after the Gather restores float32 (Gather(codebook, Cast(indices)) stays the form cleanup
holds out): on the digits model after lowrank, 11 codebooks of 16 values, 0.25 kB less after lzma. onnxruntime
constant-folds the Gather at load: run time equals the float model. With ``refit`` the centroids (and the bias)
of each Conv/Gemm/MatMul are then solved by least squares so the layer's outputs on calibration data match the
float layer's, layer by layer on the inputs the shared layers before it give it (:mod:`refit`); codes stay.

Embedding tables (Gather data, weight_targets) are layers too: the decoded table feeds the original Gather, whose
rows are then exactly the codebook values of their codes. Their output channel is the hidden axis, so
``per_channel`` gives one codebook per hidden feature (one per token row would cost 2^bits floats per token: a
BERT-base-sized 30522 x 768 normal table at 4 bits, 6.9x smaller instead of 8.0x, relative error 0.090 instead of
0.097, and 2.5 minutes of clustering); ``data_aware`` weighs each row by how often calibration data reads it (importance).
onnxruntime folds the decode at load, so the session holds the float table: the file shrinks, not the memory.
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
from graphopt.passes.kmeans.codebook import Codebook, codes_used, errors
from graphopt.passes.kmeans.importance import input_mean_squares
from graphopt.passes.kmeans.kmeans1d import INITS
from graphopt.passes.kmeans.refit import linear_of, write
from graphopt.passes.kmeans.widths import Books, refit_books, widths
from graphopt.proto_handoff import ensure_opset
from graphopt.weight_targets import Target, find_targets
from graphopt.weights import set_initializer

UINT4_OPSET = 21


class KMeans(GraphoptPass):
    """Share weights through a per-layer (or per-channel) codebook: weight = Gather(codebook, Cast(indices))."""

    name = "kmeans"
    summary = "weight sharing: k-means codebook of 2^bits values per layer/channel, uint8 or UINT4 indices"
    size_objective = True  # the Gather that decodes the codebook costs time

    @classmethod
    def needs_data(cls, options) -> str | None:
        if options.bits == "auto":
            return "bits=auto measures each layer's width on data"
        if options.refit:
            return "refit fits the centroids to the layers' outputs on data"
        return "data_aware weighs each weight by its input's activations" if options.data_aware else None

    @dataclasses.dataclass(frozen=True)
    class Options(BaseOptions):
        bits: int | dict[str, int] | Literal["auto"] = option(
            4, "index bits: 2^bits codes (1 = sign × per-channel scale); a mapping layer (node or weight name) → "
               "bits ('*' for the rest); or auto: each layer's width chosen inside max_drop (needs --calib)",
            low=1, high=8)
        levels: list[int] = option([8, 6, 5, 4, 3, 2, 1], "widths measured per layer with bits=auto", low=1, high=8)
        time_budget: float = option(120.0, "seconds for the bits=auto sensitivity measurements", low=0.0,
                                    low_open=True)
        init: Literal["linear", "density", "kmeans++"] = option(
            "linear", "centroid initialization: linear over [min, max], density (quantiles), kmeans++",
            choices=INITS)
        per_channel: bool | list[str] = option(
            False, "one codebook per output channel instead of per layer: true for every layer, or the op types "
                   "that get one (Conv|ConvTranspose: after fold_batchnorm each Conv channel has its own scale)")
        data_aware: bool = option(
            False, "weight each element's error by its input channel's mean square on calibration data")
        uint4: bool = option(True, "store indices as packed UINT4 when bits <= 4 (raises the opset to 21)")
        half_codebook: bool = option(
            False, "store float32 codebooks as float16, a Cast after the Gather (centroids rounded to 11 bits)")
        refit: bool = option(
            False, "solve each Conv/Gemm/MatMul's centroids and bias by least squares so its outputs match the "
                   "float layer's on calibration data, layer by layer (codes kept; a zero code stays 0)")
        refit_samples: int = option(
            64, "calibration samples the refit reads (each wave of layers runs the model on them; a quarter only "
                "judges the refits)", low=1)
        skip_nodes: list[str] = option([], "node or weight names left alone")
        skip_ops: list[str] = option(
            [], "op types left alone (Conv, ConvTranspose, Gemm, MatMul; Gather: embedding tables)")
        min_size: int = option(0, "layers with fewer weight elements are left alone", low=0)
        max_samples: int = option(128, "calibration samples for data_aware and bits=auto", low=1)
        measure_samples: int | None = option(
            None, "calibration samples each bits=auto width is measured on alone (default max_samples; the "
                  "whole-model checks use max_samples)", low=1)
        seed: int = option(0, "seed of kmeans++ initialization")

    def call(self, model: ir.Model) -> GraphoptResult:
        opts = self.options
        notes: list[str] = []
        targets = find_targets(model, opts.skip_nodes, opts.skip_ops, opts.min_size, [], "shared")
        energy = input_mean_squares(self.context, model, targets, opts.max_samples) if opts.data_aware else {}
        books = Books(opts, energy)
        chosen = widths(self.context, model, targets, books, notes)
        packed = False
        if opts.uint4 and any(b <= 4 for b in chosen.values()):
            try:  # the upgrade rebuilds the graph, so the targets are found again afterwards
                raised = ensure_opset(model, UINT4_OPSET)
                packed = True
                if raised:
                    notes.append(f"opset raised from {raised[0]} to {raised[1]} for UINT4 indices")
            except GraphoptError as err:
                notes.append(f"UINT4 indices need opset {UINT4_OPSET} ({err}); uint8 indices used")
        targets = find_targets(model, opts.skip_nodes, opts.skip_ops, opts.min_size, notes, "shared")

        plan = []
        for t in targets:
            bits = chosen.get(t.layer)
            if bits is None:
                continue
            if opts.data_aware and t.layer not in energy:
                notes.append(f"{t.layer}: input activation not captured; plain k-means used")
            cb = books.get(t, bits)
            uint4 = packed and bits <= 4
            index_bytes = (t.array.size + 1) // 2 if uint4 else t.array.size
            book_bytes = cb.codebook.size * (2 if books.is_half(t, bits) else cb.codebook.itemsize)
            new_bytes = index_bytes + book_bytes + (4 * cb.codebook.shape[0] if cb.per_channel else 0)
            if new_bytes >= t.array.nbytes:
                notes.append(f"{t.layer}: a codebook would not be smaller ({new_bytes} vs {t.array.nbytes} bytes); "
                             "left as it is")
                continue
            plan.append((t, bits, uint4, new_bytes))
        solutions = refit_books(self.context, model, [(t, bits) for t, bits, *_ in plan], books, notes) \
            if opts.refit and plan else {}

        rows = []
        for t, bits, uint4, new_bytes in plan:
            cb, h, half = books.get(t, bits), books.importance(t), books.is_half(t, bits)
            rel, weighted = errors(t.array, cb, h)
            row = {"layer": t.layer, "op": t.node.op_type, "weight": t.value.name, "elements": int(t.array.size),
                   "bits": bits, "codes_used": codes_used(cb.indices),
                   "codebook": list(cb.codebook.shape), "zero_code": cb.zero_code,
                   "indices": "uint4" if uint4 else "uint8",
                   "codebook_dtype": "float16" if half else str(cb.codebook.dtype),
                   "bytes_before": int(t.array.nbytes),
                   "bytes_after": int(new_bytes), "rel_error": round(rel, 5)}
            if weighted is not None:
                row["weighted_rel_error"] = round(weighted, 5)
            sol = solutions.get(t.layer)
            if sol is not None:
                row |= sol.row()
                if sol.kept:  # the bias (and a Gemm's alpha, folded into the centroids) as the refit has them
                    write(linear_of(t, model), cb, sol)
            self._rewrite(t, cb, uint4, half)
            rows.append(row)
        if rows:
            before = sum(r["bytes_before"] for r in rows)
            after = sum(r["bytes_after"] for r in rows)
            notes.append(f"{len(rows)} layer(s) shared: weights {before} -> {after} bytes ({before / after:.1f}x)")
        return self.result(model, rows, notes)

    def _rewrite(self, t: Target, cb: Codebook, packed: bool, half: bool) -> None:
        """weight input of the node ← Gather(codebook, Cast(indices)) [+ row offsets when per channel]."""
        graph = t.node.graph
        base = t.value.name or t.layer
        idx = cb.indices.astype(ml_dtypes.uint4) if packed else cb.indices
        indices = set_initializer(graph, f"{base}_indices", idx)
        book = set_initializer(graph, f"{base}_codebook",
                               cb.codebook.reshape(-1).astype(np.float16 if half else cb.codebook.dtype))
        cast = self.mark(ir.node("Cast", [indices], {"to": ir.DataType.INT32}, name=f"{t.layer}_kmeans_cast"))
        new_nodes = [cast]
        codes = cast.outputs[0]
        # named after the weight (unique in the model): unnamed, onnx_ir names them per graph, and a weight in an
        # If body and one outside both got 'val_0', which onnxruntime refuses (not SSA)
        codes.name = f"{base}_codes"
        if cb.per_channel:
            k = cb.codebook.shape[1]
            shape = [1] * cb.indices.ndim
            shape[cb.out_axis] = cb.codebook.shape[0]
            offsets = set_initializer(graph, f"{base}_row_offsets",
                                      (np.arange(cb.codebook.shape[0], dtype=np.int32) * k).reshape(shape))
            add = self.mark(ir.node("Add", [codes, offsets], name=f"{t.layer}_kmeans_rows"))
            new_nodes.append(add)
            codes = add.outputs[0]
            codes.name = f"{base}_rows"
        gather = self.mark(ir.node("Gather", [book, codes], {"axis": 0}, name=f"{t.layer}_kmeans_gather"))
        new_nodes.append(gather)
        out = gather.outputs[0]
        if half:  # the codebook's values are float16 already (Books rounded them): the Cast restores float32
            out.name = f"{base}_shared_half"
            widen = self.mark(ir.node("Cast", [out], {"to": ir.DataType.FLOAT}, name=f"{t.layer}_kmeans_widen"))
            new_nodes.append(widen)
            out = widen.outputs[0]
        out.name = f"{base}_shared"
        out.shape = ir.Shape(t.array.shape)
        out.type = ir.TensorType(ir.DataType.from_numpy(t.array.dtype))
        graph.insert_before(t.node, new_nodes)
        t.node.replace_input_with(t.index, out)
        owner = t.value.graph
        if owner is not None and not t.value.uses() and t.value.name in owner.initializers:
            del owner.initializers[t.value.name]
