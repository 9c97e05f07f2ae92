"""Data enters graphopt once, here: calibration and evaluation samples, checked against the model's inputs.

Sources: an ``.npz`` (keys = input names, axis 0 = samples, optional ``labels``), a folder of ``.npz`` files
(each one complete feed, used as it is), any object with onnxruntime's ``CalibrationDataReader`` protocol
(``get_next()`` -> feed dict or None), or synthetic inputs made from the input types (``synthetic=True``:
they say nothing about accuracy). With ``--data`` alone, the samples are split into disjoint calibration and
evaluation parts: ``eval_fraction`` (default 0.5) of them, chosen with a fixed seed (default 0), go to
evaluation. Within a dtype kind data is cast silently (float64 -> float32, int32 -> int64); across kinds
(float data for an int64 input) it is an error.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx_ir as ir

from graphopt.errors import DataError

Feed = dict[str, np.ndarray]
LABELS = "labels"


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None  # str = symbolic dim, None = unnamed dynamic; None = rank unknown


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The graph inputs that take data: inputs that are also initializers (old exporters) are weights."""
    specs = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        if value.type is not None and not isinstance(value.type, ir.TensorType):
            raise DataError(f"input '{value.name}' is a {value.type}, not a tensor; graphopt feeds tensors only")
        if value.dtype is None:
            raise DataError(f"input '{value.name}' has no element type in the model")
        shape = None
        if value.shape is not None:
            shape = tuple(d if isinstance(d, int) else d.value for d in value.shape)
        specs.append(InputSpec(value.name, np.dtype(value.dtype.numpy()), shape))
    return specs


def _fmt_shape(shape: tuple | None) -> str:
    if shape is None:
        return "unknown rank"
    return "x".join("?" if d is None else str(d) for d in shape) or "scalar"


