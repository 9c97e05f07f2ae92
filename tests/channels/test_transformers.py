"""channel_prune on transformer blocks: FFN neurons and attention heads as dependency groups.

On the BERT-like encoder of tests/encoder_graphs.py (Shape/Slice/Concat reshape targets, Erf GELU) and on
variants of it: constant reshape targets (shared between layers), a computed head count (not rewritable), the
GELU forms exporters and onnxruntime's optimizer write. Dead heads and neurons (every weight that makes them
zero) are removed exactly; pruned encoders run at other sequence lengths; MACs fall by exactly the removed
widths; the least-squares repair raises the worst hidden feature's SNR.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from graphopt import data as datamod
from graphopt import modelio
from graphopt.costs import count_macs, value_dims
from graphopt.options import build_options
from graphopt.passbase import PassContext
from graphopt.passes.channels import ChannelPrune, analyze
from graphopt.passes.channels.rewrite import removals
from graphopt.passes.channels.types import const_array
from graphopt.weights import write_input
from tests.encoder_graphs import EncoderConfig, bert_encoder, encoder_feeds, encoder_macs
from tests.helpers import assert_same_outputs, clone, make_model, randn, run_model, tensor_info

CFG = EncoderConfig()  # 2 layers, hidden 32, 4 heads of 8, FFN 64
HEAD = CFG.hidden // CFG.heads
FEED = encoder_feeds(CFG, batch=2, sequence=12, count=1)[0]
SHORT = encoder_feeds(CFG, batch=3, sequence=7, count=1, seed=9)[0]  # another batch and sequence length
# Removing units whose every weight is zero changes only the summation length of the MatMuls: float32
# reorderings, amplified at most by LayerNorm's 1/std (std ~1 here).
EXACT = {"rtol": 1e-4, "atol": 1e-5}


def _encoder(proto: onnx.ModelProto | None = None) -> ir.Model:
    return ir.serde.deserialize_model(proto or bert_encoder(CFG))


def _prune(model: ir.Model, context: PassContext | None = None, **raw):
    opts = build_options(ChannelPrune.Options, {"importance": "l1", **raw}, "channel_prune")
    return ChannelPrune(opts, context)(model)


def _groups(model: ir.Model):
    return analyze(model, value_dims(model))


def _group(groups, producer: str):
    return next(g for g in groups if producer in [p.name for p in g.producers])


def zero_units(group, units: list[int]) -> None:
    """Zero every weight and bias entry that makes ``units`` of ``group`` (its producers' columns, its biases):
    those heads/neurons then contribute nothing (V of a head is zero, GELU(0) = 0). Each touched tensor gets a
    private copy (exports share biases between layers)."""
    slot_removed, _ = removals([group], {group.id: np.array(units)})
    for slot, idx in slot_removed.items():
        if slot.role == "producer" or (slot.role == "member" and slot.node.op_type in ("Add", "BiasGelu", "FastGelu")):
            array = np.array(const_array(slot.node.inputs[slot.index]))
            where = [slice(None)] * array.ndim
            where[slot.axis] = idx
            array[tuple(where)] = 0.0
            write_input(slot.node, slot.index, array)


def _kill(model: ir.Model, producer: str, units: list[int]) -> None:
    zero_units(_group(_groups(model)[1], producer), units)


def _name(layer: int, part: str) -> str:
    return {"q": f"/encoder/layer.{layer}/attention/self/query/MatMul",
            "ffn": f"/encoder/layer.{layer}/intermediate/dense/MatMul"}[part]


def _widths(model: ir.Model) -> list[tuple[int, int]]:
    """(attention width H'·d, FFN width) of each layer, read from the pruned weights."""
    weights = {n.name: const_array(n.inputs[1]) for n in model.graph if n.op_type == "MatMul"}
    return [(weights[_name(i, "q")].shape[1], weights[_name(i, "ffn")].shape[1]) for i in range(CFG.layers)]


def _expected_macs(widths: list[tuple[int, int]], batch: int, sequence: int) -> int:
    """tests.encoder_graphs.encoder_macs with each layer's own widths: Q/K/V/O and both score MatMuls scale
    with the attention width, the two FFN MatMuls with the FFN width."""
    tokens = batch * sequence
    return sum(4 * tokens * CFG.hidden * att + 2 * tokens * CFG.hidden * ffn + 2 * batch * sequence ** 2 * att
               for att, ffn in widths)


def _shapes(feed: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: v.shape for k, v in feed.items()}


# --- the groups ---------------------------------------------------------------------------------------------------


def test_each_layer_has_one_head_group_and_one_ffn_group() -> None:
    model = _encoder()
    _, groups = _groups(model)
    for i in range(CFG.layers):
        heads = _group(groups, _name(i, "q"))
        prefix = f"/encoder/layer.{i}/attention"
        assert heads.prunable
        assert sorted(p.name for p in heads.producers) == sorted(f"{prefix}/self/{n}/MatMul"
                                                                for n in ("query", "key", "value"))
        assert heads.unit_sizes == [HEAD] * CFG.heads  # one removal unit per head: its d channels in Q, K, V
        consumers = {k.slot.node.name for k in heads.links if k.slot.role == "consumer"}
        assert consumers == {f"{prefix}/output/dense/MatMul"}
        assert sorted(n.name for n in heads.followers) == [f"{prefix}/self/MatMul", f"{prefix}/self/MatMul_1"]
        ffn = _group(groups, _name(i, "ffn"))
        assert ffn.prunable and ffn.size == CFG.ffn and ffn.unit_sizes is None
        assert {k.slot.node.name for k in ffn.links if k.slot.role == "consumer"} == {
            f"/encoder/layer.{i}/output/dense/MatMul"}
        assert {k.slot.node.name for k in ffn.links if k.slot.role == "member"} == {
            f"/encoder/layer.{i}/intermediate/dense/Add"}
    hidden = _group(groups, "/encoder/layer.0/attention/output/dense/MatMul")
    assert not hidden.prunable  # the residual stream goes through LayerNormalization


# --- exact removal, ratios, MACs -----------------------------------------------------------------------------------


def test_dead_heads_and_neurons_are_removed_exactly() -> None:
    model = _encoder()
    dead = {_name(0, "q"): [1], _name(1, "q"): [0, 3], _name(0, "ffn"): list(range(0, 64, 4)),
            _name(1, "ffn"): list(range(5, 37))}
    for producer, units in dead.items():
        _kill(model, producer, units)
    before = clone(model)
    fractions = {p: len(u) / (CFG.heads if "query" in p else CFG.ffn) for p, u in dead.items()}
    result = _prune(model, ratio=fractions)
    onnx.checker.check_model(modelio.to_proto(model))
    for feed in (FEED, SHORT):
        assert_same_outputs(before, model, feed, **EXACT)
    assert _widths(model) == [(3 * HEAD, 48), (2 * HEAD, 32)]
    assert len(result.rows) == 4
    for feed in (FEED, SHORT):
        batch, sequence = feed["input_ids"].shape
        assert count_macs(before, _shapes(feed)) == encoder_macs(CFG, batch, sequence)
        assert count_macs(model, _shapes(feed)) == _expected_macs(_widths(model), batch, sequence)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_pruned_encoder_runs_at_other_shapes_with_the_macs_removed(ratio: float) -> None:
    model = _encoder()
    before = clone(model)
    _prune(model, ratio=ratio)
    onnx.checker.check_model(modelio.to_proto(model))
    heads_kept = CFG.heads - int(np.floor(ratio * CFG.hidden + 1e-9)) // HEAD
    ffn_kept = CFG.ffn - int(np.floor(ratio * CFG.ffn + 1e-9))
    assert _widths(model) == [(heads_kept * HEAD, ffn_kept)] * CFG.layers
    for feed in (FEED, SHORT):
        ref, out = run_model(before, feed), run_model(model, feed)
        assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in ref.items()}
        assert np.all(np.isfinite(out["last_hidden_state"]))
        batch, sequence = feed["input_ids"].shape
        assert count_macs(model, _shapes(feed)) == _expected_macs(_widths(model), batch, sequence)


def test_ratio_zero_changes_nothing() -> None:
    model = _encoder()
    before = clone(model)
    result = _prune(model, ratio=0.0)
    assert "no channel removed" in result.notes
    assert_same_outputs(before, model, FEED, rtol=0, atol=0)


# --- reshape targets ----------------------------------------------------------------------------------------------


def _shared_targets(kind: str) -> onnx.ModelProto:
    """The encoder with one reshape target for all splits and one for all merges: ``constant`` ([0, 0, H, d]
    and [0, 0, hidden], as exporters deduplicate them) or ``concat`` (layer 0's Shape/Slice/Concat targets:
    batch and sequence are the same everywhere)."""
    proto = bert_encoder(CFG)
    if kind == "constant":
        return _constant_targets(shared=True)
    first: dict[bool, str] = {}
    for node in (n for n in proto.graph.node if n.op_type == "Reshape"):
        node.input[1] = first.setdefault("/self/Reshape" not in node.name, node.input[1])
    return proto


def _constant_targets(shared: bool) -> onnx.ModelProto:
    """The encoder with constant reshape targets ([0, 0, H, d] to split, [0, 0, hidden] to merge), one per
    Reshape or (``shared``) one for all splits and one for all merges."""
    proto = bert_encoder(CFG)
    for i, node in enumerate(n for n in proto.graph.node if n.op_type == "Reshape"):
        split = "/self/Reshape" not in node.name
        value = [0, 0, CFG.heads, HEAD] if split else [0, 0, CFG.hidden]
        name = ("split" if split else "merge") + ("" if shared else f"_{i}")
        if name not in {t.name for t in proto.graph.initializer}:
            proto.graph.initializer.append(numpy_helper.from_array(np.array(value, np.int64), name))
        node.input[1] = name
    return proto


@pytest.mark.parametrize("targets", ["constant", "shared constant", "shared concat"])
def test_reshape_targets_follow_the_head_count(targets: str) -> None:
    proto = _constant_targets(False) if targets == "constant" else _shared_targets(targets.split()[1])
    model = _encoder(proto)
    _kill(model, _name(0, "q"), [2])
    _kill(model, _name(1, "q"), [0, 1])
    before = clone(model)
    _prune(model, ratio={_name(0, "q"): 0.25, _name(1, "q"): 0.5})
    for feed in (FEED, SHORT):
        assert_same_outputs(before, model, feed, **EXACT)
    def tail(node: ir.Node) -> list[int]:  # the constant part of a target: all of it, or the Concat's last piece
        const = const_array(node.inputs[1])
        return (const if const is not None else const_array(node.inputs[1].producer().inputs[-1])).tolist()

    found = {n.name: tail(n) for n in model.graph if n.op_type == "Reshape"}
    lead = [0, 0] if targets != "shared concat" else []
    for layer, heads in ((0, 3), (1, 2)):
        prefix = f"/encoder/layer.{layer}/attention/self"
        for part in ("query", "key", "value"):
            assert found[f"{prefix}/{part}/Reshape"] == lead + [heads, HEAD]
        assert found[f"{prefix}/Reshape"] == lead + [heads * HEAD]


def _computed_head_count() -> onnx.ModelProto:
    """Layer 0's query Reshape takes its head count from arithmetic on the input's width (hidden / d)."""
    proto = bert_encoder(CFG)
    node = next(n for n in proto.graph.node if n.name == "/encoder/layer.0/attention/self/query/Reshape")
    x = next(n for n in proto.graph.node if n.name == "/encoder/layer.0/attention/self/query/MatMul").input[0]
    proto.graph.initializer.extend([numpy_helper.from_array(np.array(v, np.int64), k) for k, v in
                                    (("two", 2), ("d", HEAD), ("ax0", [0]), ("lead", [0, 0]), ("tail", [HEAD]))])
    proto.graph.node.extend([
        helper.make_node("Shape", [x], ["hc_shape"], name="hc/Shape"),
        helper.make_node("Gather", ["hc_shape", "two"], ["hc_width"], name="hc/Gather", axis=0),
        helper.make_node("Div", ["hc_width", "d"], ["hc_heads"], name="hc/Div"),
        helper.make_node("Unsqueeze", ["hc_heads", "ax0"], ["hc_heads1"], name="hc/Unsqueeze"),
        helper.make_node("Concat", ["lead", "hc_heads1", "tail"], ["hc_target"], name="hc/Concat", axis=0)])
    node.input[1] = "hc_target"
    return onnx.shape_inference.infer_shapes(helper.make_model(proto.graph, opset_imports=proto.opset_import))


def test_a_computed_head_count_blocks_only_that_group_and_says_why() -> None:
    proto = _computed_head_count()
    proto.ir_version = min(proto.ir_version, 10)
    model = ir.passes.common.TopologicalSortPass()(_encoder(proto)).model
    _, groups = _groups(model)
    blocked = _group(groups, _name(0, "q"))
    assert not blocked.prunable
    assert any("query/Reshape" in r and "head count" in r and "not a constant" in r for r in blocked.reasons)
    assert _group(groups, _name(1, "q")).prunable and _group(groups, _name(0, "ffn")).prunable
    before = clone(model)
    result = _prune(model, ratio=0.5)
    assert any("left intact" in n and "head count" in n for n in result.notes)
    assert _widths(model) == [(CFG.hidden, CFG.ffn // 2), (CFG.hidden // 2, CFG.ffn // 2)]
    out, ref = run_model(model, SHORT), run_model(before, SHORT)
    assert out["last_hidden_state"].shape == ref["last_hidden_state"].shape


# --- GELU forms ---------------------------------------------------------------------------------------------------

X = tensor_info("x", np.float32, ["batch", "tokens", 16])
Y = tensor_info("y", np.float32, ["batch", "tokens", 16])


def _ffn(form: str) -> ir.Model:
    """x → MatMul W1 [16, 32] → (+ b1) → GELU in ``form`` → MatMul W2 → + b2 → y."""
    inits = {"w1": randn([16, 32], 1) / 4, "b1": 0.1 * randn([32], 2), "w2": randn([32, 16], 3) / 6,
             "b2": 0.1 * randn([16], 4), "half": np.float32(0.5), "one": np.float32(1.0),
             "sqrt2": np.float32(np.sqrt(2.0)), "three": np.float32(3.0), "c": np.float32(0.044715),
             "k": np.float32(np.sqrt(2.0 / np.pi))}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1")]
    ms = {"domain": "com.microsoft"}
    if form in ("BiasGelu", "FastGelu"):
        nodes.append(helper.make_node(form, ["h", "b1"], ["g"], name="act", **ms))
    else:
        nodes.append(helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"))
        if form == "erf":
            nodes += [helper.make_node("Div", ["hb", "sqrt2"], ["e0"]), helper.make_node("Erf", ["e0"], ["e1"]),
                      helper.make_node("Add", ["e1", "one"], ["e2"]), helper.make_node("Mul", ["hb", "e2"], ["e3"]),
                      helper.make_node("Mul", ["e3", "half"], ["g"])]
        elif form == "tanh":
            nodes += [helper.make_node("Pow", ["hb", "three"], ["t0"]), helper.make_node("Mul", ["t0", "c"], ["t1"]),
                      helper.make_node("Add", ["hb", "t1"], ["t2"]), helper.make_node("Mul", ["t2", "k"], ["t3"]),
                      helper.make_node("Tanh", ["t3"], ["t4"]), helper.make_node("Add", ["t4", "one"], ["t5"]),
                      helper.make_node("Mul", ["hb", "t5"], ["t6"]), helper.make_node("Mul", ["half", "t6"], ["g"])]
        else:  # Gelu of opset 20, or onnxruntime's com.microsoft Gelu
            nodes.append(helper.make_node("Gelu", ["hb"], ["g"], **(ms if form == "ms_Gelu" else {})))
    nodes += [helper.make_node("MatMul", ["g", "w2"], ["o"], name="fc2"), helper.make_node("Add", ["o", "b2"], ["y"])]
    opset = 20 if form == "Gelu" else 17
    return make_model(nodes, [X], [Y], {k: np.asarray(v, np.float32) for k, v in inits.items()}, opset=opset,
                      extra_opsets={"com.microsoft": 1})


@pytest.mark.parametrize("form", ["erf", "tanh", "Gelu", "ms_Gelu", "BiasGelu", "FastGelu"])
def test_ffn_neurons_pass_through_every_gelu_form(form: str) -> None:
    model = _ffn(form)
    _, groups = _groups(model)
    group = _group(groups, "fc1")
    assert group.prunable and group.size == 32
    assert {k.slot.node.name for k in group.links if k.slot.role == "consumer"} == {"fc2"}
    _kill(model, "fc1", list(range(0, 32, 4)))
    before = clone(model)
    _prune(model, ratio=0.25)
    assert const_array(model.graph.initializers["w1"]).shape == (16, 24)
    feed = {"x": randn([2, 5, 16], 7)}
    assert_same_outputs(before, model, feed, **EXACT)


# --- data: repair and a MAC budget ---------------------------------------------------------------------------------


def _stacked(count: int, seed: int) -> dict[str, np.ndarray]:
    feeds = encoder_feeds(CFG, batch=8, sequence=12, count=count, seed=seed)
    return {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}


def _worst_feature_snr(ref: np.ndarray, out: np.ndarray) -> float:
    """SNR (dB) of the worst hidden feature of last_hidden_state, over every token."""
    ref2, err = ref.reshape(-1, ref.shape[-1]), (out - ref).reshape(-1, ref.shape[-1])
    return float(np.min(10 * np.log10(np.square(ref2).sum(0) / np.square(err).sum(0))))


def test_repair_raises_the_worst_feature_snr() -> None:
    """The ridge refit of each consumer (output projection, second FFN MatMul) minimizes its output error on
    these calibration rows (the unrepaired weights are one candidate), so the encoder's output must improve on
    them. Measured: worst-feature SNR 5.4 -> 9.0 dB on the calibration rows, 6.1 -> 8.2 dB on held-out ones;
    the margins asserted (1.5 dB, 0.5 dB) leave room for other BLAS summation orders."""
    model = _encoder()
    calib_arrays, held = _stacked(8, 3), _stacked(4, 4)
    calib = datamod.from_arrays(calib_arrays, datamod.input_specs(model), batch_size=8)
    snr = {}
    for repair in (False, True):
        pruned = clone(model)
        result = _prune(pruned, PassContext(calib=calib), ratio=0.25, repair=repair)
        snr[repair] = [_worst_feature_snr(run_model(model, d)["last_hidden_state"],
                                          run_model(pruned, d)["last_hidden_state"]) for d in (calib_arrays, held)]
    assert any("4 consumer layer(s) refit, 4 improved" in n for n in result.notes)
    assert snr[True][0] > snr[False][0] + 1.5
    assert snr[True][1] > snr[False][1] + 0.5


def test_a_mac_budget_is_met_on_the_encoder() -> None:
    """scope=sensitivity spends ``ratio`` of the encoder's MACs (counted at the calibration feeds' shapes, the
    score MatMuls with their head group) on the groups whose removal costs least."""
    model = _encoder()
    calib = datamod.from_arrays(_stacked(4, 5), datamod.input_specs(model), batch_size=8)
    before = clone(model)
    result = _prune(model, PassContext(calib=calib, teacher=clone(model)), ratio=0.3, scope="sensitivity",
                    importance="reconstruction", repair=False)
    shapes = {"input_ids": (8, 12), "attention_mask": (8, 12)}
    cut = 1 - count_macs(model, shapes) / count_macs(before, shapes)
    assert cut == pytest.approx(1 - _expected_macs(_widths(model), 8, 12) / encoder_macs(CFG, 8, 12))
    # met up to the coarsest removal unit, one head: its Q/K/V/O columns and its share of both score MatMuls
    head = (4 * 96 * CFG.hidden * HEAD + 2 * 8 * 12 ** 2 * HEAD) / encoder_macs(CFG, 8, 12)  # 6.8% of the MACs
    assert 0.3 - head <= cut <= 0.3 + head, result.notes
