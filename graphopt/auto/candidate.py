"""One candidate of `graphopt auto`: a recipe run through the verified pipeline on the search samples.

A :class:`Job` holds everything a run needs (plain paths, the recipe text and the search samples), so it can be
shipped to a Dask worker as it is; :func:`run` is the function the worker calls.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from pathlib import Path
from typing import Any

from graphopt import bench
from graphopt.auto.space import TIMED
from graphopt.errors import GraphoptError, first_line
from graphopt.metrics import STRESS, TaskMetric
from graphopt.pipeline import RunOptions, optimize


@dataclasses.dataclass
class Candidate:
    """One trial: its recipe and what it gave on the search samples."""

    number: int
    recipe: str
    lzma_bytes: int | None = None
    latency_ratio: float | None = None  # to the original, timed by the pipeline (objectives latency, balanced)
    search: dict[str, Any] | None = None  # the run's final comparison on the search samples (None: not valid)
    seconds: float = 0.0
    error: str = ""
    same_as: int | None = None  # a repeated recipe: the earlier candidate whose result (and file) it reuses
    size_ratio: float | None = None  # lzma bytes to the input file's lzma bytes
    digest: str = ""  # of the built file: recipes whose lossy steps all rolled back build the same model

    @property
    def valid(self) -> bool:
        return not self.error and self.search is not None

    def value(self, objective: str) -> float:
        """Lower is better. balanced: the geometric mean of the size and latency ratios to the original, so
        halving either counts the same."""
        if not self.valid:
            return math.inf
        if objective == "size":
            return float(self.lzma_bytes) if self.lzma_bytes is not None else math.inf
        latency = self.latency_ratio if self.latency_ratio is not None else 1.0
        if objective == "balanced":
            return math.sqrt(self.size_ratio * latency) if self.size_ratio is not None else math.inf
        return latency

    @property
    def file_number(self) -> int:
        return self.same_as if self.same_as is not None else self.number


@dataclasses.dataclass(frozen=True)
class Job:
    model: Path
    folder: Path
    number: int
    recipe: str
    search: Any  # graphopt.data.Dataset: the search samples (calibration and gate alike)
    objective: str
    max_drop: float
    metric: str | None
    threads: int
    task: TaskMetric | None = None  # the user's metric function: the budget is on it
    original_lzma_bytes: int | None = None  # the input file's, for the candidate's size ratio

    @property
    def output(self) -> Path:
        return self.folder / f"candidate{self.number}.onnx"


def run(job: Job) -> Candidate:
    """Build the candidate file; a candidate that breaks or leaves the budget is a row, not an error (only a
    GraphoptError about the inputs themselves stops the search)."""
    cand = Candidate(job.number, job.recipe)
    start = time.perf_counter()
    try:
        report = optimize(str(job.model), job.output, passes=job.recipe, calib=job.search, data=job.search,
                          max_drop=job.max_drop, metric=job.metric, metric_fn=job.task,
                          run=RunOptions(threads=job.threads, latency=job.objective in TIMED, progress=False))
        stressed = report.final_stressed_drop
        steady = stressed is None or stressed <= job.max_drop + 1e-9
        drop = report.final_drop or 0.0
        narrow = drop + report.final_spread <= job.max_drop + 1e-9
        cand.search = report.final if report.passed and steady and narrow else None
        cand.lzma_bytes = bench.file_sizes(job.output)[1]
        cand.digest = file_digest(job.output)
        if job.original_lzma_bytes:
            cand.size_ratio = round(cand.lzma_bytes / job.original_lzma_bytes, 6)
        kept = [r for r in report.passes if r.latency_ratio is not None]
        cand.latency_ratio = kept[-1].latency_ratio if kept else None
        if not report.passed:
            cand.error = "outside the budget on the search samples"
        elif not steady:
            cand.error = f"at the budget's edge: drop {stressed:.4f} with the output error x{STRESS:g}"
        elif not narrow:
            cand.error = (f"at the budget's edge: drop {drop:.4f} + {report.final_spread:.4f} (one standard error "
                          f"from the {1 - report.final['agreement']:.1%} of predictions that changed)")
    except GraphoptError:
        raise
    except Exception as err:  # noqa: BLE001 - a candidate that breaks is a row, the search goes on
        cand.error = first_line(err)
    cand.seconds = round(time.perf_counter() - start, 2)
    return cand


def file_digest(path: Path) -> str:
    """blake2b of the model file. A model with external data names its own data file inside, so two such builds
    never compare equal: the worst case is two timings of one model, as before."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while chunk := handle.read(16 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def first_builds(candidates: list[Candidate]) -> dict[int, int]:
    """Each built candidate's number -> the first valid candidate that built the same file (itself when none, or
    when it is not valid). Their measured latencies differ only by noise (PP-OCR cls, AVX2 host: a recipe whose
    channel pruning and low rank both rolled back measured x0.664 against the fused original's x0.696), so only
    the first one competes."""
    first: dict[str, int] = {}
    numbers: dict[int, int] = {}
    for cand in sorted(candidates, key=lambda c: c.number):
        if cand.same_as is None:
            same = cand.valid and cand.digest
            numbers[cand.number] = first.setdefault(cand.digest, cand.number) if same else cand.number
    return numbers
