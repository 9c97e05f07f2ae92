"""Timing for quantize's latency placement: one-node models per weight op, and whole models interleaved.

Each weight op (Conv/ConvTranspose/Gemm/MatMul with a constant weight) is timed alone with onnxruntime at the
run's thread count, as three one-node models interleaved by :func:`graphopt.latency.time_rounds`:
- float: x → op (→ its Relu/Clip) → y;
- int8: the same in QDQ with float x and y (Q → op → DQ after onnxruntime's fusion);
- boundary: only the Q of x and the DQ of y, so int8 − boundary is the integer kernel alone, as it runs
  inside a chain of int8 ops; and, for MatMul/Gemm, the dynamic int8 form.
Per-op times of tiny ops are noisy, so the final choices are made on whole models: :func:`time_candidates` runs
the float model and every candidate interleaved round by round on calibration feeds (a heavy model: one after
the other).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from graphopt import capture
from graphopt.graphs import default_opset
from graphopt.data import input_specs
from graphopt.latency import batch_one, paired_ratio, time_rounds
from graphopt.passes.quantize import qdq
from graphopt.passes.quantize.calibrate import Range
from graphopt.passes.quantize.dynamic import emit_dynamic
from graphopt.verify import is_heavy, release_memory


@dataclasses.dataclass
class LayerTiming:
    node: str
    op: str
    float_ms: float
    int8_ms: float  # the integer kernel alone (int8 model minus its boundary Q/DQ)
    boundary_ms: float  # Q of the input + DQ of the output
    elems: int  # elements of input + output (prices boundaries elsewhere)
    dynamic_ms: float | None = None

    @property
    def gain_ms(self) -> float:
        return self.float_ms - self.int8_ms

    def row(self) -> dict:
        out = {"node": self.node, "op": self.op, "action": "timed", "float_ms": round(self.float_ms, 4),
               "int8_kernel_ms": round(self.int8_ms, 4), "qdq_boundary_ms": round(self.boundary_ms, 4)}
        if self.dynamic_ms is not None:
            out["dynamic_ms"] = round(self.dynamic_ms, 4)
        return out


# A LayerTimer times the given nodes (tests inject a fake one); a ModelTimer returns candidate/float latency.
LayerTimer = Callable[[ir.Model, Sequence[ir.Node], Mapping[str, Range], qdq.QdqConfig, float],
                      dict[str, LayerTiming]]
ModelTimer = Callable[[ir.Model, ir.Model], float]


# --- one-node models -------------------------------------------------------------------------------------------


def _copy_value(v: ir.Value, shape=None) -> ir.Value:
    return ir.Value(name=v.name, type=v.type or ir.TensorType(ir.DataType.FLOAT),
                    shape=ir.Shape(shape) if shape is not None else v.shape, const_value=v.const_value)


def _micro(node: ir.Node, in_shape: tuple[int, ...], opset: int) -> ir.Model:
    """x → node (→ the Relu/Clip that folds into it) → y, weights shared with the model (never written)."""
    x = _copy_value(node.inputs[0], in_shape)
    inits, ins = [], [x]
    for v in node.inputs[1:]:
        c = _copy_value(v) if v is not None else None
        if c is not None:
            inits.append(c)
        ins.append(c)
    out = ir.Value(name=node.outputs[0].name, type=ir.TensorType(ir.DataType.FLOAT))
    new = ir.Node(node.domain, node.op_type, ins, attributes=list(node.attributes.values()), name=node.name,
                  outputs=[out])
    nodes = [new]
    target = qdq.fold_target(node)
    if target is not node.outputs[0]:
        fold = target.producer()
        extra = [_copy_value(v) if v is not None else None for v in fold.inputs[1:]]
        inits += [v for v in extra if v is not None]
        y = ir.Value(name=target.name, type=ir.TensorType(ir.DataType.FLOAT))
        nodes.append(ir.Node(fold.domain, fold.op_type, [out, *extra], attributes=list(fold.attributes.values()),
                             name=fold.name, outputs=[y]))
        out = y
    graph = ir.Graph([x], [out], nodes=nodes, initializers=inits, opset_imports={"": max(opset, 13)})
    return ir.Model(graph, ir_version=8)


def _boundary(x_name: str, x_shape, y_name: str, y_shape, x_range: Range, y_range: Range,
              cfg: qdq.QdqConfig) -> ir.Model:
    """Only the boundary ops: QuantizeLinear(x) and DequantizeLinear(y_q)."""
    dtype = np.uint8 if cfg.activation_type == "uint8" else np.int8
    qtype = ir.DataType.from_numpy(np.dtype(dtype))
    x = ir.Value(name=x_name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(x_shape))
    yq = ir.Value(name=f"{y_name}__q", type=ir.TensorType(qtype), shape=ir.Shape(y_shape))
    inits, outs, nodes = [], [], []
    for i, (src, rng, op) in enumerate(((x, x_range, "QuantizeLinear"), (yq, y_range, "DequantizeLinear"))):
        scale, zp = qdq.activation_qparams(*rng, cfg.activation_type)
        s = ir.Value(name=f"s{i}", const_value=ir.tensor(np.asarray(scale, np.float32), name=f"s{i}"))
        z = ir.Value(name=f"z{i}", const_value=ir.tensor(np.asarray(zp, dtype), name=f"z{i}"))
        inits += [s, z]
        out = ir.Value(name=f"o{i}")
        nodes.append(ir.Node("", op, [src, s, z], outputs=[out]))
        outs.append(out)
    graph = ir.Graph([x, yq], outs, nodes=nodes, initializers=inits, opset_imports={"": 13})
    return ir.Model(graph, ir_version=8)


def capture_shapes(model: ir.Model, names: Sequence[str], dataset, threads: int = 1) -> dict[str, tuple]:
    """Shapes of the named values on the first calibration feed."""
    for acts in capture.stream(model, list(dict.fromkeys(names)), dataset, threads, max_samples=1):
        return {k: tuple(np.shape(v)) for k, v in acts.items()}
    return {}


def time_layers(model: ir.Model, nodes: Sequence[ir.Node], ranges: Mapping[str, Range], cfg: qdq.QdqConfig,
                shapes: Mapping[str, tuple], threads: int = 1, budget_s: float = 30.0,
                dynamic: bool = False) -> dict[str, LayerTiming]:
    """Time each node's float, int8 and boundary one-node models (see the module doc) within ``budget_s``."""
    opset = default_opset(model, 13)
    rng = np.random.default_rng(0)
    start, out = time.perf_counter(), {}
    for node in nodes:
        if time.perf_counter() - start > budget_s:
            break
        x, y = node.inputs[0], qdq.fold_target(node)
        if x.name not in shapes or y.name not in shapes or x.name not in ranges or y.name not in ranges:
            continue
        try:
            flt = _micro(node, shapes[x.name], opset)
            q = _micro(node, shapes[x.name], opset)
            qdq.emit(q, [next(iter(q.graph))], ranges, dataclasses.replace(cfg, quantize_outputs=True))
            models = [flt, q, _boundary(x.name, shapes[x.name], y.name, shapes[y.name], ranges[x.name],
                                        ranges[y.name], cfg)]
            if dynamic and node.op_type in ("MatMul", "Gemm"):
                d = _micro(node, shapes[x.name], opset)
                emit_dynamic(d, [next(iter(d.graph))], cfg.per_channel, safe_pairs=cfg.safe_pairs)
                models.append(d)
            lo, hi = ranges[x.name]
            feed = {x.name: rng.uniform(lo, hi, shapes[x.name]).astype(np.float32),
                    f"{y.name}__q": rng.integers(0, 127, shapes[y.name]).astype(
                        np.uint8 if cfg.activation_type == "uint8" else np.int8)}
            # ir.Models, not protos: a weight still in the source file reaches onnxruntime through a file (no
            # proto and bytes copies of an 8192x8192 weight beside onnxruntime's own).
            ms = [statistics.median(t) for t in time_rounds(models, [feed], threads, warmup=3, repeats=15,
                                                            min_time_s=0.05)]
        except Exception:  # an op the one-node model cannot express: no timing, plan unchanged
            continue
        elems = int(np.prod(shapes[x.name])) + int(np.prod(shapes[y.name]))
        out[node.name] = LayerTiming(node.name, node.op_type, ms[0], max(ms[1] - ms[2], 0.0), ms[2], elems,
                                     ms[3] if len(ms) > 3 else None)
    return out


