"""`graphopt auto`: from an exported model and samples to the smallest (or fastest) model inside an accuracy
budget, by a measured search over recipes.

Modules, bottom to top: space (the recipes a trial can choose), search (the Optuna study, the candidates run
through the verified pipeline, the held-out judgment, the outputs).
"""

from __future__ import annotations

from graphopt.auto.search import AutoResult, Candidate, auto

__all__ = ["AutoResult", "Candidate", "auto"]
