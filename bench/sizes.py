"""Size accounting: bytes on disk, bytes after lzma, and the entropy-coded size Deep Compression reports.

The Huffman figure counts, for every codebook weight (Gather of a float codebook initializer at indices
that come from an integer initializer through Cast, optionally plus per-row offsets), the Huffman-coded index
stream (bits/8, rounded up) plus the codebook (and offsets) bytes; every other tensor counts its raw bytes
(sparse initializers: values + indices). Graph structure (nodes, names) is not counted: it is a weights figure.
"""

from __future__ import annotations

import heapq
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from graphopt.bench import disk_bytes, file_sizes
from graphopt.modelio import proto_graphs


def huffman_code_lengths(counts: Sequence[int] | np.ndarray) -> np.ndarray:
    """Code length in bits of each symbol of an optimal prefix code for these counts (0 for absent symbols).

    A lone symbol still needs one bit per occurrence."""
    counts = np.asarray(counts, dtype=np.int64).reshape(-1)
    lengths = np.zeros(counts.size, np.int64)
    present = np.flatnonzero(counts > 0)
    if present.size == 1:
        lengths[present] = 1
    if present.size <= 1:
        return lengths
    # Heap of (weight, tiebreak, symbols in the subtree): every merge adds one bit to each of its symbols.
    heap = [(int(counts[s]), int(s), [int(s)]) for s in present]
    heapq.heapify(heap)
    tiebreak = counts.size
    while len(heap) > 1:
        w1, _, s1 = heapq.heappop(heap)
        w2, _, s2 = heapq.heappop(heap)
        lengths[s1] += 1
        lengths[s2] += 1
        heapq.heappush(heap, (w1 + w2, tiebreak, s1 + s2))
        tiebreak += 1
    return lengths


def huffman_bits(symbols: np.ndarray) -> int:
    """Bits of the Huffman-coded stream of non-negative integer ``symbols``."""
    flat = np.asarray(symbols).astype(np.int64).reshape(-1)
    if flat.size == 0:
        return 0
    counts = np.bincount(flat)
    return int(np.dot(counts, huffman_code_lengths(counts)))


def _raw_bytes(tensor: onnx.TensorProto) -> int:
    return int(numpy_helper.to_array(tensor).nbytes) if tensor.data_type not in _PACKED else (
        (int(np.prod(tensor.dims)) * _PACKED[tensor.data_type] + 7) // 8)


_PACKED = {onnx.TensorProto.UINT4: 4, onnx.TensorProto.INT4: 4}
_INDEX_TYPES = {onnx.TensorProto.UINT8, onnx.TensorProto.INT8, onnx.TensorProto.UINT4, onnx.TensorProto.INT4,
                onnx.TensorProto.UINT16, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64}


def codebook_layers(graph: onnx.GraphProto) -> list[tuple[str, str, list[str]]]:
    """(codebook, indices, extra constants) names of Gather(codebook, [Add(]Cast(indices)[, offsets)])."""
    inits = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    found = []
    for node in graph.node:
        if node.op_type != "Gather" or len(node.input) < 2 or node.input[0] not in inits:
            continue
        extra: list[str] = []
        src = producers.get(node.input[1])
        if src is not None and src.op_type == "Add" and len(src.input) == 2:
            cast_in, other = src.input
            if cast_in not in producers:
                cast_in, other = other, cast_in
            if other in inits:
                extra.append(other)
                src = producers.get(cast_in)
        if src is None or src.op_type != "Cast" or src.input[0] not in inits:
            continue
        if inits[src.input[0]].data_type in _INDEX_TYPES:
            found.append((node.input[0], src.input[0], extra))
    return found


def model_sizes(path: str | os.PathLike, lzma_preset: int = 6, with_lzma: bool = True) -> dict[str, Any]:
    """bytes on disk (with external data), lzma bytes of those, huffman bytes, raw tensor bytes, codebooks."""
    path = Path(path)
    proto = onnx.load(str(path))  # with external data: the index streams are counted below
    if with_lzma:
        size, lzma_bytes = file_sizes(path, lzma_preset)
    else:
        size, lzma_bytes = disk_bytes(path), None

    raw = huffman = 0
    layers = 0
    for graph in proto_graphs(proto.graph):
        inits = {t.name: t for t in graph.initializer}
        coded: set[str] = set()
        for book, idx, extra in codebook_layers(graph):
            if idx in coded:
                continue
            symbols = numpy_helper.to_array(inits[idx])
            huffman += (huffman_bits(symbols) + 7) // 8 + _raw_bytes(inits[book]) + sum(
                _raw_bytes(inits[e]) for e in extra if e not in coded)
            coded.update([book, idx, *extra])
            layers += 1
        for t in graph.initializer:
            raw += _raw_bytes(t)
            if t.name not in coded:
                huffman += _raw_bytes(t)
        for sparse in graph.sparse_initializer:
            n = _raw_bytes(sparse.values) + _raw_bytes(sparse.indices)
            raw += n
            huffman += n
    return {"bytes": size, "lzma_bytes": lzma_bytes, "huffman_bytes": huffman, "tensor_bytes": raw,
            "codebook_layers": layers}
