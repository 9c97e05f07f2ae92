"""The pick of `graphopt auto`: the best candidate on the objective that keeps the budget on the held-out samples
and is not slower than the input.

The search ranks candidates on its own samples; the pick is then judged once on the held-out samples (with labels:
its accuracy drop plus one standard error estimated from the predictions that changed), and timed
against the input model interleaved (the latency guard of :mod:`graphopt.latency`: slower only beyond this
machine's noise). Size candidates are not timed while they are built, and a size-only pass (int8 on a CPU whose
int8 kernels are slow, a decode left in the graph) may cost time: auto never returns a pick slower than what it was
given. A candidate that fails either way is passed over for the next best; the original (exact passes only) ends
the list.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from graphopt.auto.candidate import Candidate, first_builds
from graphopt.latency import LatencyProbe, Ratio
from graphopt.metrics import Evaluator, TaskMetric
from graphopt.verify import Gate

# accuracy failures on the held-out samples, and slower picks, each allowed this many times, best first, before
# falling back to the original. Counted apart: a pick timed slower says nothing about the held-out samples (PP-OCR
# cls, size: 2 outside, then one int8-everywhere pick x1.69 of float, and 3.7x and 3.0x candidates never judged)
HOLDOUT_TRIES = 3
JUDGE_SECONDS = 20.0  # at most this long timing one pick against the input (interleaved rounds)
OUTSIDE = "outside the budget on the held-out samples"


@dataclasses.dataclass(frozen=True)
class Verdict:
    holdout: dict[str, Any]  # the pick against the original on the held-out samples
    accurate: bool  # keeps the budget there
    latency: Ratio  # the pick over the input model, batch 1, interleaved
    spread: float = 0.0  # with labels: the standard error held beside the accuracy drop (Comparison.spread)

    @property
    def why_not(self) -> str:
        """Why the pick is passed over ("" when it is not)."""
        if not self.accurate:
            return OUTSIDE
        return f"slower than the original: {self.latency.describe()}" if self.latency.slower else ""


class Judge:
    """Candidates against the original: accuracy on the held-out samples (the user's function called with
    holdout=True), latency on a few of them at batch 1."""

    def __init__(self, model: Path, holdout: Any, max_drop: float, metric: str | None, threads: int,
                 task: TaskMetric | None, feeds: list[dict]) -> None:
        task = task.judging() if task is not None else None
        self.model, self.max_drop = model, max_drop
        self.evaluator = Evaluator(str(model), holdout, threads=threads, task=task)
        self.gate = Gate("task", max_drop, None, task) if task is not None else \
            Gate(metric, max_drop, None).resolved(self.evaluator.evaluate(str(model)))[0]
        self.probe = LatencyProbe(feeds, threads, max_seconds=JUDGE_SECONDS)

    def __call__(self, pick: Path) -> Verdict:
        comparison = self.evaluator.evaluate(str(pick))
        # with labels, the drop plus one standard error from the changed predictions must fit (Comparison.spread)
        spread = comparison.spread(self.gate.metric)
        accurate = self.gate.failure(comparison, self.max_drop - spread) is None
        return Verdict(comparison.to_dict(), accurate, self.probe.compare(str(self.model), str(pick)).vs_before,
                       spread)


def choose(candidates: list[Candidate], objective: str, original: str, judge: Callable[[Path], Verdict],
           file_of: Callable[[Candidate], tuple[Candidate, Path]]) -> tuple[Candidate, Path, Verdict, list]:
    """The best candidate that ``judge`` accepts: the best is judged first; when it fails, the next best, until
    HOLDOUT_TRIES failed on accuracy or as many were slower; then the original (exact passes only), which is
    returned whatever its verdict. Returns (pick, its file, its verdict, the candidates passed over with why). A
    pick found after an accuracy failure was chosen with the held-out samples' help: the report says so, since its
    held-out number is then no longer unseen."""
    firsts = first_builds(candidates)
    ranked = sorted((c for c in candidates if c.valid and firsts.get(c.number) == c.number),
                    key=lambda c: (c.value(objective), c.number))
    fallback = next((c for c in ranked if c.recipe == original), None) or \
        min(candidates, key=lambda c: (c.value(objective), c.number))
    better = [c for c in ranked if c.recipe != original and c.value(objective) < fallback.value(objective)]
    passed_over: list[dict[str, Any]] = []
    for cand in better:
        outside = sum(f["why"] == OUTSIDE for f in passed_over)
        if max(outside, len(passed_over) - outside) >= HOLDOUT_TRIES:
            break
        cand, pick = file_of(cand)
        verdict = judge(pick)
        if not verdict.why_not:
            return cand, pick, verdict, passed_over
        passed_over.append({"number": cand.number, "recipe": cand.recipe, "holdout": verdict.holdout,
                            "why": verdict.why_not})
    cand, pick = file_of(fallback)
    return cand, pick, judge(pick), passed_over


def passed_over_text(passed_over: list[dict[str, Any]]) -> str:
    """The report's words for the better candidates the judgement passed over."""
    if not passed_over:
        return ""
    numbers = ", ".join(f"#{f['number']} ({f['why']})" for f in passed_over)
    helped = any(f["why"] == OUTSIDE for f in passed_over)  # an accuracy failure: the held-out samples chose
    return (f"; better candidates passed over: {numbers}"
            + ("; the pick was chosen with the held-out samples' help (its held-out number is no longer unseen)"
               if helped else ""))
