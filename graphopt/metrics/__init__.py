"""Comparing a candidate model's outputs with the original's: per-channel SNR, cosine, agreement, accuracy.

Modules, bottom to top: channels (the streaming per-channel accumulator and its statistics), compare (the
Comparison of two models on a Dataset, and the Evaluator that caches the original's outputs), task (the user's
own metric function).
"""

from __future__ import annotations

from graphopt.metrics.channels import SNR_CAP, OutputMetrics, cosine, snr_db
from graphopt.metrics.compare import (MAP_THRESHOLD, METRICS, STRESS, Accumulator, Comparison, Evaluator, compare,
                                      split_labels)
from graphopt.metrics.task import TaskMetric, load_metric_fn, metric_for_gate, task_metric

__all__ = ["MAP_THRESHOLD", "METRICS", "SNR_CAP", "STRESS", "Accumulator", "Comparison", "Evaluator", "OutputMetrics",
           "TaskMetric", "compare", "cosine", "load_metric_fn", "metric_for_gate", "snr_db", "split_labels", "task_metric"]
