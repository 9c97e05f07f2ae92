"""What the pipeline checks after a pass: the onnx checker, an onnxruntime session, the gate.

A candidate is serialized once: in memory when small, to a temporary folder with external data when large
(onnx_ir then writes tensors straight to disk, so no second in-memory copy of the weights is made and
onnxruntime reads the file). One session serves both the evaluation and the latency measurement.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from graphopt import modelio, runtime
from graphopt.metrics import Comparison

# Above this many bytes of tensors a candidate goes through a temporary file, and per-pass latency is
# skipped (only the final model is timed): two sessions of a 500 MB model would dominate memory.
LARGE_BYTES = 100_000_000


@dataclasses.dataclass(frozen=True)
class Gate:
    metric: str  # accuracy | agreement | snr
    max_drop: float
    min_snr: float | None

    def failure(self, comparison: Comparison, budget: float) -> str | None:
        """Why ``comparison`` breaks the gate with ``budget``, or None if it holds."""
        drop = comparison.drop(self.metric) if self.metric != "snr" else None
        if drop is not None and drop > budget + 1e-9:
            return f"{self.metric} drop {drop:.4f} exceeds the budget {budget:g}"
        if self.min_snr is not None and comparison.worst_snr_db < self.min_snr:
            return f"worst-channel SNR {comparison.worst_snr_db:.1f} dB is below {self.min_snr:g} dB"
        return None


class Materialized:
    """A model serialized once for the checker, onnxruntime and the size column."""

    def __init__(self, model: ir.Model, tmp: Path):
        self.large = modelio.tensor_bytes(model) > LARGE_BYTES
        if self.large:
            path = tmp / "model.onnx"
            modelio.save_model(model, path, external=True)
            self.handle: Any = str(path)
            self.nbytes = sum(p.stat().st_size for p in tmp.iterdir())
        else:
            proto = modelio.to_proto(model)
            self.handle = proto
            self.nbytes = proto.ByteSize()

    def check(self) -> None:
        """The onnx checker; by path for large models (it then reads no external data)."""
        onnx.checker.check_model(self.handle)

    def session(self, threads: int):
        return runtime.make_session(self.handle, threads)


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"[:300]
