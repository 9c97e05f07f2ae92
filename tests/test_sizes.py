"""Size accounting: Huffman code lengths on known distributions, and model_sizes on a codebook model."""

from __future__ import annotations

import lzma

import numpy as np
import pytest
from onnx import helper

from graphopt import modelio
from graphopt.options import build_options
from graphopt.passes.kmeans import KMeans
from bench.sizes import huffman_bits, huffman_code_lengths, model_sizes
from tests.helpers import make_model, randn, tensor_info


def test_huffman_textbook_example():
    # CLRS 16.3: frequencies a..f = 45, 13, 12, 16, 9, 5 → code lengths 1, 3, 3, 3, 4, 4; 224 bits (x1000).
    lengths = huffman_code_lengths([45, 13, 12, 16, 9, 5])
    np.testing.assert_array_equal(lengths, [1, 3, 3, 3, 4, 4])
    assert int(np.dot(lengths, [45, 13, 12, 16, 9, 5])) == 224


def test_huffman_dyadic_distribution_meets_the_entropy():
    counts = np.array([8, 4, 2, 1, 1])
    np.testing.assert_array_equal(huffman_code_lengths(counts), [1, 2, 3, 4, 4])
    symbols = np.repeat(np.arange(5), counts)
    p = counts / counts.sum()
    assert huffman_bits(symbols) == pytest.approx(counts.sum() * -(p * np.log2(p)).sum())


def test_huffman_edge_cases():
    np.testing.assert_array_equal(huffman_code_lengths([0, 7, 0]), [0, 1, 0])  # a lone symbol: 1 bit each
    np.testing.assert_array_equal(huffman_code_lengths([0, 0]), [0, 0])
    assert huffman_bits(np.zeros(0, np.int64)) == 0


@pytest.mark.parametrize("seed", range(5))
def test_huffman_is_a_complete_prefix_code_within_one_bit_of_entropy(seed):
    counts = np.random.default_rng(seed).integers(1, 1000, 40)
    lengths = huffman_code_lengths(counts)
    assert np.isclose(np.sum(2.0 ** -lengths), 1.0)  # Kraft equality: a full binary tree
    p = counts / counts.sum()
    entropy = -(p * np.log2(p)).sum()
    avg = np.dot(p, lengths)
    assert entropy <= avg < entropy + 1


def test_model_sizes_of_a_codebook_model(tmp_path):
    w = randn((64, 32), 1)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "b"], ["y"], name="add")]
    model = make_model(nodes, [tensor_info("x", np.float32, [None, 64])], ["y"], {"w": w, "b": randn((32,), 2)})
    float_path = tmp_path / "float.onnx"
    modelio.save_model(model, float_path)
    KMeans(build_options(KMeans.Options, {"bits": 4}, "kmeans"))(model)
    path = tmp_path / "k4.onnx"
    modelio.save_model(model, path)

    sizes = model_sizes(path)
    data = path.read_bytes()
    assert sizes["bytes"] == len(data)
    assert sizes["lzma_bytes"] == len(lzma.compress(data, preset=6))
    idx = model.graph.initializers["w_indices"].const_value.numpy().astype(np.int64)
    counts = np.bincount(idx.reshape(-1))
    index_bytes = (int(np.dot(counts, huffman_code_lengths(counts))) + 7) // 8
    codebook = model.graph.initializers["w_codebook"].const_value.numpy().nbytes
    assert sizes["codebook_layers"] == 1
    assert sizes["huffman_bytes"] == index_bytes + codebook + 32 * 4  # + the raw float bias
    assert sizes["tensor_bytes"] == 64 * 32 // 2 + codebook + 32 * 4  # UINT4: two codes per byte
    assert sizes["huffman_bytes"] <= sizes["tensor_bytes"]
    float_sizes = model_sizes(float_path)
    assert float_sizes["huffman_bytes"] == float_sizes["tensor_bytes"] == (64 * 32 + 32) * 4
    assert float_sizes["codebook_layers"] == 0