def _batch(feed: Mapping[str, np.ndarray]) -> int:
    first = next(iter(feed.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim > 0 else 1


class FeedReader:
    """onnxruntime's CalibrationDataReader protocol over a list of feeds (also iterable, rewindable)."""

    def __init__(self, feeds: list[Feed]) -> None:
        self._feeds, self._pos = feeds, 0
        self._start, self._end = 0, len(feeds)

    def get_next(self) -> Feed | None:
        if self._start + self._pos >= self._end:
            return None
        self._pos += 1
        return dict(self._feeds[self._start + self._pos - 1])

    def rewind(self) -> None:
        self._pos = 0

    def set_range(self, start_index: int, end_index: int) -> None:
        self._start, self._end, self._pos = start_index, min(end_index, len(self._feeds)), 0

    def __len__(self) -> int:
        return self._end - self._start

    def __iter__(self) -> FeedReader:
        return self

    def __next__(self) -> Feed:
        feed = self.get_next()
        if feed is None:
            raise StopIteration
        return feed


@dataclass
class Dataset:
    feeds: list[Feed]
    labels: np.ndarray | None = None
    synthetic: bool = False
    source: str = ""
    # Samples per feed when the feeds were cut from one sample axis (npz, synthetic), so they can be re-cut;
    # None: whole feeds (folder, reader) that are never cut.
    chunk: int | None = field(default=None, repr=False)
    fixed_chunk: bool = field(default=False, repr=False)  # the model's batch dim is fixed at `chunk`
    label_counts: list[int] | None = field(default=None, repr=False)  # labels per feed, if not one per sample

    @property
    def num_samples(self) -> int:
        return sum(_batch(f) for f in self.feeds)

    def __len__(self) -> int:
        return len(self.feeds)

    def _label_slices(self) -> list[slice]:
        counts = self.label_counts or [_batch(f) for f in self.feeds]
        ends = np.cumsum([0, *counts])
        return [slice(int(a), int(b)) for a, b in zip(ends[:-1], ends[1:])]

    def _take_feeds(self, idx: list[int], source: str) -> Dataset:
        labels, counts = None, None
        if self.labels is not None:
            slices = self._label_slices()
            labels = np.concatenate([self.labels[slices[i]] for i in idx])
            counts = [slices[i].stop - slices[i].start for i in idx] if self.label_counts else None
        return replace(self, feeds=[self.feeds[i] for i in idx], labels=labels, source=source, label_counts=counts)

    def head(self, max_samples: int) -> Dataset:
        """The first samples only (at least one feed); labels stay aligned."""
        if max_samples < 1:
            raise DataError(f"head needs at least 1 sample, got {max_samples}")
        if self.num_samples <= max_samples:
            return self
        if self.chunk is None or self.fixed_chunk:  # whole feeds only
            idx, total = [], 0
            for i, feed in enumerate(self.feeds):
                if idx and total + _batch(feed) > max_samples:
                    break
                idx.append(i)
                total += _batch(feed)
            return self._take_feeds(idx, f"{self.source}, first {total} samples")
        arrays = _concat(self.feeds)
        labels = None if self.labels is None else self.labels[:max_samples]
        feeds = _chunk({k: v[:max_samples] if v.ndim else v for k, v in arrays.items()}, self.chunk)
        return replace(self, feeds=feeds, labels=labels, source=f"{self.source}, first {max_samples} samples")

    def reader(self) -> FeedReader:
        return FeedReader(self.feeds)

    def describe(self) -> str:
        text = f"{self.source or 'data'}: {self.num_samples} samples in {len(self)} feeds"
        if self.labels is not None:
            text += ", with labels"
        if self.synthetic:
            text += " (synthetic: says nothing about accuracy)"
        return text


def _concat(feeds: list[Feed]) -> dict[str, np.ndarray]:
    """Feeds cut from one sample axis, glued back; rank-0 inputs are shared by every feed."""
    return {k: v if v.ndim == 0 else np.concatenate([f[k] for f in feeds]) for k, v in feeds[0].items()}


def _chunk(arrays: Mapping[str, np.ndarray], size: int) -> list[Feed]:
    n = next((len(v) for v in arrays.values() if v.ndim), 1)
    return [{k: v[i : i + size] if v.ndim else v for k, v in arrays.items()} for i in range(0, n, size)]


# --- checking data against the model's inputs ------------------------------------------------------------


def _kind(dtype: np.dtype) -> str:
    if dtype.kind in "fc":
        return "float"
    if dtype.kind in "iu":
        return "integer"
    if dtype.kind == "b":
        return "bool"
    if dtype.kind in "USO":
        return "string"
    name = dtype.name  # ml_dtypes types (bfloat16, float8*, int4) have kind 'V'
    return "float" if "float" in name else "integer" if "int" in name else name


def _cast(where: str, spec: InputSpec, array: np.ndarray) -> np.ndarray:
    want, got = _kind(spec.dtype), _kind(array.dtype)
    if want != got:
        raise DataError(f"{where}: input '{spec.name}' expects {spec.dtype.name}, got {array.dtype.name} data "
                        f"({got} for a {want} input is not cast; convert it yourself)")
    if want == "string" or array.dtype == spec.dtype:
        return array
    if want == "integer" and array.size and spec.dtype.kind in "iu":
        info = np.iinfo(spec.dtype)
        if array.min() < info.min or array.max() > info.max:
            raise DataError(f"{where}: input '{spec.name}' expects {spec.dtype.name}, got {array.dtype.name} "
                            f"values in [{array.min()}, {array.max()}] that do not fit")
    return array.astype(spec.dtype)


def _check(where: str, spec: InputSpec, array: Any, skip_first: bool) -> np.ndarray:
    """Dtype, rank and fixed dims of one array; `skip_first`: axis 0 is the sample axis, checked by the caller."""
    array = _cast(where, spec, np.asarray(array))
    if spec.shape is None:
        return array
    if skip_first and array.ndim == 0 and len(spec.shape) == 0:
        return array  # a scalar input: one value shared by every feed
    if array.ndim != len(spec.shape):
        raise DataError(f"{where}: input '{spec.name}' expects rank {len(spec.shape)} "
                        f"({_fmt_shape(spec.shape)}), got rank {array.ndim} ({_fmt_shape(array.shape)})")
    for axis, (want, got) in enumerate(zip(spec.shape, array.shape)):
        if isinstance(want, int) and want != got and not (skip_first and axis == 0):
            raise DataError(f"{where}: input '{spec.name}' dim {axis} must be {want} (model shape "
                            f"{_fmt_shape(spec.shape)}), got {got} (data shape {_fmt_shape(array.shape)})")
    return array


def _check_keys(where: str, specs: list[InputSpec], keys: list[str]) -> None:
    names = [s.name for s in specs]
    allowed = set(names) | {LABELS}
    extra = [k for k in keys if k not in allowed]
    if extra:
        raise DataError(f"{where}: keys that are not model inputs: {', '.join(extra)} "
                        f"(model inputs: {', '.join(names)}; '{LABELS}' is also allowed)")
    missing = [n for n in names if n not in keys]
    if missing:
        raise DataError(f"{where}: missing input '{missing[0]}' (model inputs: {', '.join(names)}; "
                        f"got: {', '.join(keys) or 'nothing'})")


def _split_labels(specs: list[InputSpec], arrays: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray | None]:
    """Pop the `labels` key, unless the model has an input of that name."""
    if LABELS in arrays and all(s.name != LABELS for s in specs):
        arrays = dict(arrays)
        return arrays, np.asarray(arrays.pop(LABELS))
    return arrays, None


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: is a .npy array, not an .npz archive (keys = input names)")
        with npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read .npz ({type(exc).__name__}: {exc})") from exc


# --- sources -------------------------------------------------------------------------------------------


def from_arrays(arrays: Mapping[str, Any], specs: list[InputSpec], batch_size: int = 32,
                where: str = "data") -> Dataset:
    """Arrays with axis 0 = samples (the content of one .npz), cut into feeds."""
    arrays, labels = _split_labels(specs, dict(arrays))
    _check_keys(where, specs, list(arrays))
    checked = {s.name: _check(where, s, arrays[s.name], skip_first=True) for s in specs}
    counts = {k: v.shape[0] for k, v in checked.items() if v.ndim}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{k}={n}" for k, n in counts.items())
        raise DataError(f"{where}: inputs have different sample counts on axis 0 ({listed})")
    n = next(iter(counts.values()), 1)
    if n == 0:
        raise DataError(f"{where}: holds no samples")
    if labels is not None and (labels.ndim == 0 or len(labels) != n):
        raise DataError(f"{where}: '{LABELS}' has {labels.shape[0] if labels.ndim else 'no'} entries "
                        f"on axis 0, the inputs have {n} samples")
    fixed = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int) and checked[s.name].ndim}
    if len(fixed) > 1:
        raise DataError(f"{where}: the model's inputs fix different batch sizes {sorted(fixed)}")
    size, note = (fixed.pop(), True) if fixed else (batch_size, False)
    if size < 1:
        raise DataError(f"{where}: batch size must be at least 1, got {size}")
    if note and n % size:
        if n < size:
            raise DataError(f"{where}: {n} samples, fewer than the model's fixed batch of {size}")
        keep = n - n % size  # a short last feed would not fit the fixed batch dim
        checked = {k: v[:keep] if v.ndim else v for k, v in checked.items()}
        labels = None if labels is None else labels[:keep]
        return Dataset(_chunk(checked, size), labels, chunk=size, fixed_chunk=True,
                       source=f"{where} ({keep} samples; last {n - keep} dropped: batch fixed at {size})")
    return Dataset(_chunk(checked, size), labels, source=f"{where} ({n} samples)", chunk=size, fixed_chunk=note)


