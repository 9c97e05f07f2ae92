"""The pass base: a registered name, typed options, a data context, and a typed result with rows.

A pass is an ``onnx_ir.passes.InPlacePass``: ``call(model)`` rewrites the model in place. What a pass needs
beyond the model (calibration feeds, the original model as teacher, the run's gate settings) arrives at
construction through :class:`PassContext`; passes never read files themselves.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import onnx_ir as ir

from graphopt import modelio, runtime
from graphopt.cpu import Target, resolve_target
from graphopt.errors import GraphoptError
from graphopt.metrics import Evaluator, TaskMetric
from graphopt.metrics.recorded import remember
from graphopt.options import BaseOptions

if TYPE_CHECKING:
    from graphopt.data import Dataset
    from graphopt.latency import LatencyProbe

# metadata_props key on rewritten nodes naming the pass that made them (provenance).
PROVENANCE_KEY = "graphopt.pass"


@dataclasses.dataclass
class PassContext:
    """What data-aware passes get: calibration feeds, the teacher, and the run's gate settings."""

    calib: Dataset | None = None
    teacher: ir.Model | None = None  # the original model after canonicalize; never modified
    threads: int = 1
    metric: str = "agreement"  # the gate metric: accuracy | agreement | snr
    score_output: str | None = None
    map_threshold: float = 0.5  # agreement on a one-channel score map (metrics.MAP_THRESHOLD)
    max_drop: float | None = None  # the budget this pass aims for (its own option, else the run's)
    min_snr: float | None = None  # the worst-channel SNR floor (dB) the gate holds, when it has one
    progress: bool = False
    target: Target = dataclasses.field(default_factory=resolve_target)  # the CPU the model is built for
    latency: LatencyProbe | None = None  # times rewrites a pass chooses between (None: timing is off)
    # The user's metric function, when the run's budget is on it (``metric`` is then graphopt's own choice, for
    # layer-by-layer measurements), and its score on the original model. Budget searches check whole models on it.
    task: TaskMetric | None = None
    task_reference: float | None = None
    # A recorded session of a model computing the teacher's outputs (the pipeline's reference, when canonicalize
    # left its outputs unchanged): teacher_session() returns it, so the whole run records the original once.
    shared_teacher_session: Any = None
    # Evaluators against the teacher, by how many calibration samples they read (None: all); the teacher is
    # fixed for a context, so they are built once per pass. Not an init field: dataclasses.replace() with
    # another teacher or calib gets an empty cache of its own.
    _evaluators: dict[int | None, Evaluator] = dataclasses.field(default_factory=dict, repr=False, init=False)
    _teacher_session: Any = dataclasses.field(default=None, repr=False, init=False)  # likewise, built once

    def require_calib(self, pass_name: str) -> Dataset:
        if self.calib is None or self.calib.synthetic:
            raise GraphoptError(
                f"pass {pass_name!r} needs real calibration data: give --calib or --data "
                "(synthetic inputs say nothing about the activations it must fit)"
            )
        return self.calib

    def calib_evaluator(self, max_samples: int | None = None) -> Evaluator:
        """Compares candidates with the teacher on the calibration data, or its first ``max_samples``
        (for sensitivity and budgets)."""
        if max_samples not in self._evaluators:
            if self.teacher is None or self.calib is None:
                raise GraphoptError("this pass needs the teacher model and calibration data in its context")
            data = self.calib if max_samples is None else self.calib.head(max(1, int(max_samples)))
            self._evaluators[max_samples] = Evaluator(self.teacher, data, threads=self.threads,
                                                      score_output=self.score_output,
                                                      map_threshold=self.map_threshold)
        return self._evaluators[max_samples]

    def teacher_session(self) -> Any:
        """An onnxruntime session of the teacher (what a stressed task score runs beside each candidate)."""
        if self.shared_teacher_session is not None:
            return self.shared_teacher_session
        if self._teacher_session is None:
            if self.teacher is None:
                raise GraphoptError("this pass needs the teacher model in its context")
            # recorded: every stressed score of the pass runs the teacher on the same feeds
            self._teacher_session = remember(runtime.make_session(modelio.to_proto(self.teacher),
                                                                  threads=self.threads))
        return self._teacher_session


@dataclasses.dataclass
class GraphoptResult(ir.passes.PassResult):
    """Whether the model changed, plus one row per rewritten node/initializer and free-text notes."""

    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


class GraphoptPass(ir.passes.InPlacePass):
    """Base of every graphopt pass. Subclasses set ``name``, ``summary``, ``Options`` and ``call``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = BaseOptions
    data_required: ClassVar[bool] = False  # True: refuses to run without real calibration data (any options)
    exact: ClassVar[bool] = False  # True: outputs are unchanged up to float rounding
    size_objective: ClassVar[bool] = False  # True: trades speed for size, so the latency guard lets it be slower

    def __init__(self, options: Any = None, context: PassContext | None = None) -> None:
        super().__init__()
        self.options = options if options is not None else self.Options()
        self.context = context if context is not None else PassContext()

    @classmethod
    def needs_data(cls, options: Any) -> str | None:
        """Why this pass, with these options, needs real calibration data; None when it does not. The pipeline
        asks before the first pass runs, so a run never stops half-way for want of data."""
        return "it calibrates on data" if cls.data_required else None

    def accepts_slower(self) -> bool:
        """Whether this pass, with these options, aims at size: the pipeline keeps it even when slower."""
        return self.size_objective

    def result(self, model: ir.Model, rows: list[dict] | None = None, notes: list[str] | None = None,
               modified: bool | None = None) -> GraphoptResult:
        rows = rows or []
        return GraphoptResult(model, bool(rows) if modified is None else modified, rows, notes or [])

    def mark(self, node: ir.Node) -> ir.Node:
        """Record provenance on a node this pass created or rewrote."""
        node.metadata_props[PROVENANCE_KEY] = self.name
        return node
