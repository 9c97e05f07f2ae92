"""The Dataset that carries calibration/evaluation feeds, and a CalibrationDataReader over a list of feeds.

Feeds cut from one sample axis (npz, synthetic) remember their chunk size so head() and data.split() can
re-cut them by samples; whole feeds (folder, reader, or a model with a fixed batch) are kept as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping

import numpy as np

from graphopt.errors import DataError

__all__ = ["Feed", "Dataset", "FeedReader", "chunk_arrays", "concat_feeds", "feed_batch"]

Feed = dict[str, np.ndarray]


def feed_batch(feed: Mapping[str, np.ndarray]) -> int:
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
        return sum(feed_batch(f) for f in self.feeds)

    def __len__(self) -> int:
        return len(self.feeds)

    def _label_slices(self) -> list[slice]:
        counts = self.label_counts or [feed_batch(f) for f in self.feeds]
        ends = np.cumsum([0, *counts])
        return [slice(int(a), int(b)) for a, b in zip(ends[:-1], ends[1:])]

    def take_feeds(self, idx: list[int], source: str) -> Dataset:
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
                if idx and total + feed_batch(feed) > max_samples:
                    break
                idx.append(i)
                total += feed_batch(feed)
            return self.take_feeds(idx, f"{self.source}, first {total} samples")
        arrays = concat_feeds(self.feeds)
        labels = None if self.labels is None else self.labels[:max_samples]
        feeds = chunk_arrays({k: v[:max_samples] if v.ndim else v for k, v in arrays.items()}, self.chunk)
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


def concat_feeds(feeds: list[Feed]) -> dict[str, np.ndarray]:
    """Feeds cut from one sample axis, glued back; rank-0 inputs are shared by every feed."""
    return {k: v if v.ndim == 0 else np.concatenate([f[k] for f in feeds]) for k, v in feeds[0].items()}


def chunk_arrays(arrays: Mapping[str, np.ndarray], size: int) -> list[Feed]:
    n = next((len(v) for v in arrays.values() if v.ndim), 1)
    return [{k: v[i : i + size] if v.ndim else v for k, v in arrays.items()} for i in range(0, n, size)]