def load_npz(path: str | Path, specs: list[InputSpec], batch_size: int = 32) -> Dataset:
    path = Path(path)
    return from_arrays(_read_npz(path), specs, batch_size, where=path.name)


def _whole_feed(where: str, specs: list[InputSpec], arrays: Mapping[str, Any]) -> tuple[Feed, np.ndarray | None]:
    if not isinstance(arrays, Mapping) or not all(isinstance(k, str) for k in arrays):
        raise DataError(f"{where}: a feed must be a dict from input names to arrays, got {type(arrays).__name__}")
    arrays, labels = _split_labels(specs, dict(arrays))
    _check_keys(where, specs, list(arrays))
    feed = {s.name: _check(where, s, arrays[s.name], skip_first=False) for s in specs}
    return feed, None if labels is None else labels.reshape(-1) if labels.ndim == 0 else labels


def _from_feeds(items: list[tuple[str, Feed, np.ndarray | None]], source: str) -> Dataset:
    if not items:
        raise DataError(f"{source}: holds no feeds")
    with_labels = [where for where, _, lab in items if lab is not None]
    labels, counts = None, None
    if with_labels and len(with_labels) != len(items):
        without = next(where for where, _, lab in items if lab is None)
        raise DataError(f"{source}: {without} has no '{LABELS}' but {with_labels[0]} has; give all or none")
    if with_labels:
        try:
            labels = np.concatenate([lab for _, _, lab in items])
        except ValueError as exc:
            raise DataError(f"{source}: '{LABELS}' of the feeds cannot be joined ({exc})") from exc
        counts = [len(lab) for _, _, lab in items]
    feeds = [feed for _, feed, _ in items]
    n = sum(_batch(f) for f in feeds)
    return Dataset(feeds, labels, source=f"{source} ({len(feeds)} feeds, {n} samples)", label_counts=counts)


