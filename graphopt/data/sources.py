"""Data sources checked against the model's inputs: .npz files, folders of .npz feeds, readers, synthetic.

Within a dtype kind data is cast silently (float64 -> float32, int32 -> int64); across kinds (float data for
an int64 input) it is an error. Every error is one DataError line naming the source and the input.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx_ir as ir

from graphopt.data.dataset import Dataset, Feed, chunk_arrays, feed_batch
from graphopt.data.indices import index_limit
from graphopt.errors import DataError

__all__ = [
    "LABELS",
    "InputSpec",
    "check_feed",
    "from_arrays",
    "from_reader",
    "input_specs",
    "load_folder",
    "load_npz",
    "parse_shape",
    "synthetic",
]

LABELS = "labels"


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None  # str = symbolic dim, None = unnamed dynamic; None = rank unknown
    index_limit: int | None = None  # an integer input indexing a constant table: its row count (synthetic data)


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
            # A literal -1 (some exporters write it) is a dynamic dimension, like a symbol.
            shape = tuple((d if d >= 0 else None) if isinstance(d, int) else d.value for d in value.shape)
        dtype = np.dtype(value.dtype.numpy())
        specs.append(InputSpec(value.name, dtype, shape, index_limit(value) if dtype.kind in "iu" else None))
    return specs


def _fmt_shape(shape: tuple | None) -> str:
    if shape is None:
        return "unknown rank"
    return "x".join("?" if d is None else str(d) for d in shape) or "scalar"


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


def _checked(where: str, specs: list[InputSpec], arrays: Mapping[str, Any],
             skip_first: bool) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Every model input checked (see _check), and the `labels` popped out."""
    arrays, labels = _split_labels(specs, dict(arrays))
    _check_keys(where, specs, list(arrays))
    return {s.name: _check(where, s, arrays[s.name], skip_first) for s in specs}, labels


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
    checked, labels = _checked(where, specs, arrays, skip_first=True)
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
        return Dataset(chunk_arrays(checked, size), labels, chunk=size, fixed_chunk=True,
                       source=f"{where} ({keep} samples; last {n - keep} dropped: batch fixed at {size})")
    return Dataset(chunk_arrays(checked, size), labels, source=f"{where} ({n} samples)", chunk=size, fixed_chunk=note)


def load_npz(path: str | Path, specs: list[InputSpec], batch_size: int = 32) -> Dataset:
    path = Path(path)
    return from_arrays(_read_npz(path), specs, batch_size, where=path.name)


def check_feed(where: str, specs: list[InputSpec], arrays: Mapping[str, Any]) -> tuple[Feed, np.ndarray | None]:
    if not isinstance(arrays, Mapping) or not all(isinstance(k, str) for k in arrays):
        raise DataError(f"{where}: a feed must be a dict from input names to arrays, got {type(arrays).__name__}")
    feed, labels = _checked(where, specs, arrays, skip_first=False)
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
    n = sum(feed_batch(f) for f in feeds)
    return Dataset(feeds, labels, source=f"{source} ({len(feeds)} feeds, {n} samples)", label_counts=counts)


def load_folder(path: str | Path, specs: list[InputSpec]) -> Dataset:
    """Every .npz in the folder (sorted by name) is one complete feed, used as it is."""
    path = Path(path)
    files = sorted(path.glob("*.npz"))
    if not files:
        raise DataError(f"{path}: folder holds no .npz files")
    return _from_feeds([(f.name, *check_feed(f.name, specs, _read_npz(f))) for f in files], f"{path.name}/")


def from_reader(reader: Any, specs: list[InputSpec]) -> Dataset:
    """Drain a CalibrationDataReader (rewound first if it can be); a `labels` key in a feed is taken as labels."""
    if callable(getattr(reader, "rewind", None)):
        reader.rewind()
    items = []
    while (feed := reader.get_next()) is not None:
        where = f"{type(reader).__name__} feed {len(items)}"
        items.append((where, *check_feed(where, specs, feed)))
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
                feed[s.name] = rng.integers(0, min(10, s.index_limit or 10), shape).astype(s.dtype)
            elif kind == "bool":
                feed[s.name] = rng.integers(0, 2, shape).astype(bool)
            else:
                raise DataError(f"cannot make synthetic data for input '{s.name}' of type {s.dtype}; give --data")
        feeds.append(feed)
    fixed = any(s.shape and isinstance(s.shape[0], int) for s in specs)
    n = len(feeds) * batch
    return Dataset(feeds, synthetic=True, source=f"synthetic ({n} samples, seed {seed})", chunk=batch,
                   fixed_chunk=fixed)
