"""Embedding tables (Gather data) as kmeans and prune layers: which Gathers are tables, the codebook form on a table
(the decoded table feeds the original Gather, gathered rows are exactly the codebook values of their codes), its
size in the file, cleanup and quantize after it, the encoder fixtures, pruning's ``tables`` rule, data_aware and
the budget-seeking ``auto`` modes with tables as layers."""

from __future__ import annotations

import lzma

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

import graphopt
import graphopt.pipeline
from graphopt import data as datamod
from graphopt import modelio
from graphopt.options import build_options
from graphopt.passbase import PassContext
from graphopt.passes.canonicalize import Canonicalize
from graphopt.passes.cleanup import Cleanup
from graphopt.passes.kmeans import KMeans
from graphopt.passes.kmeans.importance import importance_of, input_mean_squares
from graphopt.passes.prune import Prune
from graphopt.weight_targets import find_targets
from tests.helpers import REPO, assert_same_outputs, clone, make_model, randn, run_model, tensor_info

ENCODERS = REPO / "models" / "encoders"
TEXT = ("bert", "bert_torchscript", "distilbert", "roberta")
LINEAR = ["MatMul", "Gemm"]  # skip_ops that leave only the tables


def kmeans(model, context=None, **raw):
    return KMeans(build_options(KMeans.Options, raw, "kmeans"), context)(model)


def prune(model, context=None, **raw):
    return Prune(build_options(Prune.Options, raw, "prune"), context)(model)


def embedder(vocab: int = 40, hidden: int = 12, table=None):
    """ids [N, T] → word table (vocab × hidden) + position table (8 × hidden, rows Range(0, T)) + a row picked by a
    constant index (a weight slice, no table) → MatMul (hidden → 6)."""
    table = randn((vocab, hidden), 1) * 0.5 if table is None else table
    nodes = [helper.make_node("Gather", ["table", "ids"], ["words"], name="embed"),
             helper.make_node("Shape", ["ids"], ["shape"], name="shape"),
             helper.make_node("Gather", ["shape", "one"], ["length"], name="length"),
             helper.make_node("Range", ["zero", "length", "one"], ["positions"], name="range"),
             helper.make_node("Gather", ["pos", "positions"], ["where"], name="pos_embed"),
             helper.make_node("Gather", ["bias_rows", "row"], ["bias"], name="bias_row"),
             helper.make_node("Add", ["words", "where"], ["sum"], name="add"),
             helper.make_node("Add", ["sum", "bias"], ["hidden"], name="add_bias"),
             helper.make_node("MatMul", ["hidden", "w"], ["y"], name="mm")]
    inits = {"table": table, "pos": randn((8, hidden), 2), "bias_rows": randn((3, hidden), 3),
             "row": np.array([1], np.int64), "zero": np.array(0, np.int64), "one": np.array(1, np.int64),
             "w": randn((hidden, 6), 4)}
    return make_model(nodes, [tensor_info("ids", np.int64, [None, None])], ["y"], inits)


IDS = np.random.default_rng(5).integers(0, 40, (3, 7)).astype(np.int64)


def decoded(model: ir.Model, base: str) -> np.ndarray:
    """The table as numpy decodes it from the stored codebook, indices and row offsets."""
    inits = model.graph.initializers
    idx = inits[f"{base}_indices"].const_value.numpy().astype(np.int64)
    if f"{base}_row_offsets" in inits:
        idx = idx + inits[f"{base}_row_offsets"].const_value.numpy()
    return inits[f"{base}_codebook"].const_value.numpy().astype(np.float32)[idx]


def with_tables(model: ir.Model, tables: dict[str, np.ndarray]) -> ir.Model:
    """A copy of a float ``model`` whose tables hold the given arrays: the reference for a shared model."""
    ref = clone(model)
    for name, array in tables.items():
        ref.graph.initializers[name].const_value = ir.tensor(array, name=name)
    return ref


def reads_decoded_table(model: ir.Model, gather: str, base: str) -> bool:
    """The Gather ``gather`` reads Gather(codebook, Cast(indices) [+ offsets]) [→ Cast] of the table ``base``."""
    node = next(n for n in model.graph if n.name == gather)
    producer = node.inputs[0].producer()
    while producer is not None and producer.op_type == "Cast":
        producer = producer.inputs[0].producer()
    return producer is not None and producer.op_type == "Gather" and producer.inputs[0].name == f"{base}_codebook"


# --- which Gathers are tables ------------------------------------------------------------------------------------


