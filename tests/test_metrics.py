"""graphopt.metrics: hand-computed values, worst-channel gating, streaming and the onnxruntime Evaluator."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.errors import DataError, GraphoptError
from graphopt.metrics import SNR_CAP, Accumulator, Comparison, Evaluator, OutputMetrics, compare


def one(ref, cand, **kw) -> OutputMetrics:
    return compare(["y"], [[np.asarray(ref)]], [[np.asarray(cand)]], **kw).outputs[0]


def test_hand_computed_whole_and_channel():
    ref = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
    cand = np.array([[3.0, 3.0], [0.0, 1.0]], np.float32)
    m = one(ref, cand)
    # ref energy 25, error energy 2 -> 10*log10(12.5); dot 21, |ref| 5, |cand| sqrt(19).
    assert m.snr_db == pytest.approx(10 * math.log10(12.5))
    assert m.cosine == pytest.approx(21 / (5 * math.sqrt(19)))
    assert m.max_abs == 1.0 and m.mean_abs == pytest.approx(0.5)
    # channel 0 exact (200 dB); channel 1: ref energy 16, error 2 -> 10*log10(8); cosine 12/(4*sqrt(10)).
    assert m.channels == 2 and m.worst_channel == 1
    assert m.worst_channel_snr_db == pytest.approx(10 * math.log10(8))
    assert m.worst_channel_cosine == pytest.approx(12 / (4 * math.sqrt(10)))


def test_rank0_and_rank1_have_no_channels():
    m = one(np.array([1.0, 2.0, 2.0]), np.array([1.0, 2.0, 1.0]))
    assert m.channels == 0 and m.worst_channel is None
    assert m.snr_db == pytest.approx(10 * math.log10(9 / 1)) == pytest.approx(m.worst_channel_snr_db)
    assert m.worst_channel_cosine == m.cosine == pytest.approx(7 / (3 * math.sqrt(6)))
    s = one(np.float32(2.0), np.float32(1.0))
    assert s.snr_db == pytest.approx(10 * math.log10(4)) and s.max_abs == 1.0


def test_zero_vectors_conventions():
    both_zero = one(np.zeros((2, 3)), np.zeros((2, 3)))
    assert both_zero.cosine == 1.0 and both_zero.snr_db == SNR_CAP and both_zero.worst_channel_snr_db == SNR_CAP
    cand_only = one(np.zeros((2, 3)), np.ones((2, 3)))
    assert cand_only.cosine == 0.0 and cand_only.snr_db == -SNR_CAP
    ref_only = one(np.ones((2, 3)), np.zeros((2, 3)))
    assert ref_only.cosine == 0.0 and ref_only.snr_db == pytest.approx(0.0)  # error energy == ref energy


def test_identical_outputs_are_capped():
    ref = np.random.default_rng(0).normal(size=(4, 5, 3)).astype(np.float32)
    c = compare(["y"], [[ref]], [[ref.copy()]])
    m = c.outputs[0]
    assert m.snr_db == SNR_CAP and c.worst_snr_db == SNR_CAP
    assert m.cosine == pytest.approx(1.0) and m.max_abs == 0.0 and m.mean_abs == 0.0


def test_collapsed_score_channel_hides_in_whole_tensor():
    rng = np.random.default_rng(1)
    n = 64
    boxes = rng.uniform(100, 600, size=(n, 4, 8))
    scores = rng.uniform(0.0, 1.0, size=(n, 2, 8))
    ref = np.concatenate([boxes, scores], axis=1).astype(np.float32)
    cand = ref.copy()
    cand[:, 5] = 0.0  # one score channel collapsed, box channels exact
    m = one(ref, cand)
    expected_whole = 10 * math.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum(ref[:, 5].astype(np.float64) ** 2))
    assert m.snr_db == pytest.approx(expected_whole) and m.snr_db > 50
    assert m.cosine > 0.99999
    assert m.worst_channel == 5
    assert m.worst_channel_snr_db == pytest.approx(0.0, abs=1e-9)  # error energy equals that channel's energy
    assert m.worst_channel_cosine == 0.0
    assert m.channels == 6


def test_agreement_rank2_and_accuracy():
    ref = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.3, 0.3, 0.4]])
    cand = np.array([[0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5], [0.5, 0.3, 0.2]])
    labels = np.array([1, 1, 2, 0])
    c = compare(["logits"], [[ref]], [[cand]], labels=labels)
    assert c.score_output == "logits"
    assert c.agreement == pytest.approx(2 / 4)  # rows 0 and 2 agree
    assert c.reference_accuracy == pytest.approx(2 / 4)  # ref tops 1,0,2,2
    assert c.accuracy == pytest.approx(4 / 4)  # cand tops 1,1,2,0
    assert c.samples == 4
    assert c.value("accuracy") == 1.0 and c.drop("accuracy") == pytest.approx(-0.5)
    assert c.value("agreement") == 0.5 and c.drop("agreement") == pytest.approx(0.5)
    assert c.value("snr") == c.worst_snr_db and c.drop("snr") is None
    with pytest.raises(GraphoptError, match="unknown metric"):
        c.value("f1")
    with pytest.raises(DataError, match="3 labels for 4"):
        compare(["logits"], [[ref]], [[cand]], labels=labels[:3])


def test_agreement_rank3_sequence_per_position():
    ref = np.zeros((2, 3, 4), np.float32)
    cand = np.zeros((2, 3, 4), np.float32)
    ref_top = np.array([[0, 1, 2], [3, 3, 0]])
    cand_top = np.array([[0, 1, 3], [3, 2, 0]])
    for i in range(2):
        for t in range(3):
            ref[i, t, ref_top[i, t]] = 1.0
            cand[i, t, cand_top[i, t]] = 1.0
    c = compare(["probs"], [[ref]], [[cand]], labels=np.array([0, 1]))
    assert c.agreement == pytest.approx(4 / 6)
    assert c.accuracy is None and c.reference_accuracy is None  # accuracy is for [N, C] outputs only


def test_agreement_on_score_maps_per_pixel():
    # One-channel probability map: a pixel agrees when both sit on the same side of the threshold.
    ref = np.array([[[[0.1, 0.6], [0.4, 0.9]]]], np.float32)  # [1, 1, 2, 2]
    cand = np.array([[[[0.2, 0.45], [0.35, 0.95]]]], np.float32)
    assert compare(["map"], [[ref]], [[cand]], score_output="map").agreement == pytest.approx(3 / 4)
    assert compare(["map"], [[ref]], [[cand]], score_output="map", map_threshold=0.3).agreement == 1.0
    # 0.38: now 0.4 vs 0.35 disagree, 0.6 vs 0.45 agree.
    assert compare(["map"], [[ref]], [[cand]], score_output="map", map_threshold=0.38).agreement == pytest.approx(3 / 4)
    nan = cand.copy()
    nan[0, 0, 1, 1] = np.nan
    assert compare(["map"], [[ref]], [[nan]], score_output="map").agreement == pytest.approx(2 / 4)
    # Several channels: the class per pixel (argmax over axis 1).
    seg = np.zeros((1, 3, 1, 2), np.float32)
    seg[0, 2, 0, 0] = seg[0, 1, 0, 1] = 1.0
    other = seg.copy()
    other[0, 0, 0, 1] = 2.0
    assert compare(["seg"], [[seg]], [[other]], score_output="seg").agreement == pytest.approx(1 / 2)
    # A map is never picked automatically (an image output is not a class score).
    assert compare(["map"], [[ref]], [[cand]]).agreement is None


def test_score_output_automatic_choice_and_override():
    ids = np.array([[3, 1], [2, 2]], np.int64)  # integer ids are never scores
    bias = np.array([1.0, 2.0])  # rank 1
    boxes = np.array([[1.0, 0.0], [0.0, 1.0]])
    logits = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    cand_logits = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    names = ["ids", "bias", "boxes", "logits"]
    auto = compare(names, [[ids, bias, boxes, logits]], [[ids, bias, boxes, cand_logits]])
    assert auto.score_output == "boxes" and auto.agreement == 1.0
    chosen = compare(names, [[ids, bias, boxes, logits]], [[ids, bias, boxes, cand_logits]], score_output="logits")
    assert chosen.score_output == "logits" and chosen.agreement == 0.5
    with pytest.raises(GraphoptError, match="not a model output"):
        Accumulator(names, score_output="nope")
    none = compare(["bias"], [[bias]], [[bias]])
    assert none.score_output is None and none.agreement is None


def test_streaming_equals_one_shot_on_concatenation():
    rng = np.random.default_rng(2)
    refs = [rng.normal(size=(n, 5)).astype(np.float32) for n in (2, 3, 4)]
    cands = [r + rng.normal(scale=0.1, size=r.shape).astype(np.float32) for r in refs]
    labels = rng.integers(0, 5, size=9)
    streamed = compare(["y"], [[r] for r in refs], [[c] for c in cands], labels=labels)
    one_shot = compare(["y"], [[np.concatenate(refs)]], [[np.concatenate(cands)]], labels=labels)
    a, b = streamed.outputs[0], one_shot.outputs[0]
    for field in ("max_abs", "mean_abs", "cosine", "snr_db", "worst_channel_snr_db", "worst_channel_cosine"):
        assert getattr(a, field) == pytest.approx(getattr(b, field), rel=1e-12)
    assert a.worst_channel == b.worst_channel and streamed.samples == one_shot.samples == 9
    assert (streamed.agreement, streamed.accuracy, streamed.reference_accuracy) == pytest.approx(
        (one_shot.agreement, one_shot.accuracy, one_shot.reference_accuracy)
    )


def test_variable_width_feeds_accumulate_per_channel():
    # Text recognizer style [N, T, C] with T differing per feed: axis-1 index 4 exists only in the second feed.
    rng = np.random.default_rng(3)
    r1, r2 = rng.normal(size=(1, 3, 6)), rng.normal(size=(2, 5, 6))
    c1, c2 = r1 + 0.01, r2.copy()
    c2[:, 4] *= 0.5  # error only at the extra position
    acc = Accumulator(["probs"])
    acc.add([r1], [c1])
    acc.add([r2], [c2])
    m = acc.result().outputs[0]
    assert m.channels == 5 and m.worst_channel == 4
    expected = 10 * math.log10(np.sum(r2[:, 4] ** 2) / np.sum((0.5 * r2[:, 4]) ** 2))  # 6.02 dB
    assert m.worst_channel_snr_db == pytest.approx(expected)
    assert m.mean_abs == pytest.approx((18 * 0.01 + np.abs(0.5 * r2[:, 4]).sum()) / (18 + 60))
    whole_err = 18 * 0.01**2 + np.sum((0.5 * r2[:, 4]) ** 2)
    assert m.snr_db == pytest.approx(10 * math.log10((np.sum(r1**2) + np.sum(r2**2)) / whole_err))


def test_nan_candidate_fails_and_stays_json_safe():
    ref = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    cand = ref.copy()
    cand[1, 1] = np.nan  # np.argmax returns the NaN's index, which is the reference's top class
    c = compare(["logits"], [[ref]], [[cand]])
    m = c.outputs[0]
    assert m.snr_db == -SNR_CAP and m.cosine == 0.0
    assert m.worst_channel == 1 and m.worst_channel_snr_db == -SNR_CAP and m.worst_channel_cosine == 0.0
    assert c.worst_snr_db == -SNR_CAP and math.isinf(m.max_abs)
    assert c.agreement == 0.5  # the NaN row cannot agree, even where argmax would pick the same index
    text = json.dumps(c.to_dict(), allow_nan=False)
    back = json.loads(text)
    assert back["outputs"][0]["max_abs"] is None and back["worst_snr_db"] == -SNR_CAP
    inf = one(ref, np.where(ref > 3, np.inf, ref))
    assert inf.snr_db == -SNR_CAP and inf.worst_channel == 1


def test_equal_nonfinite_values_agree():
    ref = np.array([[-np.inf, 0.0], [-1.0, -np.inf]])
    m = one(ref, ref.copy())
    assert m.snr_db == SNR_CAP and m.cosine == 1.0 and m.max_abs == 0.0


def test_integer_outputs_use_exact_match():
    ref = np.arange(20, dtype=np.int64).reshape(2, 10)
    cand = ref.copy()
    cand[0, 3] = 99
    m = one(ref, cand)
    assert m.exact_match == pytest.approx(19 / 20)
    assert m.snr_db == pytest.approx(10 * math.log10(20))  # 1/mismatch fraction
    assert m.worst_channel == 3 and m.worst_channel_snr_db == pytest.approx(10 * math.log10(2))
    assert m.max_abs == 96.0
    assert one(ref, ref).snr_db == SNR_CAP


def test_shape_and_count_mismatch_raise():
    with pytest.raises(GraphoptError, match=r"output 'y' feed 0: candidate shape \(2, 4\)"):
        compare(["y"], [[np.zeros((2, 3))]], [[np.zeros((2, 4))]])
    with pytest.raises(GraphoptError, match="expected 2 outputs"):
        Accumulator(["a", "b"]).add([np.zeros(1)], [np.zeros(1)])


def test_summary_and_dict_fields():
    c = Comparison(
        outputs=[OutputMetrics("s", 0.1, 0.01, 0.99, 40.0, 3, 31.24, 0.98, 10)],
        samples=100, score_output="s", agreement=0.994, accuracy=0.981, reference_accuracy=0.983,
    )
    assert c.summary().startswith("acc 0.981 (ref 0.983) agree 0.994 worst-ch SNR 31.2 dB")
    d = c.to_dict()
    assert d["worst_snr_db"] == 31.24 and d["outputs"][0]["worst_channel"] == 3
    assert c.drop("accuracy") == pytest.approx(0.002)


# ---- Evaluator end-to-end on onnxruntime ------------------------------------------------------------------


def _linear_model(weight: np.ndarray, input_dtype=TensorProto.FLOAT) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"]), helper.make_node("Relu", ["x"], ["feat"])],
        "linear",
        [helper.make_tensor_value_info("x", input_dtype, ["N", 4])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("feat", input_dtype, ["N", 4]),
        ],
        [numpy_helper.from_array(weight.astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_evaluator_end_to_end(tmp_path):
    rng = np.random.default_rng(4)
    weight = rng.normal(size=(4, 3)).astype(np.float32)
    perturbed = weight.copy()
    perturbed[:, 2] += rng.normal(scale=0.3, size=4).astype(np.float32)
    feeds = [{"x": rng.normal(size=(n, 4)).astype(np.float32)} for n in (5, 7, 4)]
    labels = np.concatenate([(f["x"] @ weight).argmax(1) for f in feeds])
    labels[:3] = (labels[:3] + 1) % 3  # reference is not perfect
    data = SimpleNamespace(feeds=feeds, labels=labels)

    reference = _linear_model(weight)
    path = tmp_path / "ref.onnx"
    onnx.save(reference, str(path))
    ev = Evaluator(str(path), data)
    same = ev.evaluate(reference)
    assert same.worst_snr_db == SNR_CAP and same.agreement == 1.0 and same.samples == 16
    assert same.accuracy == same.reference_accuracy == pytest.approx(13 / 16)

    got = ev.evaluate(_linear_model(perturbed))
    x = np.concatenate([f["x"] for f in feeds]).astype(np.float64)
    ref_out, cand_out = x @ weight.astype(np.float64), x @ perturbed.astype(np.float64)
    logits = got.outputs[0]
    assert logits.name == "logits" and got.score_output == "logits"
    assert logits.worst_channel == 2
    err = ref_out[:, 2] - cand_out[:, 2]
    expected = 10 * math.log10(np.sum(ref_out[:, 2] ** 2) / np.sum(err**2))
    assert logits.worst_channel_snr_db == pytest.approx(expected, abs=1e-3) and expected < 40
    assert logits.max_abs == pytest.approx(np.abs(err).max(), rel=1e-4)
    assert got.agreement == pytest.approx(np.mean(ref_out.argmax(1) == cand_out.argmax(1)))
    assert got.accuracy == pytest.approx(np.mean(cand_out.argmax(1) == labels))
    assert got.outputs[1].snr_db == SNR_CAP  # Relu branch untouched
    json.dumps(got.to_dict(), allow_nan=False)
    from_ir = Evaluator(ir.serde.deserialize_model(reference), data).evaluate(_linear_model(perturbed))
    assert from_ir.to_dict() == got.to_dict()

    # A candidate that cannot run on the feeds fails with one line naming the feed.
    broken = _linear_model(weight, input_dtype=TensorProto.DOUBLE)
    broken.graph.node[0].input[1] = "w64"
    broken.graph.initializer[0].CopyFrom(numpy_helper.from_array(weight.astype(np.float64), "w64"))
    broken.graph.output[0].type.tensor_type.elem_type = TensorProto.DOUBLE
    with pytest.raises(GraphoptError, match="candidate model failed on evaluation feed 0: ") as info:
        ev.evaluate(broken)
    assert "\n" not in str(info.value)

    with pytest.raises(DataError, match="15 labels for 16"):
        Evaluator(reference, SimpleNamespace(feeds=feeds, labels=labels[:15]))


def test_non_numeric_outputs_exact_match():
    # scikit-learn converters return string labels and ZipMap dicts (onnxruntime gives a list of dicts).
    ref_labels, cand_labels = np.array(["cat", "dog", "cat", "eel"]), np.array(["cat", "dog", "dog", "eel"])
    ref_maps = [{0: 0.9, 1: 0.1}, {0: 0.2, 1: 0.8}]
    cand_maps = [{0: 0.9, 1: 0.1}, {0: 0.3, 1: 0.7}]
    c = compare(["label", "probabilities"], [[ref_labels, ref_maps]], [[cand_labels, cand_maps]])
    labels, maps = c.outputs
    assert labels.exact_match == 0.75 and labels.snr_db == pytest.approx(10 * math.log10(4))
    assert labels.max_abs == 1.0 and labels.mean_abs == 0.25
    assert maps.exact_match == 0.5 and maps.cosine == 0.5
    assert c.score_output is None
    json.dumps(c.to_dict(), allow_nan=False)


def test_large_int64_ids_compare_exactly():
    ref = np.array([[2**62, 2**62 + 1]], np.int64)
    m = one(ref, ref + np.array([[0, 1]]))  # equal after a float64 cast, yet different ids
    assert m.exact_match == 0.5


# ---- what each output is, and the cosine gate on embeddings and hidden states ------------------------------


from graphopt.data import Dataset  # noqa: E402
from graphopt.metrics import FEATURES, SCORES, VALUES, WORST_SAMPLE_SLACK, TaskMetric  # noqa: E402
from graphopt.report import BASELINE, PassRow, Report, format_table, to_markdown  # noqa: E402
from graphopt.verify import Gate  # noqa: E402
from tests.encoder_graphs import EncoderConfig, bert_encoder, encoder_feeds  # noqa: E402
from tests.helpers import make_proto, run_model  # noqa: E402

ENCODER = EncoderConfig()
HEADS = ("pooler", "logits", "probs", "token_logits", "mean_pooled", "normalized")


def _encoder_data(count: int = 3) -> Dataset:
    return Dataset(feeds=encoder_feeds(ENCODER, batch=2, sequence=10, count=count))


def test_roles_are_read_from_the_graph_not_the_names():
    ev = Evaluator(bert_encoder(ENCODER, HEADS), _encoder_data(1))
    roles = {r.name: r.role for r in ev.roles}
    assert roles == {"last_hidden_state": FEATURES, "pooler_output": FEATURES, "logits": SCORES, "probs": SCORES,
                     "token_logits": SCORES, "mean_pooled": FEATURES, "normalized": FEATURES}
    why = {r.name: r.why for r in ev.roles}
    assert "LayerNormalization" in why["last_hidden_state"] and "LayerNormalization" in why["mean_pooled"]
    assert "softmax" in why["probs"] and "linear head" in why["logits"] and "norm" in why["normalized"]
    assert ev.score_output == "logits" and not any(r.guessed for r in ev.roles)
    # the same graph with every output renamed to what a classifier would call its scores: same roles
    proto = bert_encoder(ENCODER, ("pooler",))
    for i, out in enumerate(proto.graph.output):
        for node in proto.graph.node:
            node.output[:] = [f"logits{i}" if o == out.name else o for o in node.output]
        out.name = f"logits{i}"
    renamed = Evaluator(proto, _encoder_data(1))
    assert [r.role for r in renamed.roles] == [FEATURES, FEATURES] and renamed.score_output == ""


def test_encoder_gate_is_cosine_and_the_hidden_states_are_no_class_scores():
    data = _encoder_data()
    reference = bert_encoder(ENCODER)
    ev = Evaluator(reference, data)
    same = ev.evaluate(reference)
    assert same.score_output is None and same.agreement is None  # no arg-max over 32 hidden features
    assert same.cosine == pytest.approx(1.0) and same.worst_sample_cosine == pytest.approx(1.0)
    gate, note = Gate(None, 0.01, None).resolved(same)
    assert gate.metric == "cosine" and gate.min_snr is None and note is None
    # the user's metric function and an explicit metric override the reading of the outputs
    task = TaskMetric(lambda session: 1.0, "mine")
    assert Gate(None, 0.01, None, task).resolved(same)[0].metric == "task"
    assert Gate("snr", 0.01, 20.0).resolved(same) == (Gate("snr", 0.01, 20.0), None)
    fallback, note = Gate("agreement", 0.01, None).resolved(same)
    assert fallback.metric == "cosine" and "no agreement" in note and "mean >= 0.99" in note
    # --score-output still makes an output class scores, whatever it is
    named = Evaluator(reference, data, score_output="last_hidden_state")
    assert named.roles[0].role == SCORES and named.evaluate(reference).agreement == 1.0


def _perturbed(proto: onnx.ModelProto, scale: float) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for init in out.graph.initializer:
        if init.name == "encoder.layer.1.intermediate.dense.weight":
            w = numpy_helper.to_array(init)
            noise = np.random.default_rng(7).standard_normal(w.shape).astype(np.float32) * scale * np.abs(w).mean()
            init.CopyFrom(numpy_helper.from_array(w + noise, init.name))
    return out


def test_cosine_metric_against_numpy_on_onnxruntime_outputs():
    data = _encoder_data()
    reference = bert_encoder(ENCODER)
    candidate = _perturbed(reference, 2.0)
    got = Evaluator(reference, data).evaluate(candidate)
    # per token: cosine over the 32 hidden features; per sample: the mean over its tokens
    per_sample = []
    for feed in data.feeds:
        r = run_model(reference, feed)["last_hidden_state"].astype(np.float64)
        c = run_model(candidate, feed)["last_hidden_state"].astype(np.float64)
        per_sample.append((r * c).sum(-1) / np.linalg.norm(r, axis=-1) / np.linalg.norm(c, axis=-1))
    tokens = np.concatenate([p.reshape(-1) for p in per_sample])
    worst = min(p.mean(axis=1).min() for p in per_sample)
    assert got.cosine == pytest.approx(tokens.mean(), abs=1e-6) and 0.5 < got.cosine < 0.999
    assert got.worst_sample_cosine == pytest.approx(worst, abs=1e-6) and worst < got.cosine
    drop = max(1 - tokens.mean(), (1 - worst) / WORST_SAMPLE_SLACK)
    assert got.drop("cosine") == pytest.approx(drop, abs=1e-6) == got.drop("cosine", stressed=True)
    assert got.value("cosine") == got.cosine
    gate = Gate("cosine", 0.01, None)
    assert gate.failure(got, drop + 1e-4) is None
    assert "cosine" in gate.failure(got, drop - 1e-4) and "worst sample" in gate.failure(got, drop - 1e-4)


def test_cosine_per_vector_by_hand():
    # two samples of two 2-vectors: cosines 1 and 24/25 (sample 0), 0 (a zero candidate) and 1 (both zero)
    ref = np.array([[[1.0, 0.0], [3.0, 4.0]], [[1.0, 1.0], [0.0, 0.0]]])
    cand = np.array([[[2.0, 0.0], [4.0, 3.0]], [[0.0, 0.0], [0.0, 0.0]]])
    c = compare(["h"], [[ref]], [[cand]], score_output="")
    assert c.cosine == pytest.approx((1.0 + 0.96 + 0.0 + 1.0) / 4)
    assert c.worst_sample_cosine == pytest.approx(0.5)
    assert c.outputs[0].vector_cosine == c.cosine
    nan = cand.copy()
    nan[0, 0, 0] = np.nan  # a broken vector counts as cosine 0
    assert compare(["h"], [[ref]], [[nan]], score_output="").cosine == pytest.approx((0.0 + 0.96 + 0.0 + 1.0) / 4)
    assert c.cosine_outputs == ["h"]
    # without a graph the old shape rule stands: [N, T, C] is taken for scores; with no other output, the cosine
    # is taken over the scores (what an explicit --metric cosine on a classifier judges)
    scores = compare(["h"], [[ref]], [[cand]])
    assert scores.score_output == "h" and scores.cosine == c.cosine and scores.cosine_outputs == ["h"]


def test_explicit_cosine_on_a_classifier_judges_its_scores():
    rng = np.random.default_rng(4)
    weight = rng.normal(size=(6, 3)).astype(np.float32)
    reference = _one_output([helper.make_node("MatMul", ["x", "w"], ["y"])], 3, {"w": weight})
    data = Dataset(feeds=[{"x": rng.normal(size=(8, 6)).astype(np.float32)}])
    candidate = _one_output([helper.make_node("MatMul", ["x", "w"], ["y"])], 3, {"w": weight + 0.3})
    comparison = Evaluator(reference, data).evaluate(candidate)
    assert comparison.score_output == "y" and comparison.cosine_outputs == ["y"]
    ref, cand = data.feeds[0]["x"] @ weight, data.feeds[0]["x"] @ (weight + 0.3)
    rows = (ref * cand).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(cand, axis=1)
    assert comparison.cosine == pytest.approx(rows.mean(), abs=1e-5)
    assert Gate("cosine", 0.01, None).resolved(comparison) == (Gate("cosine", 0.01, None), None)
    assert Gate(None, 0.01, None).resolved(comparison)[0].metric == "agreement"


def _one_output(nodes, out_dims, inits) -> onnx.ModelProto:
    return make_proto(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_dims])], inits)


def test_residual_add_is_features_and_an_unexplained_add_stays_class_scores():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 6)).astype(np.float32)
    data = Dataset(feeds=[{"x": rng.standard_normal((8, 6)).astype(np.float32)}])
    residual = _one_output([helper.make_node("MatMul", ["x", "w"], ["f"]), helper.make_node("Add", ["x", "f"], ["y"])],
                           6, {"w": w})
    (role,) = Evaluator(residual, data).roles
    assert (role.role, role.why) == (FEATURES, "a residual Add: hidden states")
    # two branches added, neither an ancestor of the other: nothing says what it is, so class scores as before
    branches = _one_output([helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("MatMul", ["x", "v"], ["b"]),
                            helper.make_node("Add", ["a", "b"], ["y"])], 6, {"w": w, "v": w * 0.5})
    ev = Evaluator(branches, data)
    assert ev.roles[0].role == SCORES and ev.roles[0].guessed and ev.score_output == "y"
    assert Gate(None, 0.01, None).resolved(ev.evaluate(branches))[0].metric == "agreement"


def test_suffix_accumulators_follow_the_evaluators_reading():
    # graphopt.sensitivity.suffix builds its Accumulator from the evaluator's names and score output
    reference = bert_encoder(ENCODER)
    ev = Evaluator(reference, _encoder_data(1))
    acc = Accumulator(ev.output_names, ev.score_output, ev.map_threshold)
    acc.add(ev.reference_outputs[0], ev.reference_outputs[0])
    result = acc.result()
    assert result.agreement is None and result.cosine == pytest.approx(1.0)


def test_report_says_which_rule_judged_each_output_and_why():
    reference = bert_encoder(ENCODER, ("logits",))
    ev = Evaluator(reference, _encoder_data(1))
    comparison = ev.evaluate(reference)
    gate = Gate(None, 0.01, None).resolved(comparison)[0]
    assert gate.metric == "agreement"  # class scores exist: they are what is judged
    report = Report(model="m", output=None, data="d", synthetic=False, metric=gate.metric, max_drop=0.01,
                    min_snr=None, passes=[PassRow("input", BASELINE, metrics=comparison.to_dict())], passed=True)
    text = format_table(report)
    assert "logits: class scores (a linear head (Gemm with a constant weight)) -> agreement" in text
    assert "last_hidden_state: features (a LayerNormalization output: hidden states or embeddings) -> not gated" \
        in text
    report.metric = "cosine"
    assert "last_hidden_state: features (a LayerNormalization output: hidden states or embeddings) → cosine" \
        in to_markdown(report)
    assert "mean cosine ≥ 0.99, every sample ≥ 0.95" in to_markdown(report)


def test_a_score_map_stays_on_snr_unless_named():
    # A detector's probability map [N, 1, H, W] (PP-OCR det's): worst-channel SNR as before, agreement per pixel
    # when --score-output names it.
    rng = np.random.default_rng(5)
    proto = make_proto([helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Sigmoid", ["c"], ["map"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
                       [helper.make_tensor_value_info("map", TensorProto.FLOAT, ["N", 1, 4, 4])],
                       {"w": rng.standard_normal((1, 2, 1, 1)).astype(np.float32)})
    data = Dataset(feeds=[{"x": rng.standard_normal((3, 2, 4, 4)).astype(np.float32)}])
    ev = Evaluator(proto, data)
    assert ev.roles[0].role == VALUES and "--score-output" in ev.roles[0].why
    assert Gate(None, 0.01, None).resolved(ev.evaluate(proto))[0] == Gate("snr", 0.01, 30.0)
    named = Evaluator(proto, data, score_output="map")
    assert Gate(None, 0.01, None).resolved(named.evaluate(proto))[0].metric == "agreement"


def test_optimize_on_an_encoder_gates_on_cosine_end_to_end(tmp_path, capsys):
    from graphopt import cli

    model, data = tmp_path / "encoder.onnx", tmp_path / "data.npz"
    onnx.save(bert_encoder(ENCODER, ("pooler",)), str(model))
    feeds = encoder_feeds(ENCODER, batch=8, sequence=10, count=1)[0]
    np.savez(data, **feeds)
    argv = ["optimize", str(model), "-o", str(tmp_path / "out.onnx"), "--passes", "canonicalize", "--data", str(data),
            "--no-latency", "--quiet", "--report", str(tmp_path / "report.json")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "gate: cosine drop <= 0.01 (mean cosine >= 0.99, every sample >= 0.95): PASSED" in out
    assert "pooler_output: features (a Tanh output: a pooler's features) -> cosine" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["metric"] == "cosine" and report["final"]["cosine"] == pytest.approx(1.0)
    assert [r["role"] for r in report["passes"][0]["metrics"]["roles"]] == [FEATURES, FEATURES]
    assert cli.main(argv + ["--metric", "snr", "--min-snr", "40"]) == 0  # an explicit metric wins
    out = capsys.readouterr().out
    assert "gate: worst-channel SNR >= 40 dB: PASSED" in out and "-> worst-channel SNR >= 40 dB" in out
