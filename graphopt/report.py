"""The run report: one row per pass, before/after, as a terminal table, JSON and Markdown."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from graphopt.formatting import human, json_safe, table
from graphopt.metrics import WORST_SAMPLE_SLACK, OutputRole, rule_of

KEPT, ROLLED_BACK, NO_CHANGE, FAILED, BASELINE = "kept", "rolled back", "no change", "failed", "input"


@dataclasses.dataclass
class PassRow:
    step: str  # the pass with its options, as written in the recipe
    status: str  # kept | rolled back | no change | failed | input
    seconds: float = 0.0
    params: int | None = None
    file_bytes: int | None = None
    macs: int | None = None
    metrics: dict[str, Any] | None = None  # graphopt.metrics.Comparison.to_dict() against the original
    latency_ms: float | None = None
    latency_ratio: float | None = None  # to the original model, measured interleaved
    latency_vs_before: float | None = None  # to the model before this pass (the latency guard's ratio)
    latency_noise: float | None = None  # the guard's noise margin on that ratio
    reason: str = ""  # why it was rolled back / failed
    notes: list[str] = dataclasses.field(default_factory=list)
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # the pass's per-layer rows


@dataclasses.dataclass
class Report:
    model: str
    output: str | None
    data: str  # where the evaluation samples came from
    synthetic: bool  # True: inputs were synthetic and the metrics say nothing about accuracy
    metric: str
    max_drop: float
    min_snr: float | None
    passes: list[PassRow]
    passed: bool = False  # the final model meets the overall gate
    final: dict[str, Any] | None = None
    final_drop: float | None = None  # the final model's drop on the gate metric (None for the snr gate)
    # the final drop with the output error metrics.STRESS times larger (None for the snr gate): how far from
    # the budget's edge the result sits (graphopt auto accepts only candidates whose stressed drop holds)
    final_stressed_drop: float | None = None
    # one standard error of the final accuracy drop, from the share of predictions that changed (0 for other
    # gates; graphopt auto accepts only candidates whose drop plus this holds)
    final_spread: float = 0.0
    machine: str = ""  # names the host's int8 kernels: the latencies hold for those
    target_cpu: str = ""  # the CPU the model was built for (graphopt.cpu.Target.describe)

    def to_dict(self) -> dict[str, Any]:
        return json_safe(dataclasses.asdict(self))

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def write_markdown(self, path: str | Path) -> None:
        Path(path).write_text(to_markdown(self))


def _metric_cells(row: PassRow, metric: str) -> tuple[str, str, str]:
    m = row.metrics or {}
    acc = m.get(metric if metric in ("task", "cosine") else "accuracy")
    agree = m.get("agreement")
    snr = m.get("worst_snr_db")
    acc_text = "-" if acc is None else f"{acc:.4g}" if metric == "task" else f"{acc:.4f}"
    return (acc_text, "-" if agree is None else f"{agree:.4f}",
            "-" if snr is None else f"{snr:.1f}")


HEADER = ("pass", "status", "time s", "params", "size", "MACs", "accuracy", "agreement", "worst SNR dB",
          "latency ms", "x orig", "x before")


def header(report: Report) -> tuple[str, ...]:
    """HEADER, with the user's score or the mean cosine in the accuracy column when the budget is on it."""
    named = {"task": "task score", "cosine": "mean cosine"}
    return tuple(named.get(report.metric, h) if h == "accuracy" else h for h in HEADER)


def table_rows(report: Report) -> list[tuple[str, ...]]:
    rows = []
    for row in report.passes:
        acc, agree, snr = _metric_cells(row, report.metric)
        rows.append((row.step, row.status, f"{row.seconds:.2f}", human(row.params), human(row.file_bytes, "B"),
                     human(row.macs), acc, agree, snr,
                     "-" if row.latency_ms is None else f"{row.latency_ms:.3f}",
                     "-" if row.latency_ratio is None else f"{row.latency_ratio:.3f}",
                     "-" if row.latency_vs_before is None else f"{row.latency_vs_before:.3f}±{row.latency_noise:.3f}"))
    return rows


def format_table(report: Report) -> str:
    out = [f"model: {report.model}", f"data: {report.data}"]
    if report.machine:
        out.append(f"host: {report.machine}; target CPU: {report.target_cpu}")
    if report.synthetic:
        out.append("WARNING: synthetic inputs: the metrics below say nothing about accuracy")
    out.append(table(header(report), table_rows(report), align_numbers=False))
    for row in report.passes:
        if row.reason:
            out.append(f"  {row.step}: {row.status}: {row.reason}")
    out.append(f"gate: {_gate_text(report)}: {'PASSED' if report.passed else 'FAILED'}")
    out += [f"  {line}" for line in judged(report)]
    if report.output:
        out.append(f"wrote {report.output}")
    return "\n".join(out)


def _gate_text(report: Report) -> str:
    parts = [] if report.metric == "snr" else [f"{report.metric} drop <= {report.max_drop:g}"]
    if report.metric == "cosine":
        parts[0] += (f" (mean cosine >= {1 - report.max_drop:g}, every sample >= "
                     f"{1 - WORST_SAMPLE_SLACK * report.max_drop:g})")
    if report.min_snr is not None:
        parts.append(f"worst-channel SNR >= {report.min_snr:g} dB")
    return ", ".join(parts) or "none"


def judged(report: Report) -> list[str]:
    """One line per output: what graphopt took it for, why, and the rule the gate judged it by."""
    m = (report.passes[0].metrics if report.passes else None) or {}
    cosine_outputs = set(m.get("cosine_outputs", []))
    lines = []
    for data in m.get("roles", []):
        role = OutputRole(**data)
        rule = rule_of(role, report.metric, m.get("score_output"), cosine_outputs, report.min_snr)
        lines.append(f"{role.name}: {role.role} ({role.why}) -> {rule}")
    return lines


def to_markdown(report: Report) -> str:
    out = [f"# graphopt report: {report.model}", "", f"- data: {report.data}"]
    if report.synthetic:
        out.append("- **synthetic inputs: the metrics say nothing about accuracy**")
    gate = _gate_text(report).replace("<=", "≤").replace(">=", "≥")
    out.append(f"- gate: {gate}: **{'passed' if report.passed else 'failed'}**")
    out += [f"  - {line.replace('->', '→')}" for line in judged(report)]
    if report.output:
        out.append(f"- output: `{report.output}`")
    if report.machine:
        out.append(f"- machine: {report.machine} (every latency was measured here)")
    if report.target_cpu:
        out.append(f"- target CPU: {report.target_cpu}")
    out += ["", "| " + " | ".join(header(report)) + " |", "|" + "---|" * len(HEADER)]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in r) + " |" for r in table_rows(report)]
    for row in report.passes:
        if not (row.rows or row.notes or row.reason):
            continue
        out += ["", f"## {row.step} ({row.status})"]
        if row.reason:
            out.append(f"- {row.reason}")
        out += [f"- {note}" for note in row.notes]
        if row.rows:
            keys = list(dict.fromkeys(k for r in row.rows for k in r))
            out += ["", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            for r in row.rows[:200]:
                out.append("| " + " | ".join(str(json_safe(r.get(k, ""))) for k in keys) + " |")
            if len(row.rows) > 200:
                out.append(f"\n({len(row.rows) - 200} more rows in the JSON report)")
    return "\n".join(out) + "\n"
