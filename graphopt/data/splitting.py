"""load_data (any source into a checked Dataset), the calibration/evaluation split, and resolve (what a run
uses for each)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from graphopt.data.dataset import Dataset, FeedReader, chunk_arrays, concat_feeds
from graphopt.data.sources import (
    InputSpec,
    check_feed,
    from_arrays,
    from_reader,
    load_folder,
    load_npz,
    synthetic,
)
from graphopt.errors import DataError


def load_data(source: Any, specs: list[InputSpec], batch_size: int = 32) -> Dataset:
    """A path (.npz file or folder of .npz), a reader object, a dict of arrays, a list of feeds, or a Dataset."""
    if isinstance(source, Dataset):
        name = source.source or "dataset"
        return replace(source, feeds=[check_feed(f"{name} feed {i}", specs, f)[0] for i, f in enumerate(source.feeds)])
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            return load_folder(path, specs)
        if not path.exists():
            raise DataError(f"{path}: no such file or folder")
        return load_npz(path, specs, batch_size)
    if callable(getattr(source, "get_next", None)):
        return from_reader(source, specs)
    if isinstance(source, Mapping):
        return from_arrays(source, specs, batch_size)
    if isinstance(source, (list, tuple)):
        return from_reader(FeedReader(list(source)), specs)
    raise DataError(f"cannot read data from a {type(source).__name__}: give an .npz, a folder, or a reader")


def _eval_count(data: Dataset, total: int, unit: str, eval_fraction: float) -> int:
    """How many of `total` feeds/samples go to evaluation: at least one, and at least one left to calibrate."""
    if total < 2:
        raise DataError(f"{data.source}: cannot split {total} {unit} into calibration and evaluation; "
                        "give --calib too")
    return min(max(round(total * eval_fraction), 1), total - 1)


def split(data: Dataset, eval_fraction: float = 0.5, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(calibration, evaluation): disjoint, chosen with `seed`, each part in its original order."""
    if not 0 < eval_fraction < 1:
        raise DataError(f"eval fraction must be between 0 and 1, got {eval_fraction}")
    rng = np.random.default_rng(seed)
    if data.chunk is None or data.fixed_chunk:
        # Whole feeds (folder, reader, or a fixed model batch): split by feeds.
        total = len(data)
        n_eval = _eval_count(data, total, "feed", eval_fraction)
        perm = rng.permutation(total)
        cal, ev = sorted(perm[n_eval:].tolist()), sorted(perm[:n_eval].tolist())
        part = f"part ({{}} of {total} feeds, seed {seed})"
        return (data.take_feeds(cal, f"{data.source}, calibration {part.format(len(cal))}"),
                data.take_feeds(ev, f"{data.source}, evaluation {part.format(len(ev))}"))
    total = data.num_samples
    n_eval = _eval_count(data, total, "sample", eval_fraction)
    perm = rng.permutation(total)
    arrays = concat_feeds(data.feeds)
    out = []
    for idx, name in [(np.sort(perm[n_eval:]), "calibration"), (np.sort(perm[:n_eval]), "evaluation")]:
        feeds = chunk_arrays({k: v[idx] if v.ndim else v for k, v in arrays.items()}, data.chunk)
        labels = None if data.labels is None else data.labels[idx]
        source = f"{data.source}, {name} part ({len(idx)} of {total} samples, seed {seed})"
        out.append(replace(data, feeds=feeds, labels=labels, source=source))
    return out[0], out[1]


def resolve(specs: list[InputSpec], data: Any = None, calib: Any = None,
            shapes: Mapping[str, tuple[int, ...]] | None = None, synthetic_samples: int = 8,
            eval_fraction: float = 0.5, batch_size: int = 32) -> tuple[Dataset, Dataset]:
    """(calibration, evaluation) for a run; `shapes` only matter for synthetic data."""
    if data is not None and calib is not None:
        return load_data(calib, specs, batch_size), load_data(data, specs, batch_size)
    if data is not None:
        return split(load_data(data, specs, batch_size), eval_fraction)
    if calib is not None:
        cal = load_data(calib, specs, batch_size)
        return cal, replace(cal, source=f"{cal.source} (calibration data reused for evaluation)")
    return (synthetic(specs, shapes, synthetic_samples, seed=0), synthetic(specs, shapes, synthetic_samples, seed=1))


def feed_shapes(model, dataset) -> dict[str, tuple[int, ...]] | None:
    """The first feed's input shapes: the MACs of a model with dynamic dims (text widths) mean nothing without."""
    if dataset is None or not len(dataset):
        return None
    names = {v.name for v in model.graph.inputs}
    return {k: tuple(int(d) for d in np.shape(v)) for k, v in dataset.feeds[0].items() if k in names} or None