def test_tables_are_gathers_of_constant_float_tables_by_run_time_indices():
    model = embedder()
    notes: list[str] = []
    targets = {t.layer: t for t in find_targets(model, [], [], 0, notes, "shared")}
    # bias_row reads its table at a constant index (a weight slice cleanup folds); length reads Shape's output
    assert sorted(targets) == ["embed", "mm", "pos_embed"]
    for name in ("embed", "pos_embed"):
        t = targets[name]
        assert t.table and t.index == 0 and (t.out_axis, t.in_axis) == (1, 0)
    assert not targets["mm"].table and not notes


def test_a_table_shared_by_two_gathers_or_compressed_is_said_and_left():
    model = embedder()
    node = next(n for n in model.graph if n.name == "pos_embed")
    node.replace_input_with(0, model.graph.initializers["table"])  # tied: both Gathers read the word table
    notes: list[str] = []
    assert [t.layer for t in find_targets(model, [], [], 0, notes, "shared")] == ["mm"]
    assert sum("shared with other nodes" in n for n in notes) == 2

    model = embedder()
    kmeans(model, bits=4, skip_ops=LINEAR)
    result = kmeans(model, bits=4)
    assert [r["layer"] for r in result.rows] == ["mm"]
    assert sum("already in a compressed form (codebook)" in n for n in result.notes) == 2


def test_layer_options_select_tables():
    for raw, left in [({"skip_ops": ["Gather"]}, {"mm"}), ({"skip_nodes": ["table", "mm"]}, {"pos_embed"}),
                      ({"min_size": 100}, {"embed"}), ({"bits": {"embed": 3}}, {"embed"})]:
        result = kmeans(embedder(), **{"bits": 4, **raw})
        assert {r["layer"] for r in result.rows} == left, raw
    assert kmeans(embedder(), bits={"embed": 3}).rows[0]["bits"] == 3


# --- kmeans on a table ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_channel", [False, True])
def test_gathered_rows_are_the_codebook_values_of_their_codes(per_channel):
    model = embedder()
    original = clone(model)
    result = kmeans(model, bits=4, per_channel=per_channel, skip_ops=LINEAR)
    assert [r["layer"] for r in result.rows] == ["embed", "pos_embed"][:2 - per_channel]
    # per channel: one codebook per hidden feature (the table's output axis); the 8 × 12 position table would
    # not get smaller with 12 codebooks of 16 floats, so it stays float
    assert result.rows[0]["codebook"] == ([12, 16] if per_channel else [16])
    tables = {r["weight"]: decoded(model, r["weight"]) for r in result.rows}
    for name, table in tables.items():
        gather = "embed" if name == "table" else "pos_embed"
        assert reads_decoded_table(model, gather, name)
        w = original.graph.initializers[name].const_value.numpy()
        assert np.linalg.norm(table - w) / np.linalg.norm(w) < 0.15  # 4 bits on a Gaussian: about 0.1
        if per_channel:  # every hidden column holds only the values of its own codebook row
            book = model.graph.initializers[f"{name}_codebook"].const_value.numpy().reshape(12, 16)
            assert all(np.isin(table[:, c], book[c]).all() for c in range(12))
    # the model computes exactly the float model with the decoded tables
    assert_same_outputs(with_tables(original, tables), model, {"ids": IDS}, rtol=1e-6, atol=1e-6)


def test_table_shrinks_in_the_file_and_after_lzma(tmp_path):
    # A 4096 × 256 table drawn like BERT's (normal × 0.02): 4-bit codes and 16 floats; lzma barely shrinks
    # float32 noise (about 1.09x) and packed codes (about 1.05x), so the ratio after lzma stays near 7.7x.
    table = (randn((4096, 256), 7) * 0.02).astype(np.float32)
    model = embedder(4096, 256, table)
    result = kmeans(model, bits=4, skip_ops=LINEAR, skip_nodes=["pos_embed"])
    assert result.rows[0]["indices"] == "uint4"
    path = tmp_path / "k4.onnx"
    modelio.save_model(model, path)
    stored = {t.name: t for t in onnx.load(str(path)).graph.initializer}
    assert "table" not in stored
    idx, book = stored["table_indices"], stored["table_codebook"]
    assert idx.data_type == onnx.TensorProto.UINT4 and len(idx.raw_data) == table.size // 2
    assert len(book.raw_data) == 16 * 4
    before = len(lzma.compress(table.tobytes()))
    after = len(lzma.compress(idx.raw_data)) + len(lzma.compress(book.raw_data))
    assert before / after >= 6.0, (before, after)
    rows = np.unique(IDS)
    dec = decoded(model, "table")
    rel = np.linalg.norm(dec[rows] - table[rows], axis=1) / np.linalg.norm(table[rows], axis=1)
    assert rel.max() < 0.15  # measured about 0.10 (16-level Lloyd-Max on a Gaussian: 0.098)


