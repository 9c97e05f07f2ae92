"""What the pipeline checks after a pass: the onnx checker, an onnxruntime session, the gate.

A candidate is serialized once: in memory when small, to a temporary folder with external data when large
(onnx_ir then writes tensors straight to disk, so no second in-memory copy of the weights is made and
onnxruntime reads the file). One session serves both the evaluation and the latency measurement.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from graphopt import costs, modelio, runtime
from graphopt.metrics import FEATURES, WORST_SAMPLE_SLACK, Comparison, TaskMetric

# Above this many bytes of tensors a candidate goes through a temporary file. Above this many bytes of
# weights at run time (a codebook model is small on disk, full size in onnxruntime), verification sessions
# skip weight pre-packing (a second copy of every weight) and per-pass latency is skipped: only the final
# model is timed. Measured on VGG-19 (575 MB): the run otherwise peaked at 4.2 GB.
LARGE_BYTES = 100_000_000


# When no class-score output exists (regression, detection maps), the gate is the worst-channel SNR.
DEFAULT_MIN_SNR_WITHOUT_SCORES = 30.0


@dataclasses.dataclass(frozen=True)
class Gate:
    metric: str | None  # accuracy | agreement | cosine | snr | task; None: chosen by resolved()
    max_drop: float
    min_snr: float | None
    task: TaskMetric | None = None  # the user's function, when the metric is task

    def resolved(self, reference: Comparison) -> tuple[Gate, str | None]:
        """The one place the gate metric is chosen, from the original model's own comparison: the user's metric
        function when there is one, else the metric asked for, else by what the outputs are (reference.roles,
        graphopt.metrics.roles): accuracy on class scores when the data has labels, else agreement; cosine on
        embeddings and hidden states; worst-channel SNR when neither is there. Returns the gate and a note when
        it is not the one asked for."""
        if self.task is not None:
            return dataclasses.replace(self, metric="task"), None
        if self.metric is not None and (self.metric == "snr" or reference.value(self.metric) is not None):
            return Gate(self.metric, self.max_drop, self.min_snr), None
        if reference.score_output is not None:
            gate = Gate("accuracy" if reference.reference_accuracy is not None else "agreement", self.max_drop,
                        self.min_snr)
        elif any(r.role == FEATURES and r.name in reference.cosine_outputs for r in reference.roles):
            gate = Gate("cosine", self.max_drop, self.min_snr)
        else:
            gate = Gate("snr", self.max_drop, self.min_snr or DEFAULT_MIN_SNR_WITHOUT_SCORES)
        if self.metric is None:
            return gate, None
        return gate, f"no {self.metric} on these outputs: the gate is {gate.describe()}"

    def describe(self) -> str:
        """The gate in a few words: what it holds to."""
        if self.metric == "cosine":
            return (f"cosine: mean >= {1 - self.max_drop:g}, every sample >= "
                    f"{1 - WORST_SAMPLE_SLACK * self.max_drop:g}")
        if self.metric == "snr":
            return f"worst-channel SNR >= {self.min_snr:g} dB"
        return f"{self.metric} drop <= {self.max_drop:g}"

    def proxy(self, reference: Comparison) -> Gate:
        """The gate passes measure layers with: this one, or for the task metric the one graphopt would choose
        itself (a user's function scores whole models only: it is not called once per layer)."""
        if self.metric != "task":
            return self
        return Gate(None, self.max_drop, self.min_snr).resolved(reference)[0]

    def failure(self, comparison: Comparison, budget: float) -> str | None:
        """Why ``comparison`` breaks the gate with ``budget``, or None if it holds."""
        drop = comparison.drop(self.metric) if self.metric != "snr" else None
        if drop is not None and drop > budget + 1e-9 and self.metric == "cosine":
            return (f"cosine {comparison.cosine:.4f} (worst sample {comparison.worst_sample_cosine:.4f}) is below "
                    f"the budget's {1 - budget:g} (worst sample {1 - WORST_SAMPLE_SLACK * budget:g})")
        if drop is not None and drop > budget + 1e-9:
            return f"{self.metric} drop {drop:.4f} exceeds the budget {budget:g}"
        if self.min_snr is not None and comparison.worst_snr_db < self.min_snr:
            return f"worst-channel SNR {comparison.worst_snr_db:.1f} dB is below {self.min_snr:g} dB"
        return None


def is_heavy(model: ir.Model) -> bool:
    """Too large for two onnxruntime sessions side by side: large on disk, or large once onnxruntime has
    expanded compressed weights (a codebook model is small on disk, full size at run time)."""
    return modelio.tensor_bytes(model) > LARGE_BYTES or 4 * costs.count_params(model) > LARGE_BYTES


class Materialized:
    """A model serialized once for the checker, onnxruntime and the size column."""

    def __init__(self, model: ir.Model, tmp: Path, to_file: bool = False):
        self.large = modelio.tensor_bytes(model) > LARGE_BYTES
        self.heavy = is_heavy(model)
        self.path: Path | None = None
        if self.large or to_file:
            self.path = path = tmp / "model.onnx"
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

    def session(self, threads: int, for_timing: bool = False):
        lean = self.heavy and not for_timing
        return runtime.make_session(self.handle, threads, lean=lean)


def release_memory() -> None:
    """Hand freed memory back to the OS: glibc keeps freed onnxruntime buffers of large models otherwise
    (VGG-19: resident size stayed 0.9 GB above what was live after a session was dropped)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def release_mapped(*models: ir.Model | None) -> None:
    """Unmap the weights these models read from external-data files. onnx_ir maps the file when a tensor is first
    read and keeps it mapped: every page a pass touched stays in the resident size as long as the tensor lives,
    also through a clone that shares it (the teacher). 2.4 GB MLP, prune then kmeans: the teacher's pages and a
    reloaded checkpoint's were both resident, 2.3 GB each. A released tensor maps the file again when read."""
    for model in models:
        for graph in [] if model is None else [model.graph, *model.graph.subgraphs()]:
            for value in graph.initializers.values():
                if isinstance(value.const_value, ir.ExternalTensor):
                    try:
                        value.const_value.release()
                    except BufferError:  # an array read from it is still alive: it stays mapped
                        pass


class Checkpoints:
    """The state a failed pass rolls back to.

    Small models: an in-memory clone (tensors are shared, so it costs only the graph). Large models: the
    last kept model on disk, with external data; after every kept pass the model is reloaded from that file,
    so the weights a pass replaced are freed rather than pinned by a snapshot (VGG-19 prune + kmeans: the
    run peaked at 3.0 GB with snapshots). Files stay until the run ends: a teacher may still read them.
    """

    def __init__(self, folder: Path, large: bool, initial: Any):
        self.folder, self.large, self._count = folder, large, 0
        self._path = Path(initial) if large and isinstance(initial, str) else None
        self._snapshot: ir.Model | None = None

    @property
    def on_disk(self) -> bool:
        return self.large and self._path is not None

    def before(self, model: ir.Model) -> None:
        self._snapshot = None if self.on_disk else model.clone()

    def restore(self) -> ir.Model:
        if self._snapshot is not None:
            return self._snapshot
        return modelio.load_model(self._path)

    def folder_for_candidate(self) -> Path:
        self._count += 1
        path = self.folder / f"step{self._count}"
        path.mkdir()
        return path

    def keep(self, mat: Materialized) -> ir.Model:
        """The kept candidate, reloaded from its file (on disk only; its tensors load lazily)."""
        self._path = mat.path
        return modelio.load_model(mat.path)
