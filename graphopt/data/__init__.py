"""Data enters graphopt once, here: calibration and evaluation samples, checked against the model's inputs.

Sources: an ``.npz`` (keys = input names, axis 0 = samples, optional ``labels``), a folder of ``.npz`` files
(each one complete feed, used as it is), any object with onnxruntime's ``CalibrationDataReader`` protocol
(``get_next()`` -> feed dict or None), or synthetic inputs made from the input types (``synthetic=True``:
they say nothing about accuracy). With ``--data`` alone, the samples are split into disjoint calibration and
evaluation parts: ``eval_fraction`` (default 0.5) of them, chosen with a fixed seed (default 0), go to
evaluation. Within a dtype kind data is cast silently (float64 -> float32, int32 -> int64); across kinds
(float data for an int64 input) it is an error.

Modules, bottom to top: dataset (the Dataset of feeds and labels, readers, chunking), sources (the model's
input specs; .npz files, folders, readers, arrays and synthetic inputs, checked against the specs), splitting
(load_data, the calibration/evaluation split, resolve).
"""

from __future__ import annotations

from graphopt.data.dataset import Dataset, Feed, FeedReader, chunk_arrays, concat_feeds, feed_batch
from graphopt.data.sources import (LABELS, InputSpec, check_feed, from_arrays, from_reader, input_specs, load_folder,
                                   load_npz, parse_shape, synthetic)
from graphopt.data.splitting import feed_shapes, load_data, resolve, split

__all__ = ["LABELS", "Dataset", "Feed", "FeedReader", "InputSpec", "check_feed", "chunk_arrays", "concat_feeds",
           "feed_batch", "feed_shapes", "from_arrays", "from_reader", "input_specs", "load_data", "load_folder",
           "load_npz", "parse_shape", "resolve", "split", "synthetic"]
