"""graphopt.data: sources, batching, splitting, and the one-line errors for data that does not fit."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from graphopt import data as gd
from graphopt.errors import DataError
from tests.helpers import make_proto, randn, tensor_info


def make_model(inputs: list[tuple[str, int, list]], initializer_inputs: bool = False) -> ir.Model:
    """Identity per input; optionally a weight that old exporters also list as a graph input."""
    nodes = [helper.make_node("Identity", [n], [f"{n}_out"]) for n, _, _ in inputs]
    vin = [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs]
    vout = [helper.make_tensor_value_info(f"{n}_out", t, None) for n, t, _ in inputs]
    inits = []
    if initializer_inputs:
        inits = [helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])]
        vin.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [2]))
        nodes.append(helper.make_node("Identity", ["w"], ["w_out"]))
        vout.append(helper.make_tensor_value_info("w_out", TensorProto.FLOAT, [2]))
    graph = helper.make_graph(nodes, "g", vin, vout, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ir.from_proto(proto)


FLOAT_DYN = [("x", TensorProto.FLOAT, ["N", 3])]
FLOAT_FIXED1 = [("x", TensorProto.FLOAT, [1, 3])]


def specs_of(inputs, **kw) -> list[gd.InputSpec]:
    return gd.input_specs(make_model(inputs, **kw))


def test_input_specs_skip_initializers_and_read_dims():
    specs = specs_of([("x", TensorProto.FLOAT, ["N", 3, None]), ("ids", TensorProto.INT64, [1])],
                     initializer_inputs=True)
    assert specs == [gd.InputSpec("x", np.dtype(np.float32), ("N", 3, None)),
                     gd.InputSpec("ids", np.dtype(np.int64), (1,))]


def test_npz_dynamic_batch_chunks_and_labels(tmp_path):
    x = np.arange(70 * 3, dtype=np.float64).reshape(70, 3)
    np.savez(tmp_path / "d.npz", x=x, labels=np.arange(70))
    ds = gd.load_npz(tmp_path / "d.npz", specs_of(FLOAT_DYN), batch_size=32)
    assert [f["x"].shape[0] for f in ds.feeds] == [32, 32, 6]
    assert ds.feeds[0]["x"].dtype == np.float32  # float64 cast silently
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in ds.feeds]), x.astype(np.float32))
    assert ds.num_samples == 70 and len(ds) == 3 and not ds.synthetic
    np.testing.assert_array_equal(ds.labels, np.arange(70))
    assert "d.npz (70 samples)" in ds.source


def test_npz_fixed_batch_one_feed_per_sample_and_runs_in_ort(tmp_path):
    model = make_model(FLOAT_FIXED1)
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    ds = gd.load_npz(tmp_path / "d.npz", gd.input_specs(model))
    assert len(ds) == 5 and all(f["x"].shape == (1, 3) for f in ds.feeds)
    proto = ir.to_proto(model)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for i, feed in enumerate(ds.reader()):
        np.testing.assert_array_equal(sess.run(None, feed)[0], x[i : i + 1])


def test_npz_fixed_batch_drops_remainder(tmp_path):
    specs = specs_of([("x", TensorProto.FLOAT, [4, 3])])
    np.savez(tmp_path / "d.npz", x=np.zeros((10, 3), np.float32), labels=np.arange(10))
    ds = gd.load_npz(tmp_path / "d.npz", specs)
    assert [f["x"].shape[0] for f in ds.feeds] == [4, 4] and ds.labels.tolist() == list(range(8))
    assert "2 dropped" in ds.source
    np.savez(tmp_path / "small.npz", x=np.zeros((3, 3), np.float32))
    with pytest.raises(DataError, match="fewer than the model's fixed batch of 4"):
        gd.load_npz(tmp_path / "small.npz", specs)


def test_int32_cast_to_int64_and_scalar_input_shared(tmp_path):
    specs = specs_of([("ids", TensorProto.INT64, ["N", 4]), ("t", TensorProto.FLOAT, [])])
    np.savez(tmp_path / "d.npz", ids=np.ones((3, 4), np.int32), t=np.float32(0.5))
    ds = gd.load_npz(tmp_path / "d.npz", specs, batch_size=2)
    assert ds.feeds[0]["ids"].dtype == np.int64 and ds.num_samples == 3
    assert all(f["t"].shape == () and f["t"] == 0.5 for f in ds.feeds)


def test_folder_each_file_one_feed_sorted(tmp_path):
    specs = specs_of([("x", TensorProto.FLOAT, [1, 3, "W"]), ("h", TensorProto.FLOAT, [2, 1, 4])])
    for name, width in [("b", 7), ("a", 5), ("c", 9)]:
        np.savez(tmp_path / f"{name}.npz", x=np.zeros((1, 3, width)), h=np.ones((2, 1, 4), np.float32),
                 labels=np.array([f"text-{name}"]))
    ds = gd.load_folder(tmp_path, specs)
    assert [f["x"].shape[2] for f in ds.feeds] == [5, 7, 9]
    assert ds.labels.tolist() == ["text-a", "text-b", "text-c"]
    assert ds.feeds[0]["x"].dtype == np.float32
    head = ds.head(2)
    assert len(head) == 2 and head.labels.tolist() == ["text-a", "text-b"]


def test_folder_fixed_dim_mismatch_names_file(tmp_path):
    specs = specs_of([("x", TensorProto.FLOAT, [1, 3, "W"])])
    np.savez(tmp_path / "a.npz", x=np.zeros((1, 3, 5), np.float32))
    np.savez(tmp_path / "b.npz", x=np.zeros((2, 3, 5), np.float32))  # batch dim fixed at 1: checked here
    with pytest.raises(DataError, match=r"b\.npz: input 'x' dim 0 must be 1"):
        gd.load_folder(tmp_path, specs)


class ListReader:
    def __init__(self, feeds):
        self.feeds, self.i = feeds, 0

    def get_next(self):
        self.i += 1
        return self.feeds[self.i - 1] if self.i <= len(self.feeds) else None

    def rewind(self):
        self.i = 0


def test_reader_source_and_reader_round_trip():
    specs = specs_of(FLOAT_DYN)
    feeds = [{"x": np.full((2, 3), i, np.float64)} for i in range(3)]
    reader = ListReader(feeds)
    reader.get_next()  # partly consumed: from_reader rewinds
    ds = gd.load_data(reader, specs)
    assert len(ds) == 3 and ds.num_samples == 6 and ds.feeds[2]["x"].dtype == np.float32
    out = ds.reader()
    got = [out.get_next()["x"][0, 0] for _ in range(3)]
    assert got == [0, 1, 2] and out.get_next() is None
    out.rewind()
    assert out.get_next()["x"][0, 0] == 0 and len(list(ds.reader())) == 3


def test_synthetic_types_shapes_and_determinism():
    specs = specs_of([("x", TensorProto.FLOAT, ["N", 3, "H"]), ("ids", TensorProto.INT64, ["N", 5]),
                      ("m", TensorProto.BOOL, ["N", 5])])
    a = gd.synthetic(specs, {"x": (2, 3, 7)}, samples=6, seed=0)
    b = gd.synthetic(specs, {"x": (2, 3, 7)}, samples=6, seed=0)
    c = gd.synthetic(specs, {"x": (2, 3, 7)}, samples=6, seed=1)
    assert a.synthetic and len(a) == 3 and a.num_samples == 6
    f = a.feeds[0]
    assert f["x"].shape == (2, 3, 7) and f["x"].dtype == np.float32
    assert f["ids"].shape == (1, 5) and f["ids"].dtype == np.int64  # unnamed-in-shapes batch dim -> 1
    assert f["ids"].min() >= 0 and f["ids"].max() < 10 and f["m"].dtype == np.bool_
    for fa, fb in zip(a.feeds, b.feeds):
        for k in fa:
            np.testing.assert_array_equal(fa[k], fb[k])
    assert not np.array_equal(a.feeds[0]["x"], c.feeds[0]["x"])
    assert "says nothing about accuracy" in a.describe()


def test_synthetic_dynamic_dim_without_shape_is_error():
    specs = specs_of([("x", TensorProto.FLOAT, ["N", 3, "H"])])
    with pytest.raises(DataError, match=r"input 'x' has dynamic dim 2 .*--shape x=AxBxC"):
        gd.synthetic(specs)
    with pytest.raises(DataError, match="dim 1 is fixed at 3"):
        gd.synthetic(specs, {"x": (1, 4, 5)})
    with pytest.raises(DataError, match="unknown input 'y'"):
        gd.synthetic(specs, {"y": (1,)})


@pytest.mark.parametrize("text,expected", [("x=1x3x224x224", ("x", (1, 3, 224, 224))),
                                           ("input:0=2,5", ("input:0", (2, 5))), ("s=", ("s", ()))])
def test_parse_shape_good(text, expected):
    assert gd.parse_shape(text) == expected


@pytest.mark.parametrize("text", ["x", "=1x2", "x=1xax3", "x=0x3", "x=1x-2", "x=1xx2"])
def test_parse_shape_bad(text):
    with pytest.raises(DataError, match="bad --shape"):
        gd.parse_shape(text)


def _npz(tmp_path, **arrays):
    np.savez(tmp_path / "t.npz", **arrays)
    return tmp_path / "t.npz"


TWO = [("x", TensorProto.FLOAT, ["N", 3]), ("ids", TensorProto.INT64, ["N", 2])]


@pytest.mark.parametrize("arrays,inputs,pattern", [
    (dict(x=np.zeros((2, 3))), TWO, r"^t\.npz: missing input 'ids' \(model inputs: x, ids"),
    (dict(x=np.zeros((2, 3)), ids=np.zeros((2, 2), np.int64), z=np.zeros(2), w=np.zeros(2)), TWO,
     r"^t\.npz: keys that are not model inputs: z, w \(model inputs: x, ids"),
    (dict(x=np.zeros((2, 3)), ids=np.zeros((2, 2), np.float32)), TWO,
     r"^t\.npz: input 'ids' expects int64, got float32"),
    (dict(x=np.zeros((2, 3), np.int64), ids=np.zeros((2, 2), np.int64)), TWO,
     r"^t\.npz: input 'x' expects float32, got int64"),
    (dict(x=np.zeros((2, 3, 1)), ids=np.zeros((2, 2), np.int64)), TWO,
     r"^t\.npz: input 'x' expects rank 2 \(Nx3\), got rank 3 \(2x3x1\)"),
    (dict(x=np.zeros((2, 4)), ids=np.zeros((2, 2), np.int64)), TWO,
     r"^t\.npz: input 'x' dim 1 must be 3 \(model shape Nx3\), got 4"),
    (dict(x=np.zeros((2, 3)), ids=np.zeros((3, 2), np.int64)), TWO, r"different sample counts.*x=2, ids=3"),
    (dict(x=np.zeros((2, 3)), labels=np.arange(3)), FLOAT_DYN, r"'labels' has 3 entries.*2 samples"),
    (dict(x=np.zeros((2, 3)), ids=np.full((2, 2), 300, np.int64)), [TWO[0], ("ids", TensorProto.UINT8, ["N", 2])],
     r"input 'ids' expects uint8, got int64 values in \[300, 300\]"),
])
def test_npz_errors_one_line(tmp_path, arrays, inputs, pattern):
    with pytest.raises(DataError, match=pattern) as err:
        gd.load_npz(_npz(tmp_path, **arrays), specs_of(inputs))
    assert "\n" not in str(err.value)


def test_corrupt_and_wrong_files(tmp_path):
    specs = specs_of(FLOAT_DYN)
    (tmp_path / "bad.npz").write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match=r"bad\.npz: cannot read \.npz"):
        gd.load_npz(tmp_path / "bad.npz", specs)
    good = _npz(tmp_path, x=np.zeros((40, 3), np.float32))
    (tmp_path / "trunc.npz").write_bytes(good.read_bytes()[:200])
    with pytest.raises(DataError, match=r"trunc\.npz: cannot read \.npz"):
        gd.load_npz(tmp_path / "trunc.npz", specs)
    np.save(tmp_path / "arr.npy", np.zeros((2, 3)))
    with pytest.raises(DataError, match="not an .npz archive"):
        gd.load_npz(tmp_path / "arr.npy", specs)
    with pytest.raises(DataError, match="no such file"):
        gd.load_data(tmp_path / "missing.npz", specs)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .npz files"):
        gd.load_data(tmp_path / "empty", specs)


def test_split_samples_disjoint_deterministic_labels_aligned(tmp_path):
    specs = specs_of(FLOAT_DYN)
    x = np.repeat(np.arange(50, dtype=np.float32)[:, None], 3, axis=1)  # row i holds i: identifies the sample
    ds = gd.load_npz(_npz(tmp_path, x=x, labels=np.arange(50) * 10), specs, batch_size=8)
    cal, ev = gd.split(ds, eval_fraction=0.3, seed=0)
    ids = {name: np.concatenate([f["x"][:, 0] for f in part.feeds]).astype(int) for name, part in
           [("cal", cal), ("ev", ev)]}
    assert len(ids["ev"]) == 15 and len(ids["cal"]) == 35
    assert set(ids["cal"]).isdisjoint(ids["ev"]) and set(ids["cal"]) | set(ids["ev"]) == set(range(50))
    np.testing.assert_array_equal(cal.labels, ids["cal"] * 10)
    np.testing.assert_array_equal(ev.labels, ids["ev"] * 10)
    assert max(f["x"].shape[0] for f in cal.feeds) == 8  # re-chunked in the original batch size
    cal2, _ = gd.split(ds, eval_fraction=0.3, seed=0)
    np.testing.assert_array_equal(cal2.labels, cal.labels)
    cal3, _ = gd.split(ds, eval_fraction=0.3, seed=1)
    assert not np.array_equal(cal3.labels, cal.labels)
    # head of a split part keeps labels aligned, cutting a feed in the middle
    h = ev.head(10)
    assert h.num_samples == 10 and h.feeds[-1]["x"].shape[0] == 2
    np.testing.assert_array_equal(h.labels, np.concatenate([f["x"][:, 0] for f in h.feeds]) * 10)


def test_split_folder_by_feeds_and_too_small(tmp_path):
    specs = specs_of([("x", TensorProto.FLOAT, [1, 2])])
    for i in range(4):
        np.savez(tmp_path / f"{i}.npz", x=np.full((1, 2), i, np.float32), labels=np.array([i, i]))
    cal, ev = gd.split(gd.load_folder(tmp_path, specs), eval_fraction=0.5, seed=3)
    assert len(cal) == 2 and len(ev) == 2
    for part in (cal, ev):
        marks = [int(f["x"][0, 0]) for f in part.feeds]
        assert part.labels.tolist() == [m for m in marks for _ in range(2)]  # two labels per file, kept
    assert {int(f["x"][0, 0]) for f in cal.feeds}.isdisjoint({int(f["x"][0, 0]) for f in ev.feeds})
    one = gd.load_npz(_npz(tmp_path, x=np.zeros((1, 2), np.float32)), specs)
    with pytest.raises(DataError, match="cannot split 1"):
        gd.split(one)


def test_resolve_rules(tmp_path):
    specs = specs_of(FLOAT_DYN)
    a = _npz(tmp_path, x=np.zeros((10, 3), np.float32))
    np.savez(tmp_path / "b.npz", x=np.ones((4, 3), np.float32))
    cal, ev = gd.resolve(specs, data=tmp_path / "b.npz", calib=a)
    assert cal.num_samples == 10 and ev.num_samples == 4
    cal, ev = gd.resolve(specs, data=a, eval_fraction=0.2)
    assert cal.num_samples == 8 and ev.num_samples == 2
    cal, ev = gd.resolve(specs, calib=str(a))
    assert ev.feeds is cal.feeds and "calibration data reused for evaluation" in ev.source
    cal, ev = gd.resolve(specs, synthetic_samples=4)
    assert cal.synthetic and ev.synthetic and cal.num_samples == 4
    assert not np.array_equal(cal.feeds[0]["x"], ev.feeds[0]["x"])


def test_load_data_dispatch_dict_list_dataset():
    specs = specs_of(FLOAT_DYN)
    ds = gd.load_data({"x": np.zeros((5, 3))}, specs, batch_size=2)
    assert [f["x"].shape[0] for f in ds.feeds] == [2, 2, 1]
    assert len(gd.load_data([{"x": np.zeros((1, 3))}] * 2, specs)) == 2
    again = gd.load_data(ds, specs)
    assert again.num_samples == 5
    with pytest.raises(DataError, match=r"^dataset feed 0: keys that are not model inputs: y"):
        gd.load_data(gd.Dataset([{"y": np.zeros((1, 3))}]), specs)
    with pytest.raises(DataError, match=r"^ListReader feed 1: missing input 'x'"):
        gd.load_data(ListReader([{"x": np.zeros((1, 3))}, {}]), specs)
    with pytest.raises(DataError, match="cannot read data from a int"):
        gd.load_data(3, specs)


def test_literal_minus_one_dimension_is_dynamic():
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 3])])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    (spec,) = gd.input_specs(model)
    assert spec.shape == (None, 3)
    data = gd.load_data({"x": np.zeros((5, 3), np.float32)}, [spec])
    assert data.num_samples == 5


def test_synthetic_indices_stay_inside_the_tables_they_index():
    """BERT's token_type_ids index a 2-row table (through Cast and Unsqueeze here), the ids a 50-row one: synthetic
    integers stay below the smallest table reached; an integer input that indexes nothing keeps [0, 10)."""
    nodes = [helper.make_node("Cast", ["types"], ["t32"], to=6), helper.make_node("Unsqueeze", ["t32", "ax"], ["t3"]),
             helper.make_node("Gather", ["small", "t3"], ["a"]), helper.make_node("Gather", ["big", "types"], ["b"]),
             helper.make_node("Gather", ["big", "ids"], ["c"]), helper.make_node("Cast", ["count"], ["y"], to=1)]
    inits = {"small": randn((2, 4), 0), "big": randn((50, 4), 1), "ax": np.array([0], np.int64)}
    outs = [tensor_info(n, np.float32, None) for n in ("a", "b", "c", "y")]
    model = ir.serde.deserialize_model(make_proto(nodes, [tensor_info(n, np.int64, [4, 8]) for n in
                                                          ("types", "ids", "count")], outs, inits, opset=17))
    specs = {s.name: s for s in gd.input_specs(model)}
    assert (specs["types"].index_limit, specs["ids"].index_limit, specs["count"].index_limit) == (2, 50, None)
    feeds = gd.synthetic(list(specs.values()), samples=64).feeds
    types = np.concatenate([f["types"] for f in feeds])
    ids = np.concatenate([f["ids"] for f in feeds])
    assert set(np.unique(types)) == {0, 1} and ids.max() == 9 and ids.min() == 0
