"""`graphopt auto`: search recipes with Optuna for the smallest (or fastest, or both) model inside the accuracy
budget.

The samples: ``data`` alone (or ``calib`` alone) is split once, with a fixed seed, into the samples the search
may look at (70%) and held-out samples it never sees (30%); with both, the search uses all of ``calib`` and the
held-out judgment all of ``data`` (as ``optimize`` calibrates on ``calib`` and evaluates on ``data``). Every
candidate is a recipe run through :func:`graphopt.optimize` on the search samples — checker, onnxruntime, gate,
rollback, latency guard — so it loads, runs and stays inside the budget there. The original model (exact passes
only) is always the first candidate, so the pick is never worse than the input on the objective. The pick is
judged once on the held-out samples and timed against the input (:mod:`graphopt.auto.choose`: a pick outside the
budget there, or slower, is passed over for the next best); that number is reported and sets the exit code.
With ``study`` (an Optuna storage file, SQLite) the search state and the candidates' files survive a kill and
a rerun goes on where it stopped; Ctrl-C or the time budget ends the search and still writes the best so far.
A trial is asked from Optuna whenever a worker is free (:mod:`graphopt.auto.workers`); Optuna's TPE sampler then
sees the running trials as constant liars.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import optuna
import yaml
from tqdm.auto import tqdm

from graphopt import bench, data as datamod, modelio
from graphopt.auto import candidate, pareto, space
from graphopt.auto import workers as workers_mod
from graphopt.auto.candidate import Candidate
from graphopt.auto.choose import Judge, choose, passed_over_text
from graphopt.errors import GraphoptError
from graphopt.formatting import human, json_safe
from graphopt.latency import batch_one
from graphopt.metrics import metric_for_gate
from graphopt.pipeline import machine_line
from graphopt.recipe import parse_text

HOLDOUT_FRACTION = 0.3
HOLDOUT_SEED = 0
MAX_REPEATS = 50  # trials in a row that only repeated earlier recipes: the search space is spent
_clock = time.perf_counter  # the search's wall clock (tests replace it)


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
    holdout_spread: float = 0.0  # the standard error the held-out accuracy drop was judged with (Verdict.spread)
    interrupted: bool = False
    machine: str = ""
    where: str = ""  # where the candidates ran (this process, Dask workers)
    fronts: dict[str, Any] = dataclasses.field(default_factory=dict)  # Pareto fronts (candidate numbers), plot
    samples: dict[str, str] = dataclasses.field(default_factory=dict)  # the search's and held-out samples' sources
    # better candidates the judgement passed over, with why (outside the budget on the held-out samples, slower)
    failed_holdout: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    stopped: list[str] = dataclasses.field(default_factory=list)  # recipes still running when the time ran out

    def to_dict(self) -> dict[str, Any]:
        return json_safe(dataclasses.asdict(self))


def _study(objective: str, storage: str | None, model: Path) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = f"graphopt-auto-{model.stem}-{objective}"
    return optuna.create_study(direction="minimize", storage=storage, study_name=name, load_if_exists=True,
                               sampler=optuna.samplers.TPESampler(seed=0, constant_liar=True))


def _recipe_yaml(rec: str) -> str:
    steps = [{s.name: s.raw} if s.raw else s.name for s in parse_text(rec)]
    return yaml.safe_dump({"passes": steps}, sort_keys=False)


def auto(model: str | os.PathLike, output: str | os.PathLike | None = None, *, data: Any = None, calib: Any = None,
         max_drop: float = 0.01, objective: str = "size", trials: int = 20, time_budget: float | None = None,
         study: str | os.PathLike | None = None, metric: str | None = None, metric_fn: Any = None, threads: int = 1,
         workers: int | None = None, scheduler: str | None = None, progress: bool = True) -> AutoResult:
    """Search recipes for ``model``; write the pick to ``output`` (default ``<stem>.auto.onnx`` here), the
    recipe beside it (``.yaml``), the search samples (``.calib.npz``, to reproduce it with
    ``graphopt optimize MODEL --recipe R --calib C``) and the report (``.json``, ``.md``, ``.png``).
    ``data``/``calib``: see the module's docstring. ``objective``: size (bytes after lzma), latency (to the
    original), or balanced (the geometric mean of both ratios). ``time_budget``: seconds.
    ``metric_fn``: the user's score (:mod:`graphopt.metrics.task`); the budget is then on it."""
    _check_arguments(objective, max_drop, trials, time_budget)
    task = metric_for_gate(metric, metric_fn)
    model = Path(model)
    output = Path(output) if output is not None else Path.cwd() / f"{model.stem}.auto.onnx"
    modelio.check_output_path(model, output)
    loaded = modelio.load_model(model)
    specs = datamod.input_specs(loaded)
    search, holdout = _samples(data, calib, specs)
    del loaded
    original_bytes = bench.file_sizes(model)[1]
    storage = f"sqlite:///{Path(study).resolve()}" if study is not None else None
    kept_dir = Path(study).with_suffix(".candidates") if study is not None else None
    pool = workers_mod.executor(workers, scheduler, timed=objective in space.TIMED)
    try:
        with tempfile.TemporaryDirectory(prefix="graphopt-auto-") as tmp:
            folder = kept_dir or Path(tmp)
            folder.mkdir(parents=True, exist_ok=True)

            def job(number: int, rec: str) -> candidate.Job:
                return candidate.Job(model, folder, number, rec, search, objective, max_drop, metric, threads, task,
                                     original_bytes)

            opt_study = _study(objective, storage, model)
            end = _search(opt_study, pool, job, objective, max_drop, trials, time_budget, progress)
            candidates = [Candidate(**t.user_attrs["candidate"]) for t in opt_study.trials
                          if "candidate" in t.user_attrs]
            if not candidates:
                raise GraphoptError("auto: no candidate finished (the time budget ran out during the first)")

            def file_of(cand: Candidate) -> tuple[Candidate, Path]:
                pick = folder / f"candidate{cand.file_number}.onnx"
                if not pick.exists():  # a resumed study whose files were not kept: rebuild it from its recipe
                    cand = candidate.run(job(cand.file_number, cand.recipe))
                return cand, pick

            judge = Judge(model, holdout, max_drop, metric, threads, task, batch_one(specs, holdout.feeds[:4]))
            original = space.recipe(space.original(objective), objective, max_drop)
            chosen, pick, verdict, passed_over = choose(candidates, objective, original, judge, file_of)
            gate_metric = judge.gate.metric
            _write(pick, output)
    finally:
        pool.close()
    result = AutoResult(str(model), str(output), str(output.with_suffix(".yaml")), objective, max_drop, gate_metric,
                        original_bytes, candidates, chosen, verdict.holdout, verdict.accurate,
                        round(verdict.latency.value, 4), verdict.spread, end.interrupted, machine_line(), pool.where,
                        samples={"search": search.source, "holdout": holdout.source}, failed_holdout=passed_over,
                        stopped=end.stopped)
    output.with_suffix(".yaml").write_text(_recipe_yaml(chosen.recipe))
    _save_samples(search, output.with_suffix(".calib.npz"))
    result.fronts = pareto.report_files(output, candidates, gate_metric, chosen, summary(result), objective)
    output.with_suffix(".json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def _samples(data: Any, calib: Any, specs: list) -> tuple[datamod.Dataset, datamod.Dataset]:
    """(search, held-out): one source split 70/30, or ``calib`` for the search and ``data`` held out whole."""
    if data is None and calib is None:
        raise GraphoptError("auto needs samples: give --data (split into search and held-out parts), or --calib "
                            "(the search's) and --data (held out)")
    if data is None or calib is None:
        source = data if data is not None else calib
        return datamod.split(datamod.load_data(source, specs), HOLDOUT_FRACTION, HOLDOUT_SEED)
    if isinstance(data, (str, os.PathLike)) and isinstance(calib, (str, os.PathLike)) and \
            Path(data).resolve() == Path(calib).resolve():  # the judgment would see the search's samples
        raise GraphoptError(f"--calib and --data are the same ({data}): the held-out samples must be ones the "
                            "search never saw; give only --data to split it")
    return datamod.load_data(calib, specs), datamod.load_data(data, specs)


def _check_arguments(objective: str, max_drop: float, trials: int, time_budget: float | None) -> None:
    if objective not in space.OBJECTIVES:
        raise GraphoptError(f"--objective {objective}: expected one of {', '.join(space.OBJECTIVES)}")
    if not 0.0 <= max_drop <= 1.0:
        raise GraphoptError(f"--max-drop {max_drop}: expected a fraction between 0 and 1 (0.01 = one point)")
    if trials < 1:
        raise GraphoptError(f"--trials {trials}: expected at least 1")
    if time_budget is not None and not time_budget > 0:
        raise GraphoptError(f"--time-budget {time_budget}: expected a positive number of seconds")


@dataclasses.dataclass
class SearchEnd:
    """How the search ended: Ctrl-C, and the recipes the time budget stopped unfinished."""

    interrupted: bool = False
    stopped: list[str] = dataclasses.field(default_factory=list)


def _search(opt_study: optuna.Study, pool: Any, job: Callable[[int, str], candidate.Job], objective: str,
            max_drop: float, trials: int, time_budget: float | None, progress: bool) -> SearchEnd:
    """Keep every slot of the pool busy: ask Optuna for a trial whenever a slot is free, start it, tell its result
    when it finishes; until ``trials`` candidates were built or the time budget is spent, or Ctrl-C. A candidate
    starts only while the budget has time left for one as quick as the quickest built so far (the original
    aside: exact passes only), so a search of slow candidates does not start one it cannot finish (PP-OCRv4 rec:
    a fourth candidate started at 1,081 s made a 1,200 s search take 1,906 s); one still running when the budget
    is spent is stopped, and its trial fails (PP-OCRv4 rec, AMX host: a channel-pruning candidate started at
    650 s took 940 s, so a 1,200 s search ran 1,585 s).
    A recipe tried before is not run again: the trial gets the earlier result and does not count (measured on
    digits: 21 of 60 trials repeated a recipe), unless MAX_REPEATS trials in a row did (the space is spent)."""
    if not opt_study.trials:
        for choices in [space.original(objective), *space.first(objective)]:
            opt_study.enqueue_trial(choices)
    seen = {t.user_attrs["candidate"]["recipe"]: Candidate(**t.user_attrs["candidate"]) for t in opt_study.trials
            if "candidate" in t.user_attrs and t.user_attrs["candidate"].get("same_as") is None}
    best = min(seen.values(), key=lambda c: c.value(objective), default=None)
    original = space.recipe(space.original(objective), objective, max_drop)
    bar = tqdm(total=trials, desc="auto", unit="candidate", disable=not progress, leave=False)
    start, launched, repeats = _clock(), 0, 0
    running: list[tuple[Any, optuna.trial.Trial, str]] = []  # (the pool's handle, its trial, its recipe)
    waiting: list[tuple[optuna.trial.Trial, str]] = []  # trials repeating a recipe still running

    def tell(trial: optuna.trial.Trial, cand: Candidate) -> None:
        nonlocal best
        trial.set_user_attr("candidate", dataclasses.asdict(cand))
        opt_study.tell(trial, cand.value(objective))
        if cand.valid and (best is None or cand.value(objective) < best.value(objective)):
            best = cand
            bar.set_postfix_str(f"best #{best.number}: " + _value_text(best, objective))

    def seconds_left() -> float | None:
        return None if time_budget is None else time_budget - (_clock() - start)

    def time_left() -> bool:
        left = seconds_left()
        quickest = min((c.seconds for c in seen.values() if c.recipe != original and c.seconds > 0), default=0.0)
        return left is None or (left > 0 and left >= quickest)

    def fail(trials_left: list[optuna.trial.Trial]) -> None:
        for trial in trials_left:
            opt_study.tell(trial, state=optuna.trial.TrialState.FAIL)

    def repeat(trial: optuna.trial.Trial, earlier: Candidate) -> None:
        tell(trial, dataclasses.replace(earlier, number=trial.number, seconds=0.0, same_as=earlier.file_number))

    try:
        while True:
            while len(running) < pool.slots and launched < trials and repeats < MAX_REPEATS and time_left():
                trial = opt_study.ask()
                rec = space.recipe(space.suggest(trial, objective) if trial.number else space.original(objective),
                                   objective, max_drop, pool.channel_block)
                if rec in seen:
                    repeat(trial, seen[rec])
                    repeats += 1
                elif any(rec == r for _, _, r in running):
                    waiting.append((trial, rec))
                    repeats += 1
                else:
                    running.append((pool.start(job(trial.number, rec)), trial, rec))
                    launched, repeats = launched + 1, 0
            if not running:
                break
            finished = pool.wait_any([h for h, _, _ in running], seconds_left())
            if not finished:  # the time budget is spent: what still runs is stopped
                pool.cancel([h for h, _, _ in running])
                fail([t for _, t, _ in running] + [t for t, _ in waiting])
                return SearchEnd(stopped=[r for _, _, r in running])
            for handle, cand in finished:
                trial = next(t for h, t, _ in running if h is handle)
                running = [r for r in running if r[0] is not handle]
                seen.setdefault(cand.recipe, cand)
                tell(trial, cand)
                bar.update(1)
                for other, rec in [w for w in waiting if w[1] == cand.recipe]:
                    repeat(other, cand)
                waiting = [w for w in waiting if w[1] != cand.recipe]
    except KeyboardInterrupt:
        pool.cancel([h for h, _, _ in running])
        fail([t for _, t, _ in running] + [t for t, _ in waiting])
        return SearchEnd(interrupted=True)
    finally:
        bar.close()
    return SearchEnd()


def _value_text(cand: Candidate, objective: str) -> str:
    if objective == "size":
        return human(cand.lzma_bytes, "B") if cand.lzma_bytes is not None else "-"
    return f"x{cand.value(objective):.3f}"


def summary(result: AutoResult) -> list[str]:
    """The lines the CLI prints and the Markdown report starts with."""
    chosen = result.chosen
    smaller = result.original_lzma_bytes / chosen.lzma_bytes if chosen.lzma_bytes else float("nan")
    held = result.holdout.get(result.metric) if result.metric != "snr" else result.holdout.get("worst_snr_db")
    ref = result.holdout.get(f"reference_{result.metric}") if result.metric in ("accuracy", "task") else None
    samples = result.holdout.get("samples") or 0
    coarse = (f"; one held-out sample is {1 / samples:.2%}, more than the budget: give more samples"
              if result.metric in ("accuracy", "agreement") and samples and 1 / samples > result.max_drop else "")
    spread = result.holdout_spread
    spread_text = (f"; drop judged with one standard error {spread:.4f} from the "
                   f"{1 - result.holdout['agreement']:.1%} of predictions that changed" if spread else "")
    built = sum(c.same_as is None for c in result.candidates)
    repeated = f" ({len(result.candidates) - built} more repeated a recipe)" if built < len(result.candidates) else ""
    stopped = f" ({len(result.stopped)} more stopped unfinished by the time budget)" if result.stopped else ""
    return [f"{built} candidates{repeated}{stopped}" + (" (interrupted)" if result.interrupted else "")
            + f" on {result.where}; chosen #{chosen.number} ({result.objective} {_value_text(chosen, result.objective)}"
            + f"): {chosen.recipe}",
            f"size after lzma {human(chosen.lzma_bytes, 'B')} ({smaller:.2f}x smaller than the original's "
            f"{human(result.original_lzma_bytes, 'B')}); latency x{result.latency_ratio:.3f} (batch 1)",
            f"held-out samples: {result.metric} {held}" + (f" (original {ref})" if ref is not None else "")
            + f": {'PASSED' if result.passed else 'FAILED'} (max drop {result.max_drop:g}){spread_text}{coarse}"
            + passed_over_text(result.failed_holdout),
            f"machine: {result.machine}"]


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
