"""The recipes `graphopt auto` searches: one Optuna trial's choices → a recipe string.

Each objective searches the families that serve it, in the order they compose (prune before weight sharing,
sharing before int8: later passes skip the compressed forms earlier ones leave). Every pass carries the run's
``max_drop``, so a too-aggressive setting is rolled back by the pipeline and the candidate stays inside the
budget on the search samples.
"""

from __future__ import annotations

from typing import Any, Protocol

EXACT = ["fold_batchnorm", "fuse"]  # always: free wins, and the original's exact form
OBJECTIVES = ("size", "latency")


class Suggest(Protocol):
    def suggest_categorical(self, name: str, choices: list) -> Any: ...


def original(objective: str) -> dict[str, Any]:
    """The choices that give the original model back (exact passes only): always the first candidate."""
    if objective == "size":
        return {"prune": 0.0, "kmeans_bits": 0, "quantize": False}
    return {"quantize": False, "lowrank_macs": 1.0, "channel_ratio": 0.0}


def suggest(trial: Suggest, objective: str) -> dict[str, Any]:
    """The knobs of one candidate."""
    if objective == "size":
        choices = {"prune": trial.suggest_categorical("prune", [0.0, 0.3, 0.5, 0.7, 0.8]),
                   "kmeans_bits": trial.suggest_categorical("kmeans_bits", [0, 8, 6, 5, 4, 3]),
                   "quantize": trial.suggest_categorical("quantize", [False, True])}
        if choices["kmeans_bits"]:
            choices["kmeans_data_aware"] = trial.suggest_categorical("kmeans_data_aware", [False, True])
        return choices
    return {"quantize": trial.suggest_categorical("quantize", [False, True]),
            "lowrank_macs": trial.suggest_categorical("lowrank_macs", [1.0, 0.8, 0.6]),
            "channel_ratio": trial.suggest_categorical("channel_ratio", [0.0, 0.1, 0.2, 0.3])}


def recipe(choices: dict[str, Any], objective: str, max_drop: float) -> str:
    """The recipe string (`graphopt optimize --passes` grammar) for ``choices``."""
    steps = list(EXACT)
    budget = f"max_drop={max_drop:g}"
    if objective == "size":
        if choices.get("prune"):
            steps.append(f"prune:sparsity={choices['prune']:g},scope=global,{budget}")
        if choices.get("kmeans_bits"):
            aware = ",data_aware=true" if choices.get("kmeans_data_aware") else ""
            steps.append(f"kmeans:bits={choices['kmeans_bits']}{aware},{budget}")
        if choices.get("quantize"):
            steps.append(f"quantize:target=size,{budget}")
        return "; ".join(steps)
    if choices.get("channel_ratio"):
        steps.append(f"channel_prune:ratio={choices['channel_ratio']:g},scope=global,{budget}")
    if choices.get("lowrank_macs", 1.0) < 1.0:
        steps.append(f"lowrank:macs={choices['lowrank_macs']:g},{budget}")
    if choices.get("quantize"):
        steps.append(f"quantize:{budget}")
    return "; ".join(steps)
