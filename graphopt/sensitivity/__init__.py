"""Measured sensitivity: what each candidate edit (a layer pruned, quantized, factorized …) does to the gate
metric on calibration samples, and the greedy allocation of a global budget over those measurements.

Modules, bottom to top: suffix (runs only the part of the model after an edit, on captured activations),
measurement (the candidates, their rows and tables, baselines, combinations and allocation), budget (the most
compression a table allows inside the run's accuracy budget, found by whole-model checks along a
gentle-to-aggressive path).
"""

from __future__ import annotations

from graphopt.sensitivity.measurement import (Candidate, SensitivityRow, SensitivityTable, allocate, baseline,
                                          combined_snr_db, coverage_order, greedy_budget, measure,
                                          measure_combination, row_loss, sort_key, to_rows)
from graphopt.sensitivity.budget import Ladder, check_text, frontier, furthest, holds, seek_budget

__all__ = ["Candidate", "Ladder", "SensitivityRow", "SensitivityTable", "allocate", "baseline", "check_text",
           "combined_snr_db", "coverage_order", "frontier", "furthest", "greedy_budget", "holds", "measure",
           "measure_combination", "row_loss", "seek_budget", "sort_key", "to_rows"]
