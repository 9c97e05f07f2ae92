"""Compare a candidate model's outputs with a reference model's, streaming over evaluation feeds.

For every output: max/mean absolute error, cosine similarity and SNR in dB, for the whole tensor and per
channel (axis 1 of outputs of rank >= 2), with the worst channel reported. The worst channel is what gates:
a detector whose score channels collapse while its box channels survive keeps a high whole-tensor SNR.

Conventions (SNR and cosine are always finite, never NaN; to_dict() is JSON-safe):
- SNR = 10*log10(sum(ref^2) / sum((ref-cand)^2)), clamped to [-SNR_CAP, SNR_CAP]. Zero error gives
  +SNR_CAP (200 dB, standing for +inf). A zero-energy reference with non-zero error uses
  10*log10(tiny/err) with tiny the smallest normal float64, i.e. about -SNR_CAP: the candidate produced
  signal where the reference has none.
- Cosine = sum(ref*cand) / (|ref| |cand|); 1.0 when both are zero, 0.0 when only one is.
- A candidate value that is NaN/inf where the reference is not the same value marks its channel (and the
  whole tensor) broken: SNR -SNR_CAP, cosine 0, max/mean abs inf (None in to_dict()).
- Integer/bool outputs are compared by exact match: `exact_match` is the matching fraction, cosine is that
  fraction and SNR is 10*log10(1/mismatch_fraction) (1% mismatching -> 20 dB; no mismatch -> SNR_CAP).
  Other outputs (strings, scikit-learn ZipMap dicts) too, with an element's abs error counted as 0 or 1.
- State is a fixed set of per-channel sums per output, so memory is flat in the number of feeds and feeds
  may differ in shape (channel counts may differ between feeds; a channel seen in some feeds only is fine).
- Cosine per vector (graphopt.metrics.vectors) on every float output of rank >= 2 but outputs of one value a
  row: `cosine` is the lowest mean over them (`cosine_outputs`: those but the score output, when there are any;
  else the score output, for --metric cosine on a classifier), `worst_sample_cosine` the lowest sample's.
  The cosine metric's drop is the larger of 1 - cosine and (1 - worst_sample_cosine) / WORST_SAMPLE_SLACK.
- score_output: None chooses the first float [N, C] or [N, T, C] output (C > 1); NO_SCORES ("", a name no ONNX
  output has) says there is none. The Evaluator decides it from the graph (graphopt.metrics.roles).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from graphopt.metrics.channels import SNR_CAP, OutputAccumulator, OutputMetrics, cosine, snr_db
from graphopt.errors import DataError, GraphoptError
from graphopt.formatting import json_safe
from graphopt.metrics.roles import OutputRole
from graphopt.metrics.vectors import VectorCosines

__all__ = [
    "METRICS",
    "NO_SCORES",
    "SNR_CAP",
    "STRESS",
    "WORST_SAMPLE_SLACK",
    "Accumulator",
    "Comparison",
    "OutputMetrics",
    "check_score_output",
    "compare",
    "cosine",
    "snr_db",
    "split_labels",
]

# task: the user's own function (graphopt.metrics.task); cosine: embeddings and hidden states
METRICS = ("accuracy", "agreement", "cosine", "snr", "task")
# Budget searches judge candidates with their output error made this much larger (the part of it a per-row
# rescaling and shift of the scores does not explain, which cannot change an arg-max): a search that stops at
# the first flipped sample stops where unseen samples flip, and the safety factor keeps it off that edge.
# Measured on digits (graphopt auto, 140 search samples, 25 candidates): without it the pick lost 1.11 points
# on the 360 test samples, with a factor of 1.5 1.67, with 2 0.28 (13.8x smaller after lzma).
STRESS = 2.0
MAP_THRESHOLD = 0.5  # agreement on a one-channel [N, 1, H, W] score map: the same side of this value
NO_SCORES = ""  # score_output when the model has no class-score output (no output has an empty name)
# The cosine budget: max_drop bounds 1 - mean cosine, and this many times max_drop 1 - the worst sample's cosine
# (max_drop 0.01: mean >= 0.99, every sample >= 0.95). The mean is what a retrieval or a classifier on top sees
# on average; one sample may stray further, not arbitrarily far. A mean cosine is a smooth average, without the
# edge a count of flipped arg-maxes has: its stressed drop is its drop.
WORST_SAMPLE_SLACK = 5.0


def changed_spread(agreement: float | None, samples: int) -> float:
    """sqrt(share of predictions that changed / samples): the standard error of a paired accuracy difference."""
    return math.sqrt(max(0.0, 1.0 - agreement) / samples) if agreement is not None and samples else 0.0


@dataclass
class Comparison:
    outputs: list[OutputMetrics]
    samples: int
    score_output: str | None
    agreement: float | None
    accuracy: float | None
    reference_accuracy: float | None
    feeds: int = 0
    stressed_agreement: float | None = None  # agreement with the output error STRESS times larger
    stressed_accuracy: float | None = None  # accuracy likewise
    task: float | None = None  # the user's metric function on the candidate (higher is better)
    reference_task: float | None = None  # ... on the reference
    stressed_task: float | None = None  # ... on the candidate with its output error STRESS times larger
    cosine: float | None = None  # mean cosine per vector, the lowest over cosine_outputs
    worst_sample_cosine: float | None = None  # the lowest sample's mean cosine over those outputs
    cosine_outputs: list[str] = field(default_factory=list)
    roles: list[OutputRole] = field(default_factory=list)  # what each output is (the Evaluator's reading)

    @property
    def worst_snr_db(self) -> float:
        """Lowest worst-channel SNR over all outputs (SNR_CAP when there are no outputs)."""
        return min((o.worst_channel_snr_db for o in self.outputs), default=SNR_CAP)

    @property
    def worst_output(self) -> OutputMetrics | None:
        return min(self.outputs, key=lambda o: o.worst_channel_snr_db, default=None)

    def value(self, metric: str) -> float | None:
        _check_metric(metric)
        if metric == "accuracy":
            return self.accuracy
        if metric == "agreement":
            return self.agreement
        if metric == "task":
            return self.task
        if metric == "cosine":
            return self.cosine
        return self.worst_snr_db

    def spread(self, metric: str) -> float:
        """One standard error of the accuracy drop, from the share of predictions that changed (0 for the other
        metrics). Each sample's change in correctness is -1, 0 or +1, so its variance is at most that share: flips
        both ways cancel in the net drop on these samples, not on others (PP-OCR cls: 12 of 420 changed, net drop
        0.6 points on 180 held-out lines, then 1.25 points on 400 fresh ones). Agreement counts the flips itself."""
        return changed_spread(self.agreement, self.samples) if metric == "accuracy" else 0.0

    def drop(self, metric: str, stressed: bool = False) -> float | None:
        """How much worse than the reference: accuracy points lost, or 1 - agreement; None for snr.
        ``stressed``: the larger of that and the drop with the output error STRESS times larger. task: the
        reference's score less the candidate's (stressed: the user's function on the stressed outputs).
        cosine: the larger of 1 - mean cosine and (1 - worst sample's) / WORST_SAMPLE_SLACK."""
        _check_metric(metric)
        if metric == "cosine":
            if self.cosine is None or self.worst_sample_cosine is None:
                return None
            return max(1.0 - self.cosine, (1.0 - self.worst_sample_cosine) / WORST_SAMPLE_SLACK)
        if metric == "task":
            if self.task is None or self.reference_task is None:
                return None
            worst = min(self.task, self.stressed_task) if stressed and self.stressed_task is not None else self.task
            return self.reference_task - worst
        if metric == "accuracy":
            if self.accuracy is None or self.reference_accuracy is None:
                return None
            worst = min(self.accuracy, self.stressed_accuracy) if stressed and self.stressed_accuracy is not None \
                else self.accuracy
            return self.reference_accuracy - worst
        if metric == "agreement":
            if self.agreement is None:
                return None
            worst = min(self.agreement, self.stressed_agreement) if stressed and self.stressed_agreement is not None \
                else self.agreement
            return 1.0 - worst
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: non-finite floats (only max/mean abs of broken outputs can be) become None."""
        data = json_safe(asdict(self))
        data["worst_snr_db"] = json_safe(self.worst_snr_db)
        return data

    def summary(self) -> str:
        parts = []
        if self.accuracy is not None:
            ref = f" (ref {self.reference_accuracy:.3f})" if self.reference_accuracy is not None else ""
            parts.append(f"acc {self.accuracy:.3f}{ref}")
        if self.agreement is not None:
            parts.append(f"agree {self.agreement:.3f}")
        if self.task is not None:
            parts.append(f"task {self.task:.4g}" + (f" (ref {self.reference_task:.4g})"
                                                    if self.reference_task is not None else ""))
        if self.cosine is not None:
            parts.append(f"cos {self.cosine:.4f} (worst sample {self.worst_sample_cosine:.4f})")
        worst = self.worst_output
        if worst is not None:
            where = f" [{worst.name}" + (f" ch {worst.worst_channel}]" if worst.worst_channel is not None else "]")
            parts.append(f"worst-ch SNR {self.worst_snr_db:.1f} dB{where}")
        return " ".join(parts) if parts else "no outputs compared"


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise GraphoptError(f"unknown metric {metric!r} (use one of {', '.join(METRICS)})")


def check_score_output(score_output: str | None, output_names: list[str]) -> None:
    if score_output not in (None, NO_SCORES) and score_output not in output_names:
        raise GraphoptError(
            f"score output {score_output!r} is not a model output (outputs: {', '.join(output_names)})"
        )


def _is_score(array: np.ndarray) -> bool:
    return array.dtype.kind == "f" and array.ndim in (2, 3) and array.shape[-1] > 1


def _auto_score_index(refs: Sequence[np.ndarray]) -> int | None:
    """The first floating output shaped [N, C] or [N, T, C] with C > 1 (integer outputs are ids, not scores)."""
    return next((i for i, array in enumerate(refs) if _is_score(np.asarray(array))), None)


def _rows(refs: Sequence[np.ndarray], score_index: int | None) -> int:
    """Samples in one feed: axis 0 of the score output, else of the first output of rank >= 1."""
    if score_index is not None:
        return int(np.shape(refs[score_index])[0])
    return next((int(np.shape(r)[0]) for r in refs if np.ndim(r)), 1)


def _map_decision(array: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel of an [N, C, H, W] map: the class over axis 1, or for one channel whether it exceeds
    ``threshold`` (a probability or heat map: what a detector or segmenter decides from it)."""
    if array.shape[1] == 1:
        return array[:, 0] > threshold, np.isfinite(array[:, 0])
    return array.argmax(axis=1), np.isfinite(array).all(axis=1)


def _stressed(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """``cand`` with its error STRESS times larger, less the part a per-row affine map of ``ref``'s scores
    explains (a rescaled or shifted row keeps its arg-max): fit cand ≈ a·ref + b per row, scale the residual."""
    r = ref.astype(np.float64, copy=False)
    c = cand.astype(np.float64, copy=False)
    with np.errstate(invalid="ignore", over="ignore"):  # rows with -inf log-probs: left as the candidate's
        rc = r - r.mean(axis=-1, keepdims=True)
        cc = c - c.mean(axis=-1, keepdims=True)
        a = (rc * cc).sum(axis=-1, keepdims=True) / np.maximum((rc * rc).sum(axis=-1, keepdims=True), 1e-300)
        fit = c.mean(axis=-1, keepdims=True) + a * rc
        stressed = fit + STRESS * (c - fit)
    return np.where(np.isfinite(stressed).all(axis=-1, keepdims=True), stressed, c)


def _top(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Argmax over the last (class) axis of [N, C] or [N, T, C], and whether each row is all finite."""
    return array.argmax(axis=-1), np.isfinite(array).all(axis=-1)


class Accumulator:
    """Streaming comparison: call add() once per feed, then result()."""

    def __init__(self, output_names: Sequence[str], score_output: str | None = None,
                 map_threshold: float = MAP_THRESHOLD) -> None:
        self.output_names = list(output_names)
        self.map_threshold = map_threshold
        check_score_output(score_output, self.output_names)
        self._score_name = score_output
        self._score_index: int | None = None if not score_output else self.output_names.index(score_output)
        self._outputs = [OutputAccumulator(name) for name in self.output_names]
        self._cosines: dict[int, VectorCosines] | None = None  # by output index, chosen at the first feed
        self._feeds = 0
        self._samples = 0
        self._agree = self._positions = self._stress_agree = 0
        self._correct = self._ref_correct = self._labelled = self._stress_correct = 0

    def _choose_score(self, refs: Sequence[np.ndarray]) -> None:
        if self._score_name is None and self._feeds == 0:
            self._score_index = _auto_score_index(refs)
            if self._score_index is not None:
                self._score_name = self.output_names[self._score_index]
        if self._cosines is None:  # every float output of rank >= 2 but one-value-a-row outputs
            self._cosines = {i: VectorCosines() for i, ref in enumerate(refs) if ref.dtype.kind == "f"
                             and ref.ndim >= 2 and not (ref.ndim <= 3 and ref.shape[-1] <= 1)}

    def add(
        self,
        ref_outputs: Sequence[np.ndarray],
        cand_outputs: Sequence[np.ndarray],
        labels: np.ndarray | None = None,
    ) -> None:
        feed = self._feeds
        n_out = len(self.output_names)
        if len(ref_outputs) != n_out or len(cand_outputs) != n_out:
            raise GraphoptError(
                f"feed {feed}: expected {n_out} outputs, got {len(ref_outputs)} reference and "
                f"{len(cand_outputs)} candidate"
            )
        refs = [np.asarray(a) for a in ref_outputs]
        cands = [np.asarray(a) for a in cand_outputs]
        for name, ref, cand in zip(self.output_names, refs, cands):
            if ref.shape != cand.shape:
                raise GraphoptError(
                    f"output {name!r} feed {feed}: candidate shape {cand.shape} != reference shape {ref.shape}"
                )
        self._choose_score(refs)
        for acc, ref, cand in zip(self._outputs, refs, cands):
            acc.add(ref, cand)
        for i, cosines in self._cosines.items():
            cosines.add(refs[i], cands[i])
        self._samples += _rows(refs, self._score_index)
        if self._score_index is not None:
            self._add_scores(refs[self._score_index], cands[self._score_index], labels, feed)
        self._feeds += 1

    def _add_scores(self, ref: np.ndarray, cand: np.ndarray, labels: np.ndarray | None, feed: int) -> None:
        if ref.ndim not in (2, 3, 4) or ref.dtype.kind != "f":
            raise GraphoptError(
                f"score output {self._score_name!r} feed {feed}: {ref.dtype} {ref.shape}, agreement needs "
                "float [N, C] class scores, [N, T, C] sequence scores or an [N, C, H, W] map"
            )
        if ref.ndim == 4:  # a map: each pixel's class (C > 1) or its side of the threshold (C == 1)
            ref_top, _ = _map_decision(ref, self.map_threshold)
            cand_top, finite = _map_decision(cand.astype(np.float64, copy=False), self.map_threshold)
            stressed_top = cand_top
        else:
            ref_top, _ = _top(ref)
            cand_top, finite = _top(cand.astype(np.float64, copy=False))
            stressed_top, _ = _top(_stressed(ref, cand))
        hit = (ref_top == cand_top) & finite  # a NaN row must not agree by accident
        self._agree += int(hit.sum())
        self._stress_agree += int(((ref_top == stressed_top) & hit).sum())
        self._positions += hit.size
        if labels is None or ref.ndim != 2:
            return
        labels = np.asarray(labels).reshape(-1)
        if labels.size != ref.shape[0]:
            raise DataError(
                f"feed {feed}: {labels.size} labels for {ref.shape[0]} samples of score output {self._score_name!r}"
            )
        labels = labels.astype(np.int64)
        self._correct += int(((cand_top == labels) & finite).sum())
        self._stress_correct += int(((stressed_top == labels) & (cand_top == labels) & finite).sum())
        self._ref_correct += int((ref_top == labels).sum())
        self._labelled += labels.size

    def result(self) -> Comparison:
        labelled = self._labelled
        outputs = [acc.result() for acc in self._outputs]
        for i, cosines in (self._cosines or {}).items():
            outputs[i].vector_cosine, outputs[i].worst_sample_cosine = cosines.result() or (None, None)
        vectors = [o for o in outputs if o.vector_cosine is not None]
        others = [o for o in vectors if o.name != self._score_name]
        vectors = others or vectors
        return Comparison(
            outputs=outputs,
            samples=self._samples,
            score_output=self._score_name or None,
            agreement=self._agree / self._positions if self._positions else None,
            accuracy=self._correct / labelled if labelled else None,
            reference_accuracy=self._ref_correct / labelled if labelled else None,
            feeds=self._feeds,
            stressed_agreement=self._stress_agree / self._positions if self._positions else None,
            stressed_accuracy=self._stress_correct / labelled if labelled else None,
            cosine=min((o.vector_cosine for o in vectors), default=None),
            worst_sample_cosine=min((o.worst_sample_cosine for o in vectors), default=None),
            cosine_outputs=[o.name for o in vectors],
        )


def compare(
    output_names: Sequence[str],
    ref_batches: Sequence[Sequence[np.ndarray]],
    cand_batches: Sequence[Sequence[np.ndarray]],
    labels: Sequence[np.ndarray | None] | np.ndarray | None = None,
    score_output: str | None = None,
    map_threshold: float = MAP_THRESHOLD,
) -> Comparison:
    """One-shot comparison. labels: one int per sample over all batches in order, or one array per batch."""
    if len(ref_batches) != len(cand_batches):
        raise GraphoptError(f"{len(ref_batches)} reference batches but {len(cand_batches)} candidate batches")
    acc = Accumulator(output_names, score_output, map_threshold)
    per_batch = split_labels(labels, ref_batches, output_names, score_output)
    for ref, cand, lab in zip(ref_batches, cand_batches, per_batch):
        acc.add(ref, cand, lab)
    return acc.result()


def split_labels(
    labels: Sequence[np.ndarray | None] | np.ndarray | None,
    ref_batches: Sequence[Sequence[np.ndarray]],
    output_names: Sequence[str],
    score_output: str | None = None,
) -> list[np.ndarray | None]:
    """Labels per batch, cutting a flat array by each batch's sample count (see _rows).

    Labels only count for an [N, C] score output; otherwise (none, or [N, T, C]) they are not used."""
    index = None
    if labels is not None and ref_batches and score_output != NO_SCORES:
        index = list(output_names).index(score_output) if score_output else _auto_score_index(ref_batches[0])
    if index is None or np.ndim(ref_batches[0][index]) != 2:
        return [None] * len(ref_batches)
    if isinstance(labels, (list, tuple)) and len(labels) == len(ref_batches) and not np.isscalar(labels[0]):
        return list(labels)
    counts = [_rows(refs, index) for refs in ref_batches]
    flat = np.asarray(labels).reshape(-1)
    if sum(counts) != flat.size:
        raise DataError(f"{flat.size} labels for {sum(counts)} evaluation samples")
    return list(np.split(flat, np.cumsum(counts)[:-1]))