# --- whole models ------------------------------------------------------------------------------------------------


def time_candidates(reference: ir.Model, candidates: Sequence[ir.Model], dataset, threads: int = 1,
                    repeats: int = 10, min_time_s: float = 0.5) -> list[float]:
    """Each candidate's latency / the reference's: the median of per-round ratios, all models interleaved on the
    first two calibration feeds (latency.time_rounds), so load bursts that slow a whole round cancel. A heavy
    model (verify.is_heavy) is timed one model after the other, the ratio of medians: its sessions side by side
    would hold the float weights beside every candidate's (the pipeline times large models so too).

    Feeds are cut to their first sample where the batch axis is free (latency.batch_one), as the pipeline's latency
    guard times: per sample at batch 1. Calibration feeds hold up to 32 samples: on a BERT-base encoder one such
    run took 14 s, so ten rounds of each candidate took minutes, and the int8/float ratio at 4096 rows is not the
    one a batch-1 deployment sees."""
    models = [reference, *candidates]
    feeds = batch_one(input_specs(reference), dataset.feeds[:2])
    if not any(is_heavy(m) for m in models):
        rounds = time_rounds(models, feeds, threads, warmup=2, repeats=repeats,
                             min_time_s=min_time_s * len(candidates))
        return [paired_ratio(rounds[0], t).value for t in rounds[1:]]
    medians = []
    for model in models:
        medians.append(statistics.median(time_rounds([model], feeds, threads, warmup=2, repeats=repeats,
                                                     min_time_s=min_time_s)[0]))
        release_memory()
    return [m / medians[0] for m in medians[1:]]


def time_models(reference: ir.Model, candidate: ir.Model, dataset, threads: int = 1, repeats: int = 10,
                min_time_s: float = 0.5) -> float:
    """candidate/reference median latency, interleaved (:func:`time_candidates` with one candidate)."""
    return time_candidates(reference, [candidate], dataset, threads, repeats, min_time_s)[0]