def load_folder(path: str | Path, specs: list[InputSpec]) -> Dataset:
    """Every .npz in the folder (sorted by name) is one complete feed, used as it is."""
    path = Path(path)
    files = sorted(path.glob("*.npz"))
    if not files:
        raise DataError(f"{path}: folder holds no .npz files")
    return _from_feeds([(f.name, *_whole_feed(f.name, specs, _read_npz(f))) for f in files], f"{path.name}/")


def from_reader(reader: Any, specs: list[InputSpec]) -> Dataset:
    """Drain a CalibrationDataReader (rewound first if it can be); a `labels` key in a feed is taken as labels."""
    if callable(getattr(reader, "rewind", None)):
        reader.rewind()
    items = []
    while (feed := reader.get_next()) is not None:
        where = f"{type(reader).__name__} feed {len(items)}"
        items.append((where, *_whole_feed(where, specs, feed)))
    return _from_feeds(items, type(reader).__name__)


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """'name=1x3x224x224' -> ('name', (1, 3, 224, 224)); 'name=' is a scalar."""
    name, eq, dims = text.strip().rpartition("=")
    try:
        shape = tuple(int(d) for d in dims.replace(",", "x").split("x")) if dims else ()
    except ValueError:
        shape = None
    if not eq or not name or shape is None or any(d < 1 for d in shape):
        raise DataError(f"bad --shape '{text}': expected name=AxBxC with positive integers, e.g. x=1x3x224x224")
    return name, shape


def _synthetic_shape(spec: InputSpec, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    if spec.name in shapes:
        shape = tuple(shapes[spec.name])
        if spec.shape is not None:
            if len(shape) != len(spec.shape):
                raise DataError(f"--shape {spec.name}={_fmt_shape(shape)}: model input has rank {len(spec.shape)} "
                                f"({_fmt_shape(spec.shape)})")
            for axis, (want, got) in enumerate(zip(spec.shape, shape)):
                if isinstance(want, int) and want != got:
                    raise DataError(f"--shape {spec.name}={_fmt_shape(shape)}: dim {axis} is fixed at {want} "
                                    f"in the model ({_fmt_shape(spec.shape)})")
        return shape
    hint = f"pass --shape {spec.name}=AxBxC"
    if spec.shape is None:
        raise DataError(f"input '{spec.name}' has unknown rank; {hint}")
    out = []
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, int):
            out.append(dim)
        elif axis == 0:
            out.append(1)  # the batch dim
        else:
            raise DataError(f"input '{spec.name}' has dynamic dim {axis} ('{dim or '?'}' in "
                            f"{_fmt_shape(spec.shape)}); {hint}")
    return tuple(out)


