"""The Evaluator: runs the reference model once on the evaluation samples, caches its outputs, reads what each
output is (graphopt.metrics.roles), and compares candidates with it (graphopt.metrics.compare)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from graphopt.errors import DataError, GraphoptError, first_line
from graphopt.metrics.compare import (MAP_THRESHOLD, NO_SCORES, Accumulator, Comparison, check_score_output,
                                      split_labels)
from graphopt.metrics.roles import graph_evidence, output_roles, score_output_of
from graphopt.metrics.recorded import remember
from graphopt.metrics.task import TaskMetric
from graphopt.runtime import make_session

# an exact rewrite's outputs differ from the original's by float rounding only: PP-OCRv4 rec after fold_batchnorm
# and fuse, 86 dB in its worst channel; 60 dB is an error of 0.1% of the signal
UNCHANGED_SNR_DB = 60.0

__all__ = ["Evaluator", "Scored"]


@dataclass
class Scored:
    """A model's outputs on the evaluation feeds and its score by the user's function: an exact step after it
    whose outputs equal these carries the score, without running the function again."""

    outputs: list[list[np.ndarray]]
    task: float


class Evaluator:
    """Runs the reference once on the evaluation Dataset, caches its outputs, and compares candidates."""

    def __init__(
        self,
        reference: Any,
        dataset: Any,
        threads: int = 1,
        score_output: str | None = None,
        progress: bool = False,
        map_threshold: float = MAP_THRESHOLD,
        task: TaskMetric | None = None,
    ) -> None:
        self.threads = threads
        self.task = task
        self.map_threshold = map_threshold
        self.progress = progress
        self.feeds: list[dict[str, np.ndarray]] = list(dataset.feeds)
        if not self.feeds:
            raise DataError("evaluation data has no samples")
        evidence = graph_evidence(reference)  # before the session: a large file's proto is freed by then
        session = _session(reference, threads, "reference")
        self.output_names = [o.name for o in session.get_outputs()]
        check_score_output(score_output, self.output_names)
        self.reference_outputs = [
            _run(session, self.output_names, feed, i, "reference") for i, feed in enumerate(self._bar(self.feeds))
        ]
        # What each output is, and so the output agreement is measured on (NO_SCORES: none); every Accumulator
        # on this evaluator's outputs (graphopt.sensitivity.suffix too) takes score_output from here.
        self.roles = output_roles(self.output_names, self.reference_outputs[0], evidence, score_output)
        self.score_output = score_output or score_output_of(self.roles) or NO_SCORES
        labels = getattr(dataset, "labels", None)
        self.labels = split_labels(labels, self.reference_outputs, self.output_names, self.score_output)
        # recorded: the final stressed task score runs the reference on the function's feeds again, and so do the
        # passes' stressed scores when the pipeline shares this session as their teacher's
        self.recorded_reference = remember(session) if task is not None else None
        self.reference_task = task.score(session) if task is not None else None
        self.latest: Scored | None = None  # of the last candidate evaluated (with a function only)

    def _bar(self, items: list, progress: bool | None = None, desc: str = "reference"):
        from tqdm.auto import tqdm

        show = self.progress if progress is None else progress
        return tqdm(items, desc=desc, unit="feed", disable=not show, leave=False)

    def evaluate(self, candidate: Any, progress: bool | None = None, exact: bool = False,
                 since: Scored | None = None) -> Comparison:
        """Compare a candidate (ir.Model, ModelProto, path or onnxruntime session) with the cached reference.
        ``exact``: the candidate computes the function of the reference, or of ``since`` (the model the exact step
        rewrote); when its outputs show it (unchanged_outputs), its task score is that model's, and the user's
        function is not run again (on PP-OCRv4 rec each run scores 300 lines, about 6 s: four times for the exact
        steps, and once more for cleanup after each lossy recipe)."""
        session = _session(candidate, self.threads, "candidate")
        acc = Accumulator(self.output_names, self.score_output, self.map_threshold)
        outputs = []  # kept with a function only (an exact step after this one may carry its score)
        for i, feed in enumerate(self._bar(self.feeds, progress, "evaluate")):
            got = _run(session, self.output_names, feed, i, "candidate")
            acc.add(self.reference_outputs[i], got, self.labels[i])
            if self.task is not None:
                outputs.append(got)
        result = acc.result()
        result.roles = list(self.roles)
        if self.task is not None:
            result.reference_task = self.reference_task
            result.task = self._carried(result, outputs, since) if exact else None
            if result.task is None:
                result.task = self.task.score(session)
            self.latest = Scored(outputs, result.task)
        return result

    def _carried(self, result: Comparison, outputs: list[list[np.ndarray]], since: Scored | None) -> float | None:
        """The score an exact step's candidate carries: the reference's or ``since``'s, whichever its outputs
        equal (None: neither, so it is measured)."""
        if unchanged_outputs(result):
            return self.reference_task
        if since is None:
            return None
        acc = Accumulator(self.output_names, self.score_output, self.map_threshold)
        for before, after, labels in zip(since.outputs, outputs, self.labels):
            acc.add(before, after, labels)
        return since.task if unchanged_outputs(acc.result()) else None

    def stressed_task(self, candidate: Any) -> float | None:
        """The user's function on ``candidate`` with its outputs' error from the reference STRESS times larger
        (None without a function). Asked once, of a final model: it runs the candidate and the reference again."""
        if self.task is None:
            return None
        return self.task.stressed_score(_session(candidate, self.threads, "candidate"), self.recorded_reference)


def _session(model: Any, threads: int, role: str):
    if hasattr(model, "run") and hasattr(model, "get_outputs"):
        return model  # already an onnxruntime session
    try:
        return make_session(model, threads=threads)
    except GraphoptError:
        raise
    except Exception as err:  # onnxruntime raises several unrelated types for a bad model
        raise GraphoptError(f"{role} model does not load in onnxruntime: {first_line(err, limit=None, with_type=False)}") from None


def _run(session: Any, names: list[str], feed: dict[str, np.ndarray], index: int, role: str) -> list[np.ndarray]:
    try:
        return session.run(names, dict(feed))
    except Exception as err:
        raise GraphoptError(f"{role} model failed on evaluation feed {index}: {first_line(err, limit=None, with_type=False)}") from None


def unchanged_outputs(comparison: Comparison) -> bool:
    """Outputs equal to the reference's up to float rounding: every channel at UNCHANGED_SNR_DB or more, and no
    prediction changed."""
    return comparison.worst_snr_db >= UNCHANGED_SNR_DB and comparison.agreement in (None, 1.0)
