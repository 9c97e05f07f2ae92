"""Measured sensitivity: what each candidate edit (a layer pruned, quantized, factorized …) does to the gate
metric on calibration samples, and the greedy allocation of a global budget over those measurements.

Modules, bottom to top: suffix (runs only the part of the model after an edit, on captured activations),
measurement (the candidates, their rows and tables, baselines, combinations and allocation).
"""

from __future__ import annotations

from graphopt.sensitivity.measurement import (Candidate, SensitivityRow, SensitivityTable, allocate, baseline,
                                          combined_snr_db, greedy_budget, measure, measure_combination, row_loss,
                                          sort_key, to_rows)

__all__ = ["Candidate", "SensitivityRow", "SensitivityTable", "allocate", "baseline", "combined_snr_db",
           "greedy_budget", "measure", "measure_combination", "row_loss", "sort_key", "to_rows"]
