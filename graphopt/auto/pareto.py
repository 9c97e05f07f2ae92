"""The trade-offs `graphopt auto` found: Pareto fronts of loss vs size and loss vs latency, as JSON, Markdown
and PNG (the original and the chosen model marked).

Loss is measured on the search samples against the original: the accuracy, agreement or user's score drop, the
cosine gate's drop (as :meth:`graphopt.metrics.Comparison.drop` takes it), or for the snr gate the negated worst-channel SNR (lower is better on every axis).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from graphopt.auto.candidate import Candidate, first_builds
from graphopt.formatting import human
from graphopt.metrics import WORST_SAMPLE_SLACK


def loss(cand: Candidate, metric: str) -> float | None:
    """The candidate's loss on the search samples (None: not valid, or no number for the metric)."""
    s = cand.search
    if not cand.valid or s is None:
        return None
    if metric == "accuracy" and s.get("accuracy") is not None and s.get("reference_accuracy") is not None:
        return float(s["reference_accuracy"]) - float(s["accuracy"])
    if metric == "agreement" and s.get("agreement") is not None:
        return 1.0 - float(s["agreement"])
    if metric == "task" and s.get("task") is not None and s.get("reference_task") is not None:
        return float(s["reference_task"]) - float(s["task"])
    if metric == "cosine" and s.get("cosine") is not None and s.get("worst_sample_cosine") is not None:
        return max(1.0 - float(s["cosine"]), (1.0 - float(s["worst_sample_cosine"])) / WORST_SAMPLE_SLACK)
    snr = s.get("worst_snr_db")
    return -float(snr) if snr is not None else None


def front(cands: Sequence[Candidate], metric: str, axis: str) -> list[Candidate]:
    """The valid candidates no other beats on both loss and ``axis`` ("lzma_bytes" or "latency_ratio"),
    cheapest first; one per (loss, cost) point (the earliest), and one per built file (the first that built it)."""
    firsts = first_builds(list(cands))
    points = [(c, loss(c, metric), getattr(c, axis)) for c in cands if firsts.get(c.number) == c.number]
    points = [(c, q, v) for c, q, v in points if q is not None and v is not None]
    points.sort(key=lambda p: (p[2], p[1], p[0].number))
    out, best = [], None
    for c, q, _ in points:
        if best is None or q < best - 1e-12:
            out.append(c)
            best = q
    return out


def fronts(cands: Sequence[Candidate], metric: str) -> dict[str, list[int]]:
    return {axis: [c.number for c in front(cands, metric, axis)] for axis in ("lzma_bytes", "latency_ratio")}


def markdown(cands: Sequence[Candidate], metric: str, chosen: Candidate, summary: Sequence[str],
             objective: str = "size") -> str:
    on_front = {n for numbers in fronts(cands, metric).values() for n in numbers}
    balanced = objective == "balanced"  # its value is neither column: shown in its own
    lines = ["# graphopt auto", "", *summary, "",
             f"Every candidate, loss = {metric} {'drop' if metric != 'snr' else '(negated worst-channel SNR dB)'} "
             "on the search samples; ★ on a Pareto front (loss vs size or vs latency), ✔ the chosen one."
             + (" balanced = √(size ratio × latency ratio), both to the original; lower is better." if balanced
                else ""), "",
             "| # | recipe | loss | size after lzma | latency vs original |" + (" balanced |" if balanced else "")
             + " seconds | status |",
             "| ---: | --- | ---: | ---: | ---: |" + (" ---: |" if balanced else "") + " ---: | --- |"]
    firsts = first_builds(list(cands))
    for c in cands:
        q = loss(c, metric)
        mark = ("✔ " if c.number == chosen.number else "") + ("★" if c.number in on_front else "")
        status = c.error or (f"same as #{c.same_as}" if c.same_as is not None else
                             f"built the same file as #{firsts[c.number]}" if firsts[c.number] != c.number else "ok")
        value = c.value(objective)  # inf: not valid
        shown = (f" {value:.3f} |" if math.isfinite(value) else " |") if balanced else ""
        lines.append(f"| {c.number} {mark} | `{c.recipe}` | {'' if q is None else f'{q:.4g}'} | "
                     f"{'' if c.lzma_bytes is None else human(c.lzma_bytes, 'B')} | "
                     f"{'' if c.latency_ratio is None else f'{c.latency_ratio:.3f}x'} |{shown} {c.seconds:g} | "
                     f"{status} |")
    return "\n".join(lines) + "\n"


def plot(cands: Sequence[Candidate], metric: str, chosen: Candidate, path: Path) -> bool:
    """Loss vs size (and vs latency when candidates were timed) as a PNG; False when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    axes = [a for a in ("lzma_bytes", "latency_ratio") if any(getattr(c, a) is not None and loss(c, metric) is not None
                                                               for c in cands)]
    if not axes:
        return False
    fig, subplots = plt.subplots(1, len(axes), figsize=(6 * len(axes), 4.5), squeeze=False)
    for ax, axis in zip(subplots[0], axes):
        pts = [(getattr(c, axis), loss(c, metric), c) for c in cands]
        pts = [p for p in pts if p[0] is not None and p[1] is not None]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=18, color="0.6", label="candidates")
        line = front(cands, metric, axis)
        ax.step([getattr(c, axis) for c in line], [loss(c, metric) for c in line], where="post", color="C0",
                label="Pareto front")
        for c, label, color in ((pts[0][2] if pts and pts[0][2].number == 0 else None, "original", "C2"),
                                (chosen, "chosen", "C3")):
            if c is not None and getattr(c, axis) is not None and loss(c, metric) is not None:
                ax.scatter([getattr(c, axis)], [loss(c, metric)], s=70, color=color, label=label, zorder=3)
        if axis == "lzma_bytes":
            ax.set_xscale("log")
        ax.set_xlabel("bytes after lzma" if axis == "lzma_bytes" else "latency / original (batch 1)")
        ax.set_ylabel(f"{metric} loss on the search samples")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def report_files(output: Path, cands: Sequence[Candidate], metric: str, chosen: Candidate,
                 summary: Sequence[str], objective: str = "size") -> dict[str, Any]:
    """Write the Markdown report and the plot beside ``output`` (``.md``, ``.png``); the fronts (candidate
    numbers) for the JSON report."""
    output.with_suffix(".md").write_text(markdown(cands, metric, chosen, summary, objective))
    drawn = plot(cands, metric, chosen, output.with_suffix(".png"))
    return {"fronts": fronts(cands, metric), "plot": str(output.with_suffix(".png")) if drawn else None}
