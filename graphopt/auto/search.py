"""`graphopt auto`: search recipes with Optuna for the smallest (or fastest) model inside the accuracy budget.

The data is split once, with a fixed seed, into the samples the search may look at (70%) and held-out samples
it never sees (30%). Every candidate is a recipe run through :func:`graphopt.optimize` on the search samples —
checker, onnxruntime, gate, rollback, latency guard — so it loads, runs and stays inside the budget there. The
original model (exact passes only) is always the first candidate, so the pick is never worse than the input on
the objective. The pick is judged once on the held-out samples; that number is reported and sets the exit code.
With ``study`` (an Optuna storage file, SQLite) the search state and the candidates' files survive a kill and
a rerun goes on where it stopped; Ctrl-C or the time budget ends the search and still writes the best so far.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import yaml

from graphopt import bench, data as datamod, modelio
from graphopt.auto import space
from graphopt.errors import GraphoptError, first_line
from graphopt.formatting import json_safe
from graphopt.latency import batch_one
from graphopt.metrics import STRESS, Evaluator
from graphopt.pipeline import RunOptions, machine_line, optimize
from graphopt.recipe import parse_text
from graphopt.verify import Gate

HOLDOUT_FRACTION = 0.3
HOLDOUT_SEED = 0


@dataclasses.dataclass
class Candidate:
    """One trial: its recipe and what it gave on the search samples."""

    number: int
    recipe: str
    lzma_bytes: int | None = None
    latency_ratio: float | None = None  # to the original, timed by the pipeline (objective latency)
    search: dict[str, Any] | None = None  # the run's final comparison on the search samples
    seconds: float = 0.0
    error: str = ""

    def value(self, objective: str) -> float:
        if self.error or self.search is None:
            return math.inf
        if objective == "size":
            return float(self.lzma_bytes) if self.lzma_bytes is not None else math.inf
        return self.latency_ratio if self.latency_ratio is not None else 1.0


@dataclasses.dataclass
class AutoResult:
    model: str
    output: str
    recipe_path: str
    objective: str
    max_drop: float
    metric: str
    original_lzma_bytes: int  # the input file after lzma
    candidates: list[Candidate]
    chosen: Candidate
    holdout: dict[str, Any]  # the pick against the original on the held-out samples
    passed: bool  # the pick meets the budget on the held-out samples
    latency_ratio: float | None  # the pick against the original, batch 1, interleaved
    interrupted: bool = False
    machine: str = ""

    def to_dict(self) -> dict[str, Any]:
        return json_safe(dataclasses.asdict(self))


def _study(objective: str, storage: str | None, model: Path) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = f"graphopt-auto-{model.stem}-{objective}"
    return optuna.create_study(direction="minimize", storage=storage, study_name=name, load_if_exists=True,
                               sampler=optuna.samplers.TPESampler(seed=0))


def _run_candidate(model: Path, folder: Path, number: int, rec: str, search: Any, objective: str,
                   max_drop: float, metric: str | None, threads: int) -> Candidate:
    out = folder / f"candidate{number}.onnx"
    cand = Candidate(number, rec)
    start = time.perf_counter()
    try:
        report = optimize(str(model), out, passes=rec, calib=search, data=search, max_drop=max_drop, metric=metric,
                          run=RunOptions(threads=threads, latency=objective == "latency", progress=False))
        stressed = report.final_stressed_drop
        steady = stressed is None or stressed <= max_drop + 1e-9
        cand.search = report.final if report.passed and steady else None
        cand.lzma_bytes = bench.file_sizes(out)[1]
        kept = [r for r in report.passes if r.latency_ratio is not None]
        cand.latency_ratio = kept[-1].latency_ratio if kept else None
        if not report.passed:
            cand.error = "outside the budget on the search samples"
        elif not steady:
            cand.error = f"at the budget's edge: drop {stressed:.4f} with the output error x{STRESS:g}"
    except GraphoptError:
        raise
    except Exception as err:  # noqa: BLE001 - a candidate that breaks is a row, the search goes on
        cand.error = first_line(err)
    cand.seconds = round(time.perf_counter() - start, 2)
    return cand


def _recipe_yaml(rec: str) -> str:
    steps = [{s.name: s.raw} if s.raw else s.name for s in parse_text(rec)]
    return yaml.safe_dump({"passes": steps}, sort_keys=False)


def _judge(model: Path, pick: Path, holdout: Any, max_drop: float, metric: str | None, threads: int
           ) -> tuple[dict[str, Any], bool, str]:
    evaluator = Evaluator(str(model), holdout, threads=threads)
    gate, _ = Gate(metric, max_drop, None).resolved(evaluator.evaluate(str(model)))
    comparison = evaluator.evaluate(str(pick))
    return comparison.to_dict(), gate.failure(comparison, max_drop) is None, gate.metric


def auto(model: str | os.PathLike, output: str | os.PathLike | None = None, *, data: Any = None, calib: Any = None,
         max_drop: float = 0.01, objective: str = "size", trials: int = 20, time_budget: float | None = None,
         study: str | os.PathLike | None = None, metric: str | None = None, threads: int = 1,
         progress: bool = True) -> AutoResult:
    """Search recipes for ``model``; write the pick to ``output`` (default ``<stem>.auto.onnx`` here), the
    recipe beside it (``.yaml``), the search split's samples (``.calib.npz``, to reproduce it with
    ``graphopt optimize MODEL --recipe R --calib C``) and the report (``.json``, ``.md``)."""
    if objective not in space.OBJECTIVES:
        raise GraphoptError(f"--objective {objective}: expected one of {', '.join(space.OBJECTIVES)}")
    if not 0.0 <= max_drop <= 1.0:
        raise GraphoptError(f"--max-drop {max_drop}: expected a fraction between 0 and 1 (0.01 = one point)")
    if trials < 1:
        raise GraphoptError(f"--trials {trials}: expected at least 1")
    source = data if data is not None else calib
    if source is None:
        raise GraphoptError("auto needs samples: give --data (it is split into search and held-out parts)")
    model = Path(model)
    output = Path(output) if output is not None else Path.cwd() / f"{model.stem}.auto.onnx"
    modelio.check_output_path(model, output)
    loaded = modelio.load_model(model)
    specs = datamod.input_specs(loaded)
    search, holdout = datamod.split(datamod.load_data(source, specs), HOLDOUT_FRACTION, HOLDOUT_SEED)
    del loaded
    storage = f"sqlite:///{Path(study).resolve()}" if study is not None else None
    kept_dir = Path(study).with_suffix(".candidates") if study is not None else None
    with tempfile.TemporaryDirectory(prefix="graphopt-auto-") as tmp:
        folder = kept_dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        opt_study = _study(objective, storage, model)
        if not opt_study.trials:
            opt_study.enqueue_trial(space.original(objective))

        def run_trial(trial: optuna.Trial) -> float:
            choices = space.suggest(trial, objective) if trial.number else space.original(objective)
            rec = space.recipe(choices, objective, max_drop)
            cand = _run_candidate(model, folder, trial.number, rec, search, objective, max_drop, metric, threads)
            trial.set_user_attr("candidate", dataclasses.asdict(cand))
            return cand.value(objective)

        interrupted = False
        try:
            opt_study.optimize(run_trial, n_trials=trials, timeout=time_budget, show_progress_bar=progress)
        except KeyboardInterrupt:
            interrupted = True
        candidates = [Candidate(**t.user_attrs["candidate"]) for t in opt_study.trials if "candidate" in t.user_attrs]
        if not candidates:
            raise GraphoptError("auto: no candidate finished (the time budget ran out during the first)")
        chosen = min(candidates, key=lambda c: (c.value(objective), c.number))
        pick = folder / f"candidate{chosen.number}.onnx"
        if not pick.exists():  # a resumed study whose files were not kept: rebuild the pick from its recipe
            chosen = _run_candidate(model, folder, chosen.number, chosen.recipe, search, objective, max_drop,
                                    metric, threads)
        holdout_cmp, passed, gate_metric = _judge(model, pick, holdout, max_drop, metric, threads)
        feeds = batch_one(specs, holdout.feeds[:4])
        ratio = bench.benchmark([str(model), str(pick)], feeds, threads=threads, stats=False)[1].ratio
        _write(pick, output)
    result = AutoResult(str(model), str(output), str(output.with_suffix(".yaml")), objective, max_drop, gate_metric,
                        bench.file_sizes(model)[1], candidates, chosen,
                        holdout_cmp, passed, round(ratio, 4), interrupted, machine_line())
    output.with_suffix(".yaml").write_text(_recipe_yaml(chosen.recipe))
    _save_samples(search, output.with_suffix(".calib.npz"))
    output.with_suffix(".json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def _write(pick: Path, output: Path) -> None:
    """The pick's file, byte for byte, renamed into place at ``output``; a model with external data is
    re-saved instead (its data file is named after the output)."""
    if pick.with_name(pick.name + ".data").exists():
        modelio.save_model(modelio.load_model(pick), output)
        return
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.copyfile(pick, tmp)
    os.replace(tmp, output)


def _save_samples(dataset: Any, path: Path) -> None:
    """The search samples as one .npz (inputs by name, ``labels``), when their feeds stack."""
    try:
        arrays = datamod.concat_feeds(dataset.feeds)
    except ValueError:  # feeds of different shapes (a folder of feeds): nothing to stack
        return
    if dataset.labels is not None:
        arrays[datamod.LABELS] = dataset.labels
    np.savez(path, **arrays)
