"""Comparing a candidate model's outputs with the original's: per-channel SNR, cosine, agreement, accuracy.

Modules, bottom to top: channels (the streaming per-channel accumulator and its statistics), vectors (cosine per
vector: embeddings, hidden states), task (the user's own metric function), recorded
(sessions whose runs are remembered by feed, for that function's repeated scores), roles (what each output is: class
scores, features or values, read from the graph), compare (the Comparison of two models' outputs), evaluator (the
Evaluator that caches the original's outputs and compares candidates with them).
"""

from __future__ import annotations

from graphopt.metrics.channels import SNR_CAP, OutputMetrics, cosine, snr_db
from graphopt.metrics.vectors import VectorCosines
from graphopt.metrics.task import TaskMetric, load_metric_fn, metric_for_gate, task_metric
from graphopt.metrics.roles import FEATURES, SCORES, VALUES, OutputRole, graph_evidence, output_roles, rule_of
from graphopt.metrics.compare import (MAP_THRESHOLD, METRICS, NO_SCORES, STRESS, WORST_SAMPLE_SLACK, Accumulator,
                                      Comparison, compare, split_labels)
from graphopt.metrics.evaluator import Evaluator

__all__ = ["FEATURES", "MAP_THRESHOLD", "METRICS", "NO_SCORES", "SCORES", "SNR_CAP", "STRESS", "VALUES",
           "WORST_SAMPLE_SLACK", "Accumulator", "Comparison", "Evaluator", "OutputMetrics", "OutputRole", "TaskMetric",
           "VectorCosines", "compare", "cosine", "graph_evidence", "load_metric_fn", "metric_for_gate",
           "output_roles", "rule_of", "snr_db", "split_labels", "task_metric"]