def synthetic(specs: list[InputSpec], shapes: Mapping[str, tuple[int, ...]] | None = None,
              samples: int = 8, seed: int = 0) -> Dataset:
    """Random inputs of the right types: they exercise the model, they say nothing about accuracy."""
    shapes = dict(shapes or {})
    unknown = [n for n in shapes if n not in {s.name for s in specs}]
    if unknown:
        raise DataError(f"--shape names unknown input '{unknown[0]}' (model inputs: "
                        f"{', '.join(s.name for s in specs)})")
    full = {s.name: _synthetic_shape(s, shapes) for s in specs}
    batch = next((shape[0] for shape in full.values() if shape), 1)
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(max(1, math.ceil(samples / batch))):
        feed = {}
        for s in specs:
            kind, shape = _kind(s.dtype), full[s.name]
            if kind == "float":
                feed[s.name] = rng.standard_normal(shape, dtype=np.float32).astype(s.dtype)
            elif kind == "integer":
                feed[s.name] = rng.integers(0, 10, shape).astype(s.dtype)
            elif kind == "bool":
                feed[s.name] = rng.integers(0, 2, shape).astype(bool)
            else:
                raise DataError(f"cannot make synthetic data for input '{s.name}' of type {s.dtype}; give --data")
        feeds.append(feed)
    fixed = any(s.shape and isinstance(s.shape[0], int) for s in specs)
    n = len(feeds) * batch
    return Dataset(feeds, synthetic=True, source=f"synthetic ({n} samples, seed {seed})", chunk=batch,
                   fixed_chunk=fixed)


def load_data(source: Any, specs: list[InputSpec], batch_size: int = 32) -> Dataset:
    """A path (.npz file or folder of .npz), a reader object, a dict of arrays, a list of feeds, or a Dataset."""
    if isinstance(source, Dataset):
        name = source.source or "dataset"
        return replace(source, feeds=[_whole_feed(f"{name} feed {i}", specs, f)[0] for i, f in enumerate(source.feeds)])
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


def split(data: Dataset, eval_fraction: float = 0.5, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(calibration, evaluation): disjoint, chosen with `seed`, each part in its original order."""
    if not 0 < eval_fraction < 1:
        raise DataError(f"eval fraction must be between 0 and 1, got {eval_fraction}")
    rng = np.random.default_rng(seed)
    if data.chunk is None or data.fixed_chunk:
        # Whole feeds (folder, reader, or a fixed model batch): split by feeds.
        total = len(data)
        if total < 2:
            raise DataError(f"{data.source}: cannot split {total} feed into calibration and evaluation; "
                            "give --calib too")
        n_eval = min(max(round(total * eval_fraction), 1), total - 1)
        perm = rng.permutation(total)
        cal, ev = sorted(perm[n_eval:].tolist()), sorted(perm[:n_eval].tolist())
        part = f"part ({{}} of {total} feeds, seed {seed})"
        return (data._take_feeds(cal, f"{data.source}, calibration {part.format(len(cal))}"),
                data._take_feeds(ev, f"{data.source}, evaluation {part.format(len(ev))}"))
    total = data.num_samples
    if total < 2:
        raise DataError(f"{data.source}: cannot split {total} sample into calibration and evaluation; "
                        "give --calib too")
    n_eval = min(max(round(total * eval_fraction), 1), total - 1)
    perm = rng.permutation(total)
    arrays = _concat(data.feeds)
    out = []
    for idx, name in [(np.sort(perm[n_eval:]), "calibration"), (np.sort(perm[:n_eval]), "evaluation")]:
        feeds = _chunk({k: v[idx] if v.ndim else v for k, v in arrays.items()}, data.chunk)
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