def test_half_codebook_table_stays_a_gather_of_a_gather():
    model = embedder()
    original = clone(model)
    result = kmeans(model, bits=4, skip_ops=LINEAR, half_codebook=True)
    assert all(r["codebook_dtype"] == "float16" for r in result.rows)
    assert reads_decoded_table(model, "embed", "table")
    tables = {r["weight"]: decoded(model, r["weight"]) for r in result.rows}
    assert_same_outputs(with_tables(original, tables), model, {"ids": IDS}, rtol=1e-6, atol=1e-6)


def test_table_codebook_survives_cleanup():
    model = embedder()
    kmeans(model, bits=4, skip_ops=LINEAR)
    ref = clone(model)
    Cleanup()(model)
    assert reads_decoded_table(model, "embed", "table") and reads_decoded_table(model, "pos_embed", "pos")
    assert {"table_indices", "pos_indices"} <= set(model.graph.initializers)
    assert_same_outputs(ref, model, {"ids": IDS}, rtol=1e-6, atol=1e-6)


def test_data_aware_weighs_table_rows_by_how_often_they_are_read():
    model = embedder()
    ids = np.zeros((4, 6), np.int64)
    ids[:, :3] = 7  # row 7 read half the time, row 0 the other half
    calib = datamod.from_arrays({"ids": ids}, datamod.input_specs(model))
    targets = [t for t in find_targets(model, [], [], 0, [], "shared") if t.table]
    squares = input_mean_squares(PassContext(calib=calib), model, targets, 8)
    expected = np.full(40, 0.5 / 40)
    expected[[0, 7]] += 0.25
    np.testing.assert_allclose(squares["embed"], expected)
    expected = np.full(8, 0.5 / 8)
    expected[:6] += 0.5 / 6  # positions 0-5, each once per row
    np.testing.assert_allclose(squares["pos_embed"], expected)
    h = importance_of(targets[0], squares["embed"])
    assert h.shape == (40, 12) and np.all(h[7] == h[7, 0]) and h[7, 0] > h[1, 0]
    result = kmeans(model, PassContext(calib=calib), bits=3, data_aware=True, skip_ops=LINEAR)
    assert all("weighted_rel_error" in r for r in result.rows)


# --- the encoder fixtures ------------------------------------------------------------------------------------------


