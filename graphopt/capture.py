"""Streaming activation capture: run a model in onnxruntime on calibration feeds and look inside it.

Intermediate values are exposed as extra graph outputs of a copy of the model (main graph only: values inside
If/Loop/Scan bodies cannot be graph outputs, so asking for one is an error). Everything here streams: one feed
at a time goes through the session and into running statistics, so memory stays flat in the number of
samples and feeds may have different shapes (batch or spatial size).

- :func:`stream` yields {name: activation} per feed; :func:`stream_pair` runs a second model (the teacher)
  in lockstep on the same feeds.
- :class:`TensorStats` keeps min/max/abs-max, per-channel (axis 1) sums and a growing histogram.
- :class:`Moments` keeps XᵀX, XᵀY, Σy² of a linear layer (float64, with a bias column of ones appended last
  to X) — what :mod:`graphopt.refit` solves from; :func:`layer_moments` fills them.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator, Mapping

import numpy as np
import onnx
import onnx_ir as ir

from graphopt import modelio
from graphopt.errors import DataError, GraphoptError
from graphopt.linear import LinearLayer, fold_output, num_rows, unfold
from graphopt.runtime import make_session

Feed = dict[str, np.ndarray]


# --- exposing values -----------------------------------------------------------------------------------


def main_values(graph: ir.Graph) -> dict[str, ir.Value]:
    """Every value of the main graph by name: inputs, initializers, node outputs (what capture can expose)."""
    values = {v.name: v for v in graph.inputs}
    values.update({name: v for name, v in graph.initializers.items()})
    for node in graph:
        values.update({out.name: out for out in node.outputs if out.name})
    return values


def _check_names(model: ir.Model, names: Iterable[str]) -> dict[str, ir.Value]:
    values = main_values(model.graph)
    missing = [n for n in names if n not in values]
    if missing:
        raise GraphoptError(f"value {missing[0]!r} is not in the model's main graph (values inside If/Loop "
                            "bodies cannot be captured)")
    return {n: values[n] for n in names}


def with_outputs(model: ir.Model, names: list[str]) -> onnx.ModelProto:
    """``exposed(model, names)`` as a proto."""
    return modelio.to_proto(exposed(model, names))


def exposed(model: ir.Model, names: list[str]) -> ir.Model:
    """A copy of ``model`` whose graph outputs also include the named values; ``model`` is untouched.

    Graph inputs, initializers and values that already are outputs are left as they are (stream() reads
    inputs from the feed and initializers from the model). Exposed values keep their element type but lose
    their stated shape, so a stale shape annotation cannot make onnxruntime refuse the copy; a value with no
    known type is exposed untyped and onnxruntime infers it."""
    _check_names(model, names)
    copy = model.clone()
    values = main_values(copy.graph)
    outputs = {v.name for v in copy.graph.outputs}
    for name in dict.fromkeys(names):
        value = values[name]
        if name in outputs or value.is_graph_input() or value.is_initializer():
            continue
        value.shape = None
        copy.graph.outputs.append(value)
        outputs.add(name)
    return copy


class Runner:
    """One session over the exposed copy; returns the named values for a feed."""

    def __init__(self, model: ir.Model, names: list[str], threads: int) -> None:
        self.names = list(dict.fromkeys(names))
        values = _check_names(model, self.names)
        self.consts = {n: v.const_value.numpy() for n, v in values.items()
                       if v.is_initializer() and not v.is_graph_input() and v.const_value is not None}
        self.inputs = {v.name for v in model.graph.inputs}
        self.fetch = [n for n in self.names if n not in self.consts and n not in self.inputs]
        # From the ir copy, not a proto: make_session takes models with external tensors through a file.
        self.session = make_session(exposed(model, self.fetch), threads=threads)
        self.model, self.threads, self.plain = model, threads, None  # plain: made only if a fetch comes back None
        self.feed_names = [i.name for i in self.session.get_inputs()]
        # Inputs that are also initializers (old exporters) have a default and need no data.
        self.required = [n for n in self.feed_names if n not in model.graph.initializers]

    def __call__(self, feed: Mapping[str, np.ndarray]) -> Feed:
        missing = [n for n in self.required if n not in feed]
        if missing:
            raise DataError(f"feed has no input {missing[0]!r} (it has: {', '.join(feed) or 'nothing'})")
        inputs = {n: feed[n] for n in self.feed_names if n in feed}
        got = dict(zip(self.fetch, self.session.run(self.fetch, inputs))) if self.fetch else {}
        lost = [n for n in self.fetch if got[n] is None]
        if lost:  # onnxruntime 1.23's optimized graph can drop a fetched value (a Range output): ask unoptimized
            if self.plain is None:
                self.plain = make_session(exposed(self.model, self.fetch), threads=self.threads, optimize=False)
            got.update(zip(lost, self.plain.run(lost, inputs)))
        out = {}
        for name in self.names:
            out[name] = got[name] if name in got else self.consts[name] if name in self.consts else feed[name]
        return out


def _feeds(dataset, max_samples: int | None, progress: bool, what: str) -> Iterable[Feed]:
    data = dataset.head(max_samples) if max_samples else dataset
    feeds: Iterable[Feed] = data.feeds
    if progress:
        from tqdm import tqdm

        feeds = tqdm(feeds, desc=what, unit="feed", leave=False)
    return feeds


def stream(model: ir.Model, names: list[str], dataset, threads: int = 1, max_samples: int | None = None,
           progress: bool = False) -> Iterator[Feed]:
    """Per feed, {name: activation} of the named main-graph values; one onnxruntime session."""
    runner = Runner(model, names, threads)
    for feed in _feeds(dataset, max_samples, progress, "capture"):
        yield runner(feed)


def stream_pair(model: ir.Model, names: list[str], other: ir.Model, other_names: list[str], dataset,
                threads: int = 1, max_samples: int | None = None,
                progress: bool = False) -> Iterator[tuple[Feed, Feed]]:
    """Two models (student, teacher) in lockstep on the same feeds: per feed (model's values, other's values)."""
    first, second = Runner(model, names, threads), Runner(other, other_names, threads)
    for feed in _feeds(dataset, max_samples, progress, "capture"):
        yield first(feed), second(feed)


# --- running statistics of a tensor ----------------------------------------------------------------------


class TensorStats:
    """Running statistics of one tensor over many feeds (shapes may differ except the channel axis 1).

    The histogram covers |x| on [0, M) (``signed=False``) or x on [-M, M) (``signed=True``) with ``bins``
    equal half-open bins, M a power of two above the largest |x| seen; when a batch reaches M, M doubles and
    neighbouring bins merge, so counts stay exact (no re-binning error) and memory stays fixed."""

    def __init__(self, bins: int = 2048, signed: bool = False, channels: bool = True) -> None:
        self.track_channels = channels  # False: no per-channel sums (axis 1 may then vary between feeds)
        self.bins = max(4, int(math.ceil(bins / 4)) * 4)  # doubling a signed range needs bins % 4 == 0
        self.signed = signed
        self.count = 0
        self.min = math.inf
        self.max = -math.inf
        self.abs_max = 0.0
        self.sum = 0.0
        self.sumsq = 0.0
        self.channel_count = 0  # elements per channel seen
        self.channel_sum: np.ndarray | None = None
        self.channel_sumsq: np.ndarray | None = None
        self.channel_sum_abs: np.ndarray | None = None
        self.channel_min: np.ndarray | None = None
        self.channel_max: np.ndarray | None = None
        self.counts = np.zeros(self.bins, dtype=np.int64)
        self.hist_max = 0.0  # M; 0 until a non-zero value is seen
        self._zeros = 0  # values seen while M == 0 (all exactly zero)

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.size == 0:
            return
        x64 = x.astype(np.float64, copy=False)
        if not np.all(np.isfinite(x64)):
            raise DataError("activation holds NaN or Inf; statistics would be meaningless")
        self.count += x.size
        lo, hi = float(x64.min()), float(x64.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.abs_max = max(self.abs_max, abs(lo), abs(hi))
        self.sum += float(x64.sum())
        self.sumsq += float(np.square(x64).sum())
        if self.track_channels:
            self._update_channels(x64)
        self._update_histogram(x64)

    def _update_channels(self, x: np.ndarray) -> None:
        rows = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1) if x.ndim >= 2 else x.reshape(1, -1)
        if self.channel_sum is None:
            c = rows.shape[0]
            self.channel_sum, self.channel_sumsq, self.channel_sum_abs = np.zeros(c), np.zeros(c), np.zeros(c)
            self.channel_min, self.channel_max = np.full(c, np.inf), np.full(c, -np.inf)
        elif rows.shape[0] != self.channel_sum.size:
            raise DataError(f"activation has {rows.shape[0]} channels on axis 1, earlier feeds had "
                            f"{self.channel_sum.size}")
        self.channel_count += rows.shape[1]
        self.channel_sum += rows.sum(axis=1)
        self.channel_sumsq += np.square(rows).sum(axis=1)
        self.channel_sum_abs += np.abs(rows).sum(axis=1)
        np.minimum(self.channel_min, rows.min(axis=1), out=self.channel_min)
        np.maximum(self.channel_max, rows.max(axis=1), out=self.channel_max)

    def _grow(self, needed: float) -> None:
        while self.hist_max <= needed:
            merged = self.counts.reshape(-1, 2).sum(axis=1)  # bins pairwise
            self.counts = np.zeros_like(self.counts)
            start = self.bins // 4 if self.signed else 0  # the old range sits in the middle (signed)
            self.counts[start : start + merged.size] = merged
            self.hist_max *= 2.0

    def _update_histogram(self, x: np.ndarray) -> None:
        peak = float(np.abs(x).max())
        if self.hist_max == 0.0:
            if peak == 0.0:
                self._zeros += x.size
                return
            # A power of two strictly above the peak: every value stays below the top edge (bins are
            # half-open, as in np.histogram) and merged edges stay exact in floating point.
            self.hist_max = 2.0 ** (math.floor(math.log2(peak)) + 1)
            if self._zeros:
                self.counts[self._bin_of(np.zeros(1))[0]] += self._zeros
                self._zeros = 0
        elif peak >= self.hist_max:
            self._grow(peak)
        self.counts += np.bincount(self._bin_of(x.reshape(-1)), minlength=self.bins)

    def _bin_of(self, x: np.ndarray) -> np.ndarray:
        if self.signed:
            pos = (x + self.hist_max) * (self.bins / (2.0 * self.hist_max))
        else:
            pos = np.abs(x) * (self.bins / self.hist_max)
        return np.clip(pos.astype(np.int64), 0, self.bins - 1)

    # --- read-outs -------------------------------------------------------------------------------------
    def histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """(counts [bins], edges [bins + 1]) of |x| (or x when signed)."""
        top = self.hist_max or 1.0
        edges = np.linspace(-top if self.signed else 0.0, top, self.bins + 1)
        counts = self.counts.copy()
        if self._zeros:
            counts[self.bins // 2 if self.signed else 0] += self._zeros
        return counts, edges

    def percentile(self, p: float) -> float:
        """The p-th percentile (0..100) of |x| (or x when signed), interpolated inside a histogram bin."""
        counts, edges = self.histogram()
        total = counts.sum()
        if total == 0:
            raise GraphoptError("percentile of a tensor that was never seen")
        target = min(max(p, 0.0), 100.0) / 100.0 * total
        cum = np.cumsum(counts)
        i = int(np.searchsorted(cum, target, side="left"))
        i = min(i, self.bins - 1)
        before = cum[i - 1] if i else 0
        frac = (target - before) / counts[i] if counts[i] else 0.0
        return float(edges[i] + frac * (edges[i + 1] - edges[i]))

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else 0.0

    @property
    def std(self) -> float:
        return math.sqrt(max(self.sumsq / self.count - self.mean ** 2, 0.0)) if self.count else 0.0

    def channel_mean(self) -> np.ndarray:
        return self.channel_sum / max(self.channel_count, 1)

    def channel_mean_abs(self) -> np.ndarray:
        return self.channel_sum_abs / max(self.channel_count, 1)

    def channel_std(self) -> np.ndarray:
        mean = self.channel_mean()
        return np.sqrt(np.maximum(self.channel_sumsq / max(self.channel_count, 1) - mean ** 2, 0.0))


def tensor_stats(model: ir.Model, names: list[str], dataset, threads: int = 1, max_samples: int | None = None,
                 bins: int = 2048, signed: bool = False, progress: bool = False,
                 channels: bool = True, skip_nonfinite: bool = False) -> dict[str, TensorStats]:
    """Running statistics of each named value over the calibration feeds (``channels=False``: no per-channel
    sums, for tensors whose axis 1 is not a fixed channel axis, e.g. time in sequence models). A value holding NaN
    or Inf raises DataError, or with ``skip_nonfinite`` is left out of the result (an attention mask's -inf is
    meant: such a value has no range to quantize to)."""
    stats = {name: TensorStats(bins, signed, channels) for name in dict.fromkeys(names)}
    nonfinite: set[str] = set()
    for acts in stream(model, list(stats), dataset, threads, max_samples, progress):
        for name, s in stats.items():
            if name in nonfinite:
                continue
            try:
                s.update(acts[name])
            except DataError as err:
                if not skip_nonfinite:
                    raise DataError(f"value {name!r}: {err}") from None
                nonfinite.add(name)
    return {name: s for name, s in stats.items() if name not in nonfinite}


# --- second moments of a linear layer --------------------------------------------------------------------


class Moments:
    """Running XᵀX [d_in+1, d_in+1], XᵀY [d_in+1, d_out] and Σy² per output [d_out], float64.

    X gets a column of ones appended LAST (the bias column), so ``xtx[-1, -1]`` is the row count."""

    def __init__(self, d_in: int, d_out: int | None = None) -> None:
        self.d_in, self.d_out = d_in, d_out
        self.xtx = np.zeros((d_in + 1, d_in + 1))
        self.xty: np.ndarray | None = None if d_out is None else np.zeros((d_in + 1, d_out))
        self.yty: np.ndarray | None = None if d_out is None else np.zeros(d_out)
        self.rows = 0

    def update(self, x_rows: np.ndarray, y_rows: np.ndarray | None = None) -> None:
        x = np.asarray(x_rows, dtype=np.float64).reshape(-1, self.d_in)
        xa = np.empty((x.shape[0], self.d_in + 1))
        xa[:, :-1], xa[:, -1] = x, 1.0
        self.xtx += xa.T @ xa
        self.rows += x.shape[0]
        if y_rows is None:
            return
        y = np.asarray(y_rows, dtype=np.float64)
        y = y.reshape(x.shape[0], -1)
        if self.xty is None:
            self.d_out = y.shape[1]
            self.xty, self.yty = np.zeros((self.d_in + 1, self.d_out)), np.zeros(self.d_out)
        elif y.shape[1] != self.d_out:
            raise DataError(f"target rows have {y.shape[1]} columns, earlier ones had {self.d_out}")
        self.xty += xa.T @ y
        self.yty += np.square(y).sum(axis=0)

    def mean(self) -> np.ndarray:
        """Mean input row [d_in]."""
        return self.xtx[-1, :-1] / max(self.rows, 1)


def _subsample(rng: np.random.Generator, total: int, budget: int) -> np.ndarray | None:
    if total <= budget:
        return None
    return np.sort(rng.choice(total, size=budget, replace=False))


def layer_moments(model: ir.Model, layers: list[LinearLayer], dataset, targets: dict[str, str] | None = None,
                  target_model: ir.Model | None = None, threads: int = 1, max_samples: int | None = 256,
                  max_rows: int = 200_000, progress: bool = False, seed: int = 0) -> dict[str, Moments]:
    """Moments per layer (keyed by ``layer.name``): X = unfold(layer input in ``model``), Y = fold_output of
    ``targets[layer.name]`` in ``target_model`` (``model`` if None), or of the layer's own output
    (``layer.output``) when the layer has no entry in ``targets``.

    Each layer keeps at most about ``max_rows`` rows: every feed contributes up to max_rows / n_feeds rows,
    chosen at random (seeded) before the patches are copied."""
    targets = targets or {}
    other = target_model if target_model is not None else model
    data = dataset.head(max_samples) if max_samples else dataset
    budget = max(1, math.ceil(max_rows / max(len(data.feeds), 1)))
    own = [layer.input.name for layer in layers]
    own += [layer.output.name for layer in layers if layer.name not in targets]
    far = [targets[layer.name] for layer in layers if layer.name in targets]
    moments = {layer.name: Moments(layer.d_in, layer.d_out) for layer in layers}
    rng = np.random.default_rng(seed)
    if far and target_model is not None:
        pairs = stream_pair(model, own, other, far, data, threads, None, progress)
    else:
        pairs = ((acts, acts) for acts in stream(model, own + far, data, threads, None, progress))
    for acts, far_acts in pairs:
        for layer in layers:
            x = acts[layer.input.name]
            y = far_acts[targets[layer.name]] if layer.name in targets else acts[layer.output.name]
            total = num_rows(x, layer)
            channels = y.shape[1 if layer.kind == "conv" else -1] if y.ndim else 0
            if channels != layer.d_out or y.size != total * layer.d_out:
                where = targets.get(layer.name, layer.output.name)
                raise DataError(f"layer {layer.name!r}: target {where!r} has shape {y.shape}, expected "
                                f"{total} rows of {layer.d_out} outputs (from the layer input {x.shape})")
            rows = _subsample(rng, total, budget)
            moments[layer.name].update(unfold(x, layer, rows), fold_output(y, layer, rows))
    return moments
