"""Benchmark fixtures: the light-topology builder, the OCR scorer and the PP-OCR model fetcher."""

from __future__ import annotations

import hashlib
import importlib.util
import string
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from bench import ocr
from graphopt.errors import GraphoptError
from graphopt.runtime import make_session
from models import fetch, light


# ---------------------------------------------------------------- light topologies

def _bn_outputs(model: ir.Model, feed: dict[str, np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    proto = ir.serde.serialize_model(model)
    bn_outs = [n.output[0] for n in proto.graph.node if n.op_type == "BatchNormalization"]
    proto.graph.output.extend(helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in bn_outs)
    outs = make_session(proto).run(None, feed)
    return outs[0], outs[1:]


@pytest.mark.parametrize("name", ["squeezenet", "shufflenet"])
def test_light_small_models_are_upgraded_random_and_finite(name, tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_CACHE", str(tmp_path))
    path = light.build_light(name, seed=0)
    assert path.parent == tmp_path / "light"
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.ir_version == 7 and proto.opset_import[0].version == 13
    assert not any(n.op_type == "ConstantOfShape" for n in proto.graph.node)
    inits = {t.name for t in proto.graph.initializer}
    assert not inits & {i.name for i in proto.graph.input}, "initializers must be unlisted from inputs"

    # He-normal: every conv weight's std is sqrt(2 / fan_in) (within sampling error).
    model = ir.serde.deserialize_model(proto)
    for node in model.graph:
        if node.op_type == "Conv":
            w = node.inputs[1].const_value.numpy()
            if w.size >= 2000:
                assert w.std() == pytest.approx(np.sqrt(2.0 / np.prod(w.shape[1:])), rel=0.1)

    x = np.random.default_rng(3).standard_normal((1, 3, 224, 224)).astype(np.float32)
    out, bn_outs = _bn_outputs(model, {model.graph.inputs[0].name: x})
    assert out.shape[1] == 1000 and np.isfinite(out).all()
    assert out.sum() == pytest.approx(1.0, abs=1e-4)  # both end in Softmax
    assert out.max() < 0.5, "a near one-hot output means exploded logits"
    # Calibrated BN: outputs stay O(1) to the last layer (identity BNs reach ~1e6 in ShuffleNet).
    assert all(np.abs(b).max() < 50 for b in bn_outs)

    # Cache reuse, seed determinism and seed sensitivity.
    mtime = path.stat().st_mtime_ns
    assert light.build_light(name, seed=0) == path and path.stat().st_mtime_ns == mtime
    other = onnx.load(str(light.build_light(name, seed=1)))
    first_conv = next(n for n in proto.graph.node if n.op_type == "Conv").input[1]
    a = next(t for t in proto.graph.initializer if t.name == first_conv)
    b = next(t for t in other.graph.initializer if t.name == first_conv)
    assert not np.array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
    again = light.build_model(name, seed=0).graph.initializers[first_conv].const_value.numpy()
    assert np.array_equal(again, onnx.numpy_helper.to_array(a))


def test_light_unknown_name():
    with pytest.raises(GraphoptError, match="unknown light model 'resnet18'"):
        light.build_model("resnet18")


@pytest.mark.slow
def test_light_all_nine_finite(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_CACHE", str(tmp_path))
    for name in light.NAMES:
        path = light.build_light(name)
        sess = make_session(path, threads=2)
        inp = sess.get_inputs()[0]
        x = np.random.default_rng(5).standard_normal(inp.shape).astype(np.float32)
        out = sess.run(None, {inp.name: x})[0]
        assert out.shape[:2] == (1, 1000), name
        assert np.isfinite(out).all(), name
        path.unlink()  # VGG-19 alone is 575 MB


# ---------------------------------------------------------------- OCR scoring: pure parts

def _can_render() -> str | None:
    """Why text cannot be rendered here, or None (Pillow is a [bench] extra; fonts a Debian package)."""
    if importlib.util.find_spec("PIL") is None:
        return "Pillow not installed (pip install pillow)"
    if not any((ocr.FONT_DIR / f).is_file() for f in ocr.FONT_FILES):
        return f"no DejaVu fonts (apt-get install -y {ocr.FONT_PACKAGE})"
    return None


needs_render = pytest.mark.skipif(_can_render() is not None, reason=str(_can_render()))


@pytest.mark.parametrize("a,b,d", [("kitten", "sitting", 3), ("", "abc", 3), ("abc", "", 3),
                                   ("flaw", "lawn", 2), ("same", "same", 0), ("ab", "ba", 2)])
def test_edit_distance(a, b, d):
    assert ocr.edit_distance(a, b) == d
    assert ocr.edit_distance(b, a) == d


def test_cer_is_total_distance_over_total_reference_length():
    assert ocr.cer(["abc", "abd"], ["abc", "abc"]) == pytest.approx(1 / 6)
    assert ocr.cer(["", "x"], ["ab", "xyz"]) == pytest.approx(4 / 5)
    assert ocr.cer(["a"], ["a"]) == 0.0


def _onehot(indices: list[int], n: int) -> np.ndarray:
    logits = np.full((len(indices), n), -1.0, dtype=np.float32)
    logits[np.arange(len(indices)), indices] = 2.0
    return logits


def test_ctc_decode_merges_repeats_and_drops_blanks():
    charset = ["blank", "a", "b", " "]
    # a a | blank | a b b | space | blank | b  ->  "aab b" (a blank separates the two a's)
    assert ocr.ctc_decode(_onehot([1, 1, 0, 1, 2, 2, 3, 0, 2], 4), charset) == "aab b"
    assert ocr.ctc_decode(_onehot([0, 0, 0], 4), charset) == ""
    assert ocr.ctc_decode(_onehot([2, 2, 2, 2], 4), charset) == "b"
    with pytest.raises(GraphoptError, match="charset of 4"):
        ocr.ctc_decode(np.zeros((5, 6), dtype=np.float32), charset)


def _fake_rec_model(logits: np.ndarray, chars: str) -> onnx.ModelProto:
    """A 'rec model' that ignores its image and returns fixed logits, with a rapidocr-style dictionary."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 48, None])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(logits.shape))
    const = helper.make_node("Constant", [], ["c"], value=onnx.numpy_helper.from_array(logits))
    # y = c + 0 * sum(x): keeps x an input that is really used
    nodes = [const, helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Mul", ["s", "zero"], ["z"]), helper.make_node("Add", ["c", "z"], ["y"])]
    graph = helper.make_graph(nodes, "fake_rec", [x], [y],
                              [onnx.numpy_helper.from_array(np.zeros((), np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    helper.set_model_props(model, {"character": "\n".join(chars)})
    return model


def test_score_rec_uses_model_dictionary_with_blank_and_space():
    # charset = blank, 'a', 'b', ' ' (appended): logits spell " ab " -> stripped "ab"
    logits = _onehot([3, 1, 0, 2, 3], 4)[None]
    model = _fake_rec_model(logits, "ab")
    assert ocr.charset_of(model) == ["blank", "a", "b", " "]
    feeds = [{"x": np.zeros((1, 3, 48, 320), np.float32)}] * 2
    scores = ocr.score_rec(model, feeds, ["ab", "abc"])
    assert scores["line_acc"] == 0.5
    assert scores["cer"] == pytest.approx(1 / 5)


@needs_render
def test_rec_and_cls_preprocessing_follow_rapidocr():
    line = np.full((30, 300, 3), 255, np.uint8)  # aspect 10 -> width 48*10 = 480, no padding
    feed = ocr.rec_preprocess(line)
    assert feed.shape == (1, 3, 48, 480) and feed.dtype == np.float32
    assert np.allclose(feed, 1.0)
    short = np.zeros((48, 100, 3), np.uint8)  # narrower than 320: padded with zeros (mid-grey)
    feed = ocr.rec_preprocess(short)
    assert feed.shape == (1, 3, 48, 320)
    assert np.allclose(feed[..., :100], -1.0) and np.all(feed[..., 100:] == 0.0)
    rgb = np.zeros((48, 48, 3), np.uint8)
    rgb[..., 0] = 255  # red in RGB is channel 2 in the BGR order the models were trained on
    feed = ocr.cls_preprocess(rgb)
    assert feed.shape == (1, 3, 48, 192)
    assert np.allclose(feed[0, 2, :, :48], 1.0) and np.allclose(feed[0, 0, :, :48], -1.0)
    assert ocr.det_resize_shape(480, 640) == (736, 992)
    assert ocr.det_resize_shape(800, 1000) == (800, 992)


@needs_render
def test_rec_data_is_seeded_realistic_and_variable_width(tmp_path):
    feeds, texts = ocr.make_rec_data(12, seed=5)
    again, texts2 = ocr.make_rec_data(12, seed=5)
    assert texts == texts2 and all(np.array_equal(a["x"], b["x"]) for a, b in zip(feeds, again))
    assert texts != ocr.make_rec_data(12, seed=6)[1]
    allowed = set(string.ascii_letters + string.digits + string.punctuation + " ")
    assert all(t and t == t.strip() and set(t) <= allowed for t in texts)
    widths = {f["x"].shape[3] for f in feeds}
    assert len(widths) > 1 and min(widths) >= 320
    assert all(f["x"].shape[:3] == (1, 3, 48) for f in feeds)

    folder = ocr.write_feed_folder(feeds, tmp_path / "rec")
    files = sorted(folder.glob("*.npz"))
    assert len(files) == 12
    with np.load(files[3]) as data:
        assert list(data.keys()) == ["x"] and np.array_equal(data["x"], feeds[3]["x"])


@needs_render
def test_cls_data_labels_match_rotation():
    feeds, labels = ocr.make_cls_data(20, seed=1)
    assert set(labels) == {0, 1}
    assert all(f["x"].shape == (1, 3, 48, 192) for f in feeds)


def test_boxes_from_map_finds_and_unclips_rectangles():
    prob = np.zeros((100, 200), np.float32)
    prob[20:30, 10:90] = 0.9
    prob[60:66, 120:190] = 0.8
    prob[80:83, 5:8] = 0.95  # 3x3 -> 4x4 after dilation, mean 9*0.95/16 = 0.53 >= box_thresh: kept
    prob[80:82, 50:52] = 0.9  # 2x2 -> 3x3 after dilation, mean 4*0.9/9 = 0.4 < box_thresh: dropped
    prob[90, 100] = 0.4       # one pixel -> 2x2 after dilation: a side under 3 pixels, dropped
    boxes = sorted(ocr.boxes_from_map(prob))
    assert len(boxes) == 3
    x0, y0, x1, y1 = next(b for b in boxes if b[0] < 10 and b[1] < 50)
    # dilated to 81x11; unclip distance = area * 1.6 / perimeter
    d = 81 * 11 * 1.6 / (2 * (81 + 11))
    assert (x0, y0, x1, y1) == pytest.approx((10 - d, 20 - d, 91 + d, 31 + d))


def test_label_components_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    mask = np.random.default_rng(0).random((60, 80)) > 0.55
    ours, n = ocr.label_components(mask)
    ref, n_ref = ndimage.label(mask)  # default structure: 4-connectivity
    assert n == n_ref
    # same partition (labels may be numbered differently)
    pairs = set(zip(ours[mask].tolist(), ref[mask].tolist()))
    assert len(pairs) == n


def test_match_boxes_is_one_to_one_at_iou_half():
    truth = [(0, 0, 10, 10), (20, 0, 30, 10)]
    pred = [(0, 0, 10, 10), (1, 0, 11, 10), (20, 0, 24, 10)]  # duplicate; third has IoU 0.4
    assert ocr.iou(pred[2], truth[1]) == pytest.approx(0.4)
    assert ocr.match_boxes(pred, truth) == 1
    assert ocr._f1(1, 3, 2)["f1"] == pytest.approx(2 * (1 / 3) * 0.5 / (1 / 3 + 0.5))


@needs_render
def test_det_data_boxes_are_in_feed_coordinates():
    feeds, boxes = ocr.make_det_data(2, seed=3)
    for feed, page in zip(feeds, boxes):
        _, _, h, w = feed["x"].shape
        assert h % 32 == 0 and w % 32 == 0 and min(h, w) >= 736
        assert page and all(0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h for x0, y0, x1, y1 in page)
        x0, y0, x1, y1 = (int(v) for v in page[0])
        inside = feed["x"][0, :, y0:y1, x0:x1]
        assert inside.min() < feed["x"][0, :, : max(y0, 1), :].min() + 1.0  # dark ink inside the box


# ---------------------------------------------------------------- fetch

def test_fetch_unzips_verifies_and_reuses_cache(tmp_path, monkeypatch):
    contents = {key: f"fake {key} model".encode() for key in fetch.MEMBERS}
    monkeypatch.setattr(fetch, "SHA256", {k: hashlib.sha256(v).hexdigest() for k, v in contents.items()})
    calls = []

    def fake_download(tmp: Path, spec: str) -> Path:
        calls.append(spec)
        wheel = tmp / "rapidocr_onnxruntime-1.4.4-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            for key, member in fetch.MEMBERS.items():
                archive.writestr(member, contents[key])
        return wheel

    monkeypatch.setattr(fetch, "_download_wheel", fake_download)
    paths = fetch.fetch_ocr_models(tmp_path / "models")
    assert set(paths) == {"det", "rec", "cls"}
    assert all(paths[k].read_bytes() == contents[k] for k in contents)
    assert fetch.fetch_ocr_models(tmp_path / "models") == paths and calls == [fetch.WHEEL]

    monkeypatch.setattr(fetch, "SHA256", {**fetch.SHA256, "cls": "0" * 64})
    with pytest.raises(fetch.FetchError, match="SHA-256"):
        fetch.fetch_ocr_models(tmp_path / "other")
    assert not list((tmp_path / "other").glob("*.part"))


@pytest.mark.slow
def test_fetch_real_models_and_float_scores(tmp_path):
    paths = fetch.fetch_ocr_models(tmp_path)
    assert {k: fetch._sha256(p) for k, p in paths.items()} == fetch.SHA256
    assert len(ocr.charset_of(paths["rec"])) == make_session(paths["rec"]).get_outputs()[0].shape[2]
    feeds, texts = ocr.make_rec_data(100, seed=ocr.CALIB_SEED)
    assert ocr.score_rec(paths["rec"], feeds, texts)["line_acc"] >= 0.8
    feeds, labels = ocr.make_cls_data(100, seed=ocr.CALIB_SEED)
    assert ocr.score_cls(paths["cls"], feeds, labels)["acc"] >= 0.9
    feeds, boxes = ocr.make_det_data(10, seed=ocr.CALIB_SEED)
    scores = ocr.score_det(paths["det"], paths["det"], feeds, boxes)
    assert scores["f1"] >= 0.9 and scores["map_max_abs"] == 0.0


@pytest.mark.slow
def test_magika_a_jax2tf_export_with_byte_inputs_compresses_and_keeps_its_predictions(tmp_path):
    """Magika (Google's file-type classifier, pinned wheel): int32 byte inputs, a one-hot MatMul embedding, jax2tf
    reshapes. Its own features of 64 files of the standard library; 8-bit per-channel codebooks keep every
    prediction two points of agreement allow and leave the file smaller after lzma."""
    import sysconfig

    from bench.auto_magika import features
    from graphopt import optimize
    from graphopt.bench import file_sizes
    from graphopt.pipeline import RunOptions

    paths = fetch.fetch_magika(tmp_path)
    assert {k: fetch._sha256(p) for k, p in paths.items()} == fetch.MAGIKA_SHA256
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size >= 64)[:64]
    x = np.stack([features(p) for p in files])
    np.savez(tmp_path / "bytes.npz", bytes=x)
    out = tmp_path / "magika.opt.onnx"
    report = optimize(str(paths["magika"]), out, passes="kmeans:bits=8,per_channel=true",
                      data=str(tmp_path / "bytes.npz"), max_drop=0.02, run=RunOptions(progress=False, latency=False))
    assert report.passed and [p.status for p in report.passes if p.step.startswith("kmeans")] == ["kept"]
    ref, got = (make_session(m).run(None, {"bytes": x})[0] for m in (paths["magika"], out))
    assert np.mean(ref.argmax(1) == got.argmax(1)) >= 0.98
    assert file_sizes(paths["magika"])[1] > 1.8 * file_sizes(out)[1]  # 2.0x measured: 8-bit codes pack poorly
