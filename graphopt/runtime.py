"""The hand-off to onnxruntime: sessions from an in-memory model, a proto or a file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from graphopt import modelio

Feed = Mapping[str, np.ndarray]
ModelLike = ir.Model | onnx.ModelProto | str | os.PathLike


def session_options(threads: int = 1, optimized_path: str | None = None, lean: bool = False,
                    optimize: bool = True) -> ort.SessionOptions:
    """``lean``: no weight pre-packing and no memory arena — for checking big models, not for timing them.
    ``optimize=False``: no graph optimizations (QDQ pairs then run as float ops, not integer kernels)."""
    opts = ort.SessionOptions()
    if lean:
        opts.add_session_config_entry("session.disable_prepacking", "1")
        opts.enable_cpu_mem_arena = False
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else \
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    return opts


def _has_external(model: ir.Model) -> bool:
    for graph in [model.graph, *model.graph.subgraphs()]:
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                return True
    return False


def make_session(model: ModelLike, threads: int = 1, optimized_path: str | None = None,
                 lean: bool = False, optimize: bool = True) -> ort.InferenceSession:
    """An onnxruntime CPU session. Large or external-data models go through a temporary file."""
    opts = session_options(threads, optimized_path, lean, optimize)
    providers = ["CPUExecutionProvider"]
    if isinstance(model, (str, os.PathLike)):
        return ort.InferenceSession(str(model), opts, providers=providers)
    if isinstance(model, onnx.ModelProto):
        return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
    if _has_external(model) or modelio.tensor_bytes(model) > modelio.EXTERNAL_THRESHOLD:
        with tempfile.TemporaryDirectory(prefix="graphopt-ort-") as tmp:
            path = Path(tmp) / "model.onnx"
            modelio.save_model(model, path, external=True)
            # onnxruntime reads external data at session creation, so the folder can go afterwards.
            return ort.InferenceSession(str(path), opts, providers=providers)
    return ort.InferenceSession(modelio.to_proto(model).SerializeToString(), opts, providers=providers)


def run(session: ort.InferenceSession, feeds: Iterable[Feed]) -> list[list[np.ndarray]]:
    """Outputs for each feed, in the session's output order."""
    return [session.run(None, dict(feed)) for feed in feeds]
