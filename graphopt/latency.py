"""The latency guard: is a candidate model slower than the one before it, beyond this machine's noise?

Models are timed interleaved, round by round (:func:`time_rounds`), so drift and a busy
neighbour fall on both. The ratio is the median of the per-round ratios candidate/before (paired: a slow round
slows both); the noise margin is the half-width of that median's 95% confidence interval (order statistics, so
no assumption on the timing distribution), never below :data:`MIN_MARGIN`. A ratio more than half its margin
above 1 but within twice it — where one timing could decide either way — is timed once more and the rounds
pooled before deciding. Node count is never taken for speed:
a rewrite that onnxruntime's own optimizer would have done better can have fewer nodes and run slower.

The timer is injectable (:data:`Timer`): tests decide with fake timings, never with this CPU's real speed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from graphopt import runtime
from graphopt.errors import DataError

# Differences under 2% are not acted on: on the 2-core dev box (vnni), repeated timings of one model differ by
# up to ~2% between runs even when each run's own confidence interval is narrower.
MIN_MARGIN = 0.02
Z95 = 1.96

# models (paths, protos, ir.Models or sessions), feeds -> per model, the milliseconds of each round
Timer = Callable[[Sequence[Any], list[dict]], list[list[float]]]


@dataclasses.dataclass(frozen=True)
class Ratio:
    """Candidate over baseline, from paired rounds."""

    value: float
    margin: float  # half-width of the 95% interval of the median ratio, at least MIN_MARGIN
    rounds: int

    @property
    def slower(self) -> bool:
        return self.value > 1.0 + self.margin

    def describe(self) -> str:
        return f"x{self.value:.3f} (noise ±{self.margin:.3f}, {self.rounds} rounds)"


def paired_ratio(baseline: Sequence[float], candidate: Sequence[float]) -> Ratio:
    """The median of the per-round ratios and its distribution-free 95% interval."""
    logs = np.sort(np.log(np.asarray(candidate, np.float64) / np.asarray(baseline, np.float64)))
    n = len(logs)
    if n == 0:
        raise ValueError("no timing rounds")
    half = Z95 * math.sqrt(n) / 2.0
    lo, hi = logs[max(int(math.floor(n / 2 - half)), 0)], logs[min(int(math.ceil(n / 2 + half)), n - 1)]
    margin = (math.exp(hi) - math.exp(lo)) / 2.0
    return Ratio(float(math.exp(np.median(logs))), max(float(margin), MIN_MARGIN), n)


@dataclasses.dataclass(frozen=True)
class Timing:
    """One guarded measurement: the candidate against the model before it, and against the original."""

    candidate_ms: float
    vs_before: Ratio
    vs_original: Ratio


def model_label(model: object, index: int) -> str:
    """A file's name, else ``model<index>``."""
    if isinstance(model, (str, os.PathLike)):
        return Path(model).name
    return f"model{index}"


def time_rounds(models: Sequence, feeds: list[dict[str, np.ndarray]], threads: int = 1, warmup: int = 3,
                repeats: int = 20, min_time_s: float = 0.0, max_time_s: float | None = None,
                labels: list[str] | None = None, progress: bool = False) -> list[list[float]]:
    """Milliseconds of each model (a path, proto, ir.Model or session) in each round, models interleaved.

    Round r runs every model once on ``feeds[r % len(feeds)]``, in a seeded random order, so clock drift
    and ordering effects (a model's predecessor evicting its caches) fall on all models alike. Rounds continue
    past ``repeats`` until ``min_time_s`` seconds of timed runs have passed, and stop (after 3) at ``max_time_s``.
    """
    labels = labels or [model_label(m, i) for i, m in enumerate(models)]
    sessions = [m if hasattr(m, "get_inputs") else runtime.make_session(m, threads) for m in models]
    # Each model gets only the inputs it declares (an optimized model may have dropped one).
    names = [{i.name for i in s.get_inputs()} for s in sessions]
    for label, needed in zip(labels, names):
        for k, feed in enumerate(feeds):
            if missing := sorted(needed - set(feed)):
                raise DataError(f"{label}: input {missing[0]!r} missing from feed {k} (it has {sorted(feed)})")
    model_feeds = [[{k: v for k, v in f.items() if k in n} for f in feeds] for n in names]
    for r in range(warmup):
        for s, mf in zip(sessions, model_feeds):
            s.run(None, mf[r % len(feeds)])
    times: list[list[float]] = [[] for _ in sessions]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=repeats, desc="bench", unit="round", leave=False)
    # A seeded shuffle per round: with a fixed cyclic order every model would always follow the same
    # predecessor and pay for the caches that one evicts.
    order_rng = np.random.default_rng(0)
    start, r = time.perf_counter(), 0
    while r < repeats or time.perf_counter() - start < min_time_s:
        if max_time_s is not None and r >= 3 and time.perf_counter() - start > max_time_s:
            break
        for i in order_rng.permutation(len(sessions)):
            feed = model_feeds[i][r % len(feeds)]
            t0 = time.perf_counter()
            sessions[i].run(None, feed)
            times[i].append((time.perf_counter() - t0) * 1000.0)
        r += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return times


class LatencyProbe:
    """Times models on the run's feeds. ``timer`` defaults to interleaved onnxruntime sessions."""

    def __init__(self, feeds: list[dict], threads: int = 1, repeats: int = 20, max_seconds: float = 5.0,
                 timer: Timer | None = None) -> None:
        self.feeds, self.threads, self.repeats, self.max_seconds = feeds, threads, repeats, max_seconds
        self.timer = timer or self._onnxruntime_rounds

    def _onnxruntime_rounds(self, models: Sequence[Any], feeds: list[dict]) -> list[list[float]]:
        return time_rounds(models, feeds, threads=self.threads, warmup=2, repeats=self.repeats,
                                 max_time_s=self.max_seconds)

    def compare(self, before: Any, candidate: Any, original: Any | None = None) -> Timing:
        """``candidate`` against ``before`` (and ``original``, when it is another model), timed together;
        a second timing is pooled in when the candidate looks slower by half to twice the noise margin."""
        models = [before, candidate] if original is None else [original, before, candidate]
        rounds = self.timer(models, self.feeds)
        timing = _timing(rounds)
        ratio = timing.vs_before
        if 1.0 + ratio.margin / 2 < ratio.value <= 1.0 + 2 * ratio.margin:
            more = self.timer(models, self.feeds)
            timing = _timing([a + b for a, b in zip(rounds, more)])
        return timing


def batch_one(specs: Sequence[Any], feeds: list[dict]) -> list[dict]:
    """The first sample of each feed when every data input's first axis is free (a batch axis), so latency is
    per sample at batch 1 as most deployments run; the feeds as they are otherwise. ``specs``:
    :func:`graphopt.data.input_specs`."""
    for spec in specs:
        if not spec.shape or (isinstance(spec.shape[0], int) and spec.shape[0] != 1):
            return feeds
    return [{k: v[:1] if np.ndim(v) else v for k, v in feed.items()} for feed in feeds]


def _timing(rounds: list[list[float]]) -> Timing:
    original, before, candidate = rounds if len(rounds) == 3 else (rounds[0], *rounds)
    return Timing(float(np.median(candidate)), paired_ratio(before, candidate), paired_ratio(original, candidate))
