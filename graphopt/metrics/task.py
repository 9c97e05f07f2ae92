"""The user's own yardstick: a function that scores a model on the user's task (recall, CER, box F1, revenue).

``fn(session) -> float`` gets an onnxruntime ``InferenceSession`` of the candidate and returns one number,
higher is better (return ``-cer`` for an error rate). The budget (``max_drop``) is then on that number: the
original's score minus the candidate's, in the score's own units. A function that also takes a keyword
``holdout`` is called with ``holdout=True`` once, for `graphopt auto`'s final judgement, and ``holdout=False``
during the search, so it can keep samples the search never scores (as graphopt's own held-out split does).

On the command line, ``--metric-fn module:function`` (a module importable from the working directory) or
``--metric-fn path/to/file.py:function``. A metric given by that text is re-imported where it is unpickled,
so it travels to Dask worker processes by name.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import math
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from graphopt.errors import GraphoptError, first_line
from graphopt.metrics.recorded import recorded, run_replaced
from graphopt.metrics.compare import STRESS  # the stressed agreement's safety factor, for the stressed score

__all__ = ["TaskMetric", "load_metric_fn", "metric_for_gate", "task_metric"]


@dataclasses.dataclass(frozen=True)
class TaskMetric:
    fn: Callable[..., float]
    name: str
    spec: str | None = None  # "module:function" when loaded from text: pickled by name
    holdout: bool = False  # the call is the final judgement on samples the search never scored

    def score(self, session: Any) -> float:
        """The function's number for ``session``; one clear error line when it fails or is not a finite number."""
        try:
            value = self.fn(session, holdout=self.holdout) if _takes_holdout(self.fn) else self.fn(session)
        except GraphoptError:
            raise
        except Exception as err:  # the user's code: any failure is theirs to read in one line
            raise GraphoptError(f"metric function {self.name} failed: {first_line(err)}") from None
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise GraphoptError(f"metric function {self.name} returned {type(value).__name__}, expected a number "
                                "(higher is better)") from None
        if not math.isfinite(number):
            raise GraphoptError(f"metric function {self.name} returned {number}, expected a finite number")
        return number

    def stressed_score(self, candidate: Any, reference: Any) -> float:
        """The function's number for ``candidate`` with its outputs' error from ``reference`` (a session of the
        original) made STRESS times larger: the task's analogue of the stressed agreement. A search that stops
        where the user's number just holds stops where unseen samples break it; this keeps it off that edge.
        The function gets the candidate's session itself, its ``run`` stressed for the call (a function that
        checks the session's type still sees an InferenceSession)."""
        with run_replaced(candidate, stressed_run(candidate.run, reference)):
            return self.score(candidate)

    def scores(self, candidate: Any, reference: Any) -> tuple[float, float]:
        """:meth:`score` and :meth:`stressed_score` of ``candidate``, each of its runs done once (recorded
        between the two; see graphopt.metrics.recorded)."""
        with recorded(candidate):
            return self.score(candidate), self.stressed_score(candidate, reference)

    def judging(self) -> TaskMetric:
        """This metric for the final held-out judgement."""
        return dataclasses.replace(self, holdout=True)

    def __reduce__(self):
        if self.spec is not None:  # by name: a function from a file is not importable in another process
            return (_reload, (self.spec, self.holdout))
        return (TaskMetric, (self.fn, self.name, None, self.holdout))


def stressed_run(run: Callable, reference: Any) -> Callable:
    """A session's ``run`` whose float outputs are the reference's plus STRESS times their difference from it (the
    reference run on the same feed); other outputs are the candidate's own."""

    def stressed(output_names, input_feed, run_options=None):
        outputs = run(output_names, input_feed, run_options)
        refs = reference.run(output_names, input_feed, run_options)
        if len(refs) != len(outputs):
            return outputs
        return [r + STRESS * (c - r) if _stressable(c, r) else c for c, r in zip(outputs, refs)]

    return stressed


def _stressable(candidate: Any, reference: Any) -> bool:
    return (isinstance(candidate, np.ndarray) and isinstance(reference, np.ndarray)
            and candidate.shape == reference.shape and np.issubdtype(candidate.dtype, np.floating)
            and np.issubdtype(reference.dtype, np.floating))


def _reload(spec: str, holdout: bool) -> TaskMetric:
    return dataclasses.replace(load_metric_fn(spec), holdout=holdout)


def _takes_holdout(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: called with the session only
        return False
    return "holdout" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def load_metric_fn(spec: str) -> TaskMetric:
    """``module:function`` or ``path/to/file.py:function`` → the metric; one error line when it is not there."""
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr.isidentifier():
        raise GraphoptError(f"--metric-fn {spec}: expected module:function or path/to/file.py:function")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise GraphoptError(f"--metric-fn {spec}: {path} is not a file")
            module_spec = importlib.util.spec_from_file_location(f"graphopt_metric_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))  # as `python -m` would: modules beside the user
            module = importlib.import_module(where)
    except GraphoptError:
        raise
    except Exception as err:  # the user's module: an import error or a bug at import time
        raise GraphoptError(f"--metric-fn {spec}: cannot import {where}: {first_line(err)}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise GraphoptError(f"--metric-fn {spec}: {where} has no function {attr}")
    return TaskMetric(fn, spec, spec)


def task_metric(metric_fn: Any) -> TaskMetric | None:
    """What ``metric_fn=`` accepts: None, a callable, ``"module:function"`` text, or a TaskMetric."""
    if metric_fn is None or isinstance(metric_fn, TaskMetric):
        return metric_fn
    if isinstance(metric_fn, str):
        return load_metric_fn(metric_fn)
    if callable(metric_fn):
        return TaskMetric(metric_fn, getattr(metric_fn, "__qualname__", repr(metric_fn)))
    raise GraphoptError(f"metric_fn: expected a function of an onnxruntime session, got {type(metric_fn).__name__}")


def metric_for_gate(metric: str | None, metric_fn: Any) -> TaskMetric | None:
    """The user's metric function for a run whose ``--metric`` is ``metric`` (None without one), after the same
    refusals for the API as for the CLI."""
    task = task_metric(metric_fn)
    if metric is not None and metric not in ("accuracy", "agreement", "cosine", "snr", "task"):
        raise GraphoptError(f"--metric {metric}: expected accuracy, agreement, cosine or snr (or --metric-fn)")
    if metric == "task" and task is None:
        raise GraphoptError("--metric task needs --metric-fn module:function (the function that scores a model)")
    if task is not None and metric not in (None, "task"):
        raise GraphoptError(f"--metric {metric} and --metric-fn: the budget is on one of them; give one")
    return task
