"""graphopt.capture: exposed values equal direct onnxruntime runs; streaming statistics equal batch ones."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from graphopt.capture import Moments, TensorStats, layer_moments, stream, tensor_stats, with_outputs
from graphopt.data import Dataset
from graphopt.errors import DataError, GraphoptError
from graphopt.linear import as_linear, fold_output, unfold
from graphopt.weights import replace_initializer
from tests.helpers import clone, make_model, make_proto, randn, run_model, tensor_info

F32 = np.float32


def _conv_relu_nodes():
    return [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"], name="relu"),
            helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2", strides=[2, 2])]


def _inits(seed=0):
    return {"w": randn((4, 2, 3, 3), seed), "b": randn((4,), seed + 1), "w2": randn((3, 4, 2, 2), seed + 2)}


def _fully_conv(seed=0):
    """Input with dynamic spatial dims, so feeds may differ in shape."""
    return make_model(_conv_relu_nodes(), [tensor_info("x", F32, ["N", 2, None, None])], ["y"], _inits(seed))


def _mixed_feeds():
    return Dataset([{"x": randn((2, 2, 6, 6), seed=10)}, {"x": randn((3, 2, 9, 5), seed=11)},
                    {"x": randn((1, 2, 4, 7), seed=12)}])


def test_stream_equals_direct_runs():
    model = _fully_conv()
    # The same graph built independently with the intermediate values as declared outputs.
    direct = make_proto(_conv_relu_nodes(), [tensor_info("x", F32, ["N", 2, None, None])], ["y", "c", "r"], _inits())
    data = _mixed_feeds()
    got = list(stream(model, ["r", "c", "x", "y", "w2"], data))
    assert len(got) == 3
    for feed, acts in zip(data.feeds, got):
        want = run_model(direct, feed)
        for name in ("c", "r", "y"):
            np.testing.assert_array_equal(acts[name], want[name])
        np.testing.assert_array_equal(acts["x"], feed["x"])  # a graph input comes from the feed
        np.testing.assert_array_equal(acts["w2"], _inits()["w2"])  # an initializer from the model
    assert len(list(stream(model, ["r"], data, max_samples=2))) == 1  # first feed holds 2 samples


def test_with_outputs_leaves_the_model_alone_and_rejects_unknown_names():
    model = _fully_conv()
    before = [v.name for v in model.graph.outputs]
    proto = with_outputs(model, ["c", "y", "c"])
    assert [o.name for o in proto.graph.output] == ["y", "c"]
    assert [v.name for v in model.graph.outputs] == before
    with pytest.raises(GraphoptError, match="'nope' is not in the model's main graph"):
        with_outputs(model, ["nope"])


def _batch_stats(arrays):
    flat = np.concatenate([a.reshape(-1) for a in arrays]).astype(np.float64)
    per_channel = np.concatenate([np.moveaxis(a, 1, 0).reshape(a.shape[1], -1) for a in arrays], axis=1)
    return flat, per_channel.astype(np.float64)


@pytest.mark.parametrize("signed", [False, True])
def test_tensor_stats_stream_equals_batch(signed):
    model, data = _fully_conv(), _mixed_feeds()
    stats = tensor_stats(model, ["c"], data, bins=64, signed=signed)["c"]
    arrays = [acts["c"] for acts in stream(model, ["c"], data)]
    flat, chan = _batch_stats(arrays)
    assert stats.count == flat.size
    assert stats.min == flat.min() and stats.max == flat.max() and stats.abs_max == np.abs(flat).max()
    assert stats.mean == pytest.approx(flat.mean()) and stats.std == pytest.approx(flat.std())
    np.testing.assert_allclose(stats.channel_mean(), chan.mean(axis=1))
    np.testing.assert_allclose(stats.channel_std(), chan.std(axis=1))
    np.testing.assert_allclose(stats.channel_mean_abs(), np.abs(chan).mean(axis=1))
    np.testing.assert_array_equal(stats.channel_min, chan.min(axis=1))
    np.testing.assert_array_equal(stats.channel_max, chan.max(axis=1))
    counts, edges = stats.histogram()
    want, _ = np.histogram(flat if signed else np.abs(flat), bins=edges)
    np.testing.assert_array_equal(counts, want)
    width = edges[1] - edges[0]
    for p in (50.0, 99.0):
        assert abs(stats.percentile(p) - np.percentile(flat if signed else np.abs(flat), p)) <= width


def test_histogram_grows_exactly():
    stats = TensorStats(bins=8)
    stats.update(np.zeros(3))  # zeros before any range is known
    stats.update(np.array([0.1, 0.5, 1.0]))
    stats.update(np.array([3.5, -2.2]))  # range 1 -> 4: bins merge pairwise twice
    counts, edges = stats.histogram()
    assert edges[-1] == 4.0  # 1.0 opened [0, 2); 3.5 needs [0, 4)
    np.testing.assert_array_equal(counts, np.histogram([0, 0, 0, 0.1, 0.5, 1.0, 3.5, 2.2], bins=edges)[0])
    other = TensorStats()
    other.update(np.ones((1, 3)))
    with pytest.raises(GraphoptError, match="4 channels on axis 1, earlier feeds had 3"):
        other.update(np.ones((1, 4)))
    loose = TensorStats(channels=False)
    loose.update(np.ones((1, 3)))
    loose.update(-np.ones((1, 4)))
    assert loose.count == 7 and loose.min == -1 and loose.channel_sum is None


def test_moments_equal_batch_products():
    rng = np.random.default_rng(0)
    xs, ys = [rng.standard_normal((n, 5)) for n in (3, 7)], [rng.standard_normal((n, 2)) for n in (3, 7)]
    m = Moments(5)
    for x, y in zip(xs, ys):
        m.update(x, y)
    xa = np.hstack([np.vstack(xs), np.ones((10, 1))])
    np.testing.assert_allclose(m.xtx, xa.T @ xa)
    np.testing.assert_allclose(m.xty, xa.T @ np.vstack(ys))
    np.testing.assert_allclose(m.yty, (np.vstack(ys) ** 2).sum(axis=0))
    assert m.rows == 10 and m.xtx[-1, -1] == 10


def _two_layers(seed):
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    inits = {"w1": randn((6, 4), seed), "b1": randn((6,), seed + 1), "w2": randn((6, 3), seed + 2)}
    return make_model(nodes, [tensor_info("x", F32, ["N", 4])], ["y"], inits)


def test_layer_moments_with_teacher_targets():
    teacher = _two_layers(0)
    student = clone(teacher)
    w1 = student.graph.initializers["w1"]
    replace_initializer(w1, w1.const_value.numpy() * 0.9)  # the student drifted from the teacher
    layers = [as_linear(n) for n in student.graph if n.op_type in ("Gemm", "MatMul")]
    data = Dataset([{"x": randn((5, 4), seed=20)}, {"x": randn((3, 4), seed=21)}])
    moments = layer_moments(student, layers, data, targets={"fc2": "y"}, target_model=teacher)
    assert set(moments) == {"fc1", "fc2"}
    acts = [run_model(_expose(student, ["x", "r", "h"]), f) for f in data.feeds]
    teacher_y = np.vstack([run_model(teacher, f)["y"] for f in data.feeds])
    r = np.hstack([np.vstack([a["r"] for a in acts]), np.ones((8, 1))])
    np.testing.assert_allclose(moments["fc2"].xtx, r.T @ r, rtol=1e-5)
    np.testing.assert_allclose(moments["fc2"].xty, r.T @ teacher_y, rtol=1e-5, atol=1e-5)
    x = np.hstack([np.vstack([f["x"] for f in data.feeds]), np.ones((8, 1))])
    own_h = np.vstack([a["h"] for a in acts])  # fc1 has no target: its own output in the student
    np.testing.assert_allclose(moments["fc1"].xty, x.T @ own_h, rtol=1e-5, atol=1e-5)


def _expose(model, names):
    return with_outputs(model, names)


def test_layer_moments_subsamples_conv_rows():
    model, data = _fully_conv(), _mixed_feeds()
    layer = as_linear(next(n for n in model.graph if n.name == "conv"))
    full = layer_moments(model, [layer], data)["conv"]
    total = sum(f["x"].shape[0] * f["x"].shape[2] * f["x"].shape[3] for f in data.feeds)  # pads keep H, W
    assert full.rows == total
    # The full moments reproduce the layer exactly: the conv is its own target.
    acts = list(stream(model, ["x", "c"], data))
    xs = np.vstack([unfold(a["x"], layer) for a in acts])
    ys = np.vstack([fold_output(a["c"], layer) for a in acts])
    xa = np.hstack([xs, np.ones((len(xs), 1))])
    np.testing.assert_allclose(full.xtx, xa.T @ xa, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(full.xty, xa.T @ ys, rtol=1e-5, atol=1e-4)
    small = layer_moments(model, [layer], data, max_rows=30)["conv"]
    assert small.rows == 30  # 10 rows from each of the 3 feeds
    again = layer_moments(model, [layer], data, max_rows=30)["conv"]
    np.testing.assert_array_equal(small.xtx, again.xtx)  # seeded


def test_layer_moments_rejects_a_target_of_the_wrong_shape():
    model = _two_layers(0)
    layers = [as_linear(n) for n in model.graph if n.name == "fc2"]
    data = Dataset([{"x": randn((5, 4), seed=20)}])
    with pytest.raises(DataError, match="layer 'fc2': target 'h' has shape"):
        layer_moments(model, layers, data, targets={"fc2": "h"})