def _rows(name: str, count: int = 8) -> dict[str, np.ndarray]:
    with np.load(ENCODERS / f"{name}.npz") as data:
        return {key: data[key][:count] for key in data.files}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return float(np.mean((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


@pytest.mark.parametrize("name", TEXT)
def test_encoder_tables_shared_at_4_bits(name: str):
    model = modelio.load_model(ENCODERS / f"{name}.onnx")
    Canonicalize()(model)
    original = clone(model)
    result = kmeans(model, bits=4, skip_ops=LINEAR)
    weights = [r["weight"] for r in result.rows]
    # word and position tables (and BERT's and RoBERTa's 2-row token types): every Gather of a table
    assert len(weights) == (2 if name == "distilbert" else 3) and all(r["op"] == "Gather" for r in result.rows)
    tables = {w: decoded(model, w) for w in weights}
    rows = _rows(name)
    scale = max(float(np.abs(v).max()) for v in run_model(original, rows).values())
    assert_same_outputs(with_tables(original, tables), model, rows, rtol=1e-4, atol=1e-5 * scale)
    before, after = run_model(original, rows), run_model(model, rows)
    # measured: mean cosine of the first output 0.996 (BERT), 0.995 (DistilBERT), 0.997 (RoBERTa logits)
    first = next(iter(before))
    assert _cosine(before[first], after[first]) >= 0.99
    word = next(r for r in result.rows if "word" in r["weight"])
    assert word["elements"] == 1000 * 64 and word["bytes_after"] == 1000 * 64 // 2 + 16 * 4


def test_bert_tables_survive_cleanup_and_a_later_quantize(tmp_path):
    out = tmp_path / "bert.onnx"
    report = graphopt.optimize(str(ENCODERS / "bert.onnx"), str(out), data=_rows("bert", 16),
                               passes=[{"kmeans": {"bits": 4, "skip_ops": LINEAR}},
                                       {"quantize": {"target": "size"}}],
                               run=graphopt.pipeline.RunOptions(latency=False, progress=False))
    assert report.passed
    assert [row.status for row in report.passes[2:4]] == ["kept", "kept"], [r.reason for r in report.passes]
    model = modelio.load_model(out)
    assert "DequantizeLinear" in {n.op_type for n in model.graph}  # quantize changed the MatMuls
    for gather, base in (("node_embedding", "embeddings.word_embeddings.weight"),
                         ("node_embedding_2", "embeddings.position_embeddings.weight")):
        assert reads_decoded_table(model, gather, base)
        assert model.graph.initializers[f"{base}_indices"].const_value.dtype == ir.DataType.UINT4
    rows = _rows("bert")
    before, after = run_model(str(ENCODERS / "bert.onnx"), rows), run_model(str(out), rows)
    assert _cosine(before["last_hidden_state"], after["last_hidden_state"]) >= 0.99


# --- prune ---------------------------------------------------------------------------------------------------------


def test_prune_leaves_tables_dense_at_a_uniform_sparsity():
    model = embedder(400, 12)
    result = prune(model, sparsity=0.5, min_size=0)
    assert [r["layer"] for r in result.rows] == ["mm"]
    assert any("2 embedding table(s) left dense" in n for n in result.notes)
    for raw in ({"sparsity": 0.5, "min_size": 0, "tables": "never"}, {"sparsity": {"mm": 0.5}, "min_size": 0}):
        result = prune(embedder(400, 12), **raw)
        assert [r["layer"] for r in result.rows] == ["mm"] and not any("table" in n for n in result.notes), raw


@pytest.mark.parametrize("raw", [{"sparsity": 0.8, "tables": "always", "skip_ops": LINEAR},
                                 {"sparsity": {"table": 0.8, "pos_embed": 0.8}}])
def test_prune_tables_element_by_element_into_sparse_initializers(raw, tmp_path):
    model = embedder(400, 12)
    original = clone(model)
    result = prune(model, min_size=0, **raw)
    assert [r["layer"] for r in result.rows] == ["embed", "pos_embed"]
    assert all(r["sparsity"] == pytest.approx(0.8, abs=0.01) and r["stored"] == "sparse" for r in result.rows)
    table = model.graph.initializers["table"].const_value.numpy()
    w = original.graph.initializers["table"].const_value.numpy()
    kept = table != 0
    np.testing.assert_array_equal(table[kept], w[kept])
    assert np.abs(w[~kept]).max() <= np.abs(w[kept]).min()  # the smallest magnitudes of the whole table
    path = tmp_path / "pruned.onnx"
    modelio.save_model(model, path)
    assert {s.values.name for s in onnx.load(str(path)).graph.sparse_initializer} == {"table", "pos"}
    pruned = {name: model.graph.initializers[name].const_value.numpy() for name in ("table", "pos")}
    assert_same_outputs(with_tables(original, pruned), str(path), {"ids": IDS}, rtol=1e-6, atol=1e-6)


# --- budget-seeking modes: each table one layer ------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_context():
    model = modelio.load_model(ENCODERS / "bert.onnx")
    Canonicalize()(model)
    calib = datamod.from_arrays(_rows("bert", 8), datamod.input_specs(model))
    return model, PassContext(calib=calib, teacher=model, metric="cosine", max_drop=0.01)


@pytest.mark.parametrize("pass_cls, raw, key", [(KMeans, {"bits": "auto"}, "bits"),
                                                (Prune, {"sparsity": "auto"}, "sparsity")])
def test_auto_measures_tables_as_layers_inside_the_budget(bert_context, pass_cls, raw, key):
    teacher, context = bert_context
    model = clone(teacher)
    layers = len(find_targets(model, [], [], pass_cls.Options().min_size, [], "x"))
    options = build_options(pass_cls.Options, {**raw, "max_samples": 8, "time_budget": 60.0}, pass_cls.name)
    result = pass_cls(options, context)(model)
    # the tables are on the budget's path with the linear layers (prune's min_size leaves the 2-row token types)
    assert any(f"of {layers} layer(s) changed" in n for n in result.notes), result.notes
    assert layers == (16 if pass_cls is KMeans else 15)
    if pass_cls is KMeans:  # at 3-4 bits the tables cost the cosine little: the budget takes them (measured)
        assert {"node_embedding", "node_embedding_2"} <= {r["layer"] for r in result.rows}
    assert all(r[key] in options.levels or round(r[key], 2) in options.levels for r in result.rows)
    drop = 1 - _cosine(run_model(teacher, _rows("bert"))["last_hidden_state"],
                       run_model(model, _rows("bert"))["last_hidden_state"])
    assert drop <= 0.01 + 1e-6


def test_a_gather_of_an_embedding_output_is_no_table():
    # Gather(Gather(table, ids), position): its data is computed at run time (no compressed weight to report)
    model = embedder()
    words = next(n for n in model.graph if n.name == "embed").outputs[0]
    words.shape = ir.Shape(["N", "T", 12])  # as shape inference states it
    node = ir.node("Gather", [words, model.graph.inputs[0]], {"axis": 1}, name="pick")
    model.graph.append(node)
    notes: list[str] = []
    assert "pick" not in {t.layer for t in find_targets(model, [], [], 0, notes, "shared")} and not notes
