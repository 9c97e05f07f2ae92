"""The `graphopt bench` table: each model's latency (timed by graphopt.latency), file size on disk and after lzma,
parameters and MACs (graphopt.costs)."""

from __future__ import annotations

import lzma
import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from graphopt import cpu, latency, modelio
from graphopt.costs import count_macs, count_params
from graphopt.errors import GraphoptError
from graphopt.formatting import human, table

__all__ = ["LZMA_FAST_ABOVE", "LZMA_FAST_PRESET", "LZMA_PRESET", "BenchRow", "benchmark", "disk_bytes", "file_sizes",
           "format_bench", "lzma_preset"]

# lzma: preset 6 (xz's default) normally; above LZMA_FAST_ABOVE bytes preset 1. Measured on the 2-core dev
# box with a 10 MB float model: preset 6 ~2.3 MB/s, preset 1 ~4 MB/s, sizes within 1% (float weights barely
# compress). benchmark() picks one preset for all its models so the lzma column compares.
LZMA_PRESET = 6
LZMA_FAST_PRESET = 1
LZMA_FAST_ABOVE = 200 * 1024 * 1024


# ---------------------------------------------------------------- machine


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's machine type where there is none)."""
    return cpu.host().model or platform.processor() or platform.machine()


def machine_summary() -> str:
    """'2-core <CPU> (int8 kernels: vnni), onnxruntime at 1 thread': the machine line of benchmark sections."""
    return f"{os.cpu_count()}-core {cpu_name()} (int8 kernels: {cpu.host().isa}), onnxruntime at 1 thread"


# ---------------------------------------------------------------- file sizes


def _external_files(path: Path) -> list[Path]:
    return modelio.external_files(onnx.load(str(path), load_external_data=False), path.parent)


def lzma_preset(total_bytes: int) -> int:
    return LZMA_FAST_PRESET if total_bytes > LZMA_FAST_ABOVE else LZMA_PRESET


def _model_files(path: str | os.PathLike) -> list[Path]:
    """The model file and the external data files it references (GraphoptError if there is no model file)."""
    path = Path(path)
    if not path.is_file():
        raise GraphoptError(f"{path}: no such file")
    return [path, *_external_files(path)]


def disk_bytes(path: str | os.PathLike) -> int:
    """Bytes of the model file plus the external data files it references."""
    return sum(f.stat().st_size for f in _model_files(path))


def file_sizes(path: str | os.PathLike, preset: int | None = None) -> tuple[int, int]:
    """(bytes on disk incl. external data files, bytes after lzma); preset None picks by size (see top)."""
    files = _model_files(path)
    total = sum(f.stat().st_size for f in files)
    compressor = lzma.LZMACompressor(preset=lzma_preset(total) if preset is None else preset)
    packed = 0
    for file in files:
        with open(file, "rb") as handle:
            while chunk := handle.read(16 * 1024 * 1024):
                packed += len(compressor.compress(chunk))
    packed += len(compressor.flush())
    return total, packed


# ---------------------------------------------------------------- latency


@dataclass
class BenchRow:
    label: str
    median_ms: float
    p90_ms: float
    ratio: float
    runs: int
    file_bytes: int | None
    lzma_bytes: int | None
    params: int | None
    macs: int | None


def _stats(
    model: object, preset: int, feed: dict[str, np.ndarray]
) -> tuple[int | None, int | None, int | None, int | None]:
    file_bytes = lzma_bytes = None
    if isinstance(model, (str, os.PathLike)):
        file_bytes, lzma_bytes = file_sizes(model, preset)
        model = modelio.load_model(model)
    elif isinstance(model, onnx.ModelProto):
        model = ir.serde.deserialize_model(model)  # wraps the tensors, no copy
    if not isinstance(model, ir.Model):
        return file_bytes, lzma_bytes, None, None
    names = {v.name for v in model.graph.inputs}
    shapes = {k: tuple(np.shape(v)) for k, v in feed.items() if k in names}  # MACs of the timed inference
    return file_bytes, lzma_bytes, count_params(model), count_macs(model, shapes)


def benchmark(
    models: list,
    feeds: list[dict[str, np.ndarray]],
    threads: int = 1,
    warmup: int = 3,
    repeats: int = 20,
    labels: list[str] | None = None,
    min_time_s: float = 0.0,
    progress: bool = False,
    max_time_s: float | None = None,
    stats: bool = True,
) -> list[BenchRow]:
    """Median/p90 latency of each model on the same feeds, models interleaved round by round
    (:func:`graphopt.latency.time_rounds`),
    with file sizes, parameters and MACs when ``stats``."""
    if not models:
        raise GraphoptError("benchmark: no models given")
    if not feeds:
        raise GraphoptError("benchmark: no input feeds given")
    if labels is not None and len(labels) != len(models):
        raise GraphoptError(f"benchmark: {len(labels)} labels for {len(models)} models")
    labels = labels or [latency.model_label(m, i) for i, m in enumerate(models)]
    times = latency.time_rounds(models, feeds, threads, warmup, repeats, min_time_s, max_time_s, labels, progress)
    # One lzma preset for the whole table, so the compressed sizes compare.
    paths = [m for m in models if isinstance(m, (str, os.PathLike))]
    preset = lzma_preset(max((disk_bytes(p) for p in paths), default=0))
    rows = []
    for label, model, samples in zip(labels, models, times):
        median = statistics.median(samples)
        p90 = float(np.percentile(samples, 90))
        extra = _stats(model, preset, feeds[0]) if stats and not hasattr(model, "get_inputs") else (None,) * 4
        rows.append(BenchRow(label, median, p90, 0.0, len(samples), *extra))
    first = rows[0].median_ms
    for row in rows:
        row.ratio = row.median_ms / first if first > 0 else float("nan")
    return rows


def format_bench(rows: list[BenchRow]) -> str:
    header = ["model", "median ms", "p90 ms", "ratio", "runs", "size", "lzma", "params", "MACs"]
    body = [
        [
            r.label,
            f"{r.median_ms:.3f}",
            f"{r.p90_ms:.3f}",
            f"{r.ratio:.2f}x",
            str(r.runs),
            human(r.file_bytes, "B"),
            human(r.lzma_bytes, "B"),
            human(r.params),
            human(r.macs),
        ]
        for r in rows
    ]
    return table(header, body)
