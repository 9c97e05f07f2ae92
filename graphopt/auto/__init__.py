"""`graphopt auto`: from an exported model and samples to the smallest (or fastest) model inside an accuracy
budget, by a measured search over recipes.

Modules, bottom to top: space (the recipes a trial can choose), candidate (one recipe run through the verified
pipeline), workers (in this process or on Dask workers), pareto (the fronts, the Markdown report and the plot),
choose (the pick: judged on the held-out samples, never slower than the input), search (the Optuna study, the
outputs).
"""

from __future__ import annotations

from graphopt.auto.candidate import Candidate
from graphopt.auto.search import AutoResult, auto, summary

__all__ = ["AutoResult", "Candidate", "auto", "summary"]
