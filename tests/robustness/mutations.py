"""Hostile model and data files, made from valid ones: truncated at protobuf field boundaries, bit flips,
declared lengths that lie, and proto-level damage the parser accepts (negative or huge dims, a cycle, duplicate
names, unknown domains and ops, external data that is missing, short or outside the model's folder).

Each case is (kind, name, files): the files to write (name → bytes) and which of them is the model and the data.
"""

from __future__ import annotations

import io
import random
from typing import Callable, Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# ModelProto.graph = 7; in GraphProto: node 1, initializer 5, input 11, output 12, value_info 13 — the messages a
# truncation inside is most likely to leave half-parsed.
_NESTED = {(): {7}, (7,): {1, 5, 11, 12, 13}}


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        shift += 7
        if not byte & 0x80:
            return value, pos


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def fields(data: bytes, start: int = 0, end: int | None = None, path: tuple = ()) -> Iterator[tuple[int, int, int, int]]:
    """(offset of the field, offset of its payload, end of the field, field number) of a protobuf message's
    fields, recursing into the graph and its nodes/initializers/values."""
    pos, end = start, len(data) if end is None else end
    while pos < end:
        begin = pos
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(data, pos)
            payload = pos
        elif wire == 1:
            payload, pos = pos, pos + 8
        elif wire == 5:
            payload, pos = pos, pos + 4
        elif wire == 2:
            size, payload = _varint(data, pos)
            pos = payload + size
        else:
            raise ValueError(f"wire type {wire} at {begin}")
        yield begin, payload, pos, number
        if wire == 2 and number in _NESTED.get(path, set()):
            yield from fields(data, payload, pos, path + (number,))


def truncations(data: bytes) -> list[tuple[str, bytes]]:
    """The file cut at every field boundary (and one byte either side of it)."""
    cuts = sorted({c for b, p, e, _ in fields(data) for c in (b, b + 1, p, e - 1) if 0 < c < len(data)})
    return [(f"truncated at byte {c} of {len(data)}", data[:c]) for c in cuts]


def flips(data: bytes, rng: random.Random, count: int) -> list[tuple[str, bytes]]:
    out = []
    for _ in range(count):
        at, bit = rng.randrange(len(data)), rng.randrange(8)
        b = bytearray(data)
        b[at] ^= 1 << bit
        out.append((f"bit {bit} of byte {at} flipped", bytes(b)))
    return out


def lying_lengths(data: bytes, rng: random.Random, count: int) -> list[tuple[str, bytes]]:
    """A length-delimited field's declared size replaced by a huge or a slightly wrong one."""
    spans = [(b, p) for b, p, e, _ in fields(data) if p > b + 1 and e - p > 0]
    out = []
    for _ in range(count):
        begin, payload = rng.choice(spans)
        _, size_at = _varint(data, begin)  # past the key: the size varint runs from here to the payload
        size, _ = _varint(data, size_at)
        new = rng.choice([2 ** 31 - 1, 2 ** 40, size + 1, max(0, size - 1), size * 2 + 7])
        out.append((f"field at byte {begin} declares {new} bytes (has {size})",
                    data[:size_at] + _encode_varint(new) + data[payload:]))
    return out


def _edit(model: onnx.ModelProto, fn: Callable[[onnx.ModelProto], None]) -> bytes:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    fn(copy)
    return copy.SerializeToString()


def _weight(model: onnx.ModelProto) -> onnx.TensorProto:
    return max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))


def _set_dims(model: onnx.ModelProto, dims: list[int]) -> None:
    t = _weight(model)
    del t.dims[:]
    t.dims.extend(dims)


def _cycle(model: onnx.ModelProto) -> None:
    first, last = model.graph.node[0], model.graph.node[-1]
    first.input[0] = last.output[0]


def _duplicate_output(model: onnx.ModelProto) -> None:
    model.graph.node[1].output[0] = model.graph.node[0].output[0]


def _duplicate_initializer(model: onnx.ModelProto) -> None:
    model.graph.initializer.append(model.graph.initializer[0])


def _unknown_domain(model: onnx.ModelProto) -> None:
    model.graph.node[0].domain = "com.example.nowhere"


def _unknown_op(model: onnx.ModelProto) -> None:
    model.graph.node[0].op_type = "NoSuchOp"


def _short_raw(model: onnx.ModelProto) -> None:
    t = _weight(model)
    t.raw_data = t.raw_data[: len(t.raw_data) // 2]


def _opset(version: int) -> Callable[[onnx.ModelProto], None]:
    def set_opset(model: onnx.ModelProto) -> None:
        for op in model.opset_import:
            if op.domain in ("", "ai.onnx"):
                op.version = version
    return set_opset


def _no_outputs(model: onnx.ModelProto) -> None:
    del model.graph.output[:]


def _dangling_input(model: onnx.ModelProto) -> None:
    model.graph.node[0].input[0] = "nowhere"


def _external(location: str) -> Callable[[onnx.ModelProto], None]:
    def point(model: onnx.ModelProto) -> None:
        t = _weight(model)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        del t.external_data[:]
        t.external_data.add(key="location", value=location)
    return point


def _external_short(model: onnx.ModelProto) -> None:
    _external("short.bin")(model)
    t = _weight(model)
    t.external_data.add(key="length", value=str(4 * int(np.prod(t.dims))))


def _zero_stride(model: onnx.ModelProto) -> None:
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    next(a for a in conv.attribute if a.name == "strides").ints[1] = 0


STRUCTURAL = {
    "zero stride": _zero_stride,
    "negative dim": lambda m: _set_dims(m, [-1, *_weight(m).dims[1:]]),
    "huge dims, small data": lambda m: _set_dims(m, [2 ** 40, *_weight(m).dims[1:]]),
    "dims that do not match the data": lambda m: _set_dims(m, [int(np.prod(_weight(m).dims)) + 1]),
    "short raw data": _short_raw,
    "a cycle": _cycle,
    "two nodes write one output": _duplicate_output,
    "duplicate initializer": _duplicate_initializer,
    "unknown domain": _unknown_domain,
    "unknown op": _unknown_op,
    "opset 1": _opset(1),
    "opset 99": _opset(99),
    "no outputs": _no_outputs,
    "input from nowhere": _dangling_input,
    "external data missing": _external("missing.bin"),
    "external data short": _external_short,
    "external data outside the folder": _external("../outside.bin"),
    "external data absolute path": _external("/etc/hostname"),
    "external data through a symlink": _external("link.bin"),
}


def structural(model: onnx.ModelProto) -> list[tuple[str, bytes]]:
    return [(name, _edit(model, fn)) for name, fn in STRUCTURAL.items()]


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def data_cases(arrays: dict[str, np.ndarray], rng: random.Random, count: int) -> list[tuple[str, bytes]]:
    """Damaged calibration files: cut, flipped, wrong dtype/shape, NaN and inf samples, an empty array."""
    data = npz_bytes(arrays)
    name = next(k for k in arrays if k != "labels")
    x = arrays[name]
    cases = [(f"npz truncated at {c}", data[:c]) for c in sorted(rng.sample(range(1, len(data)), min(count, 40)))]
    cases += [(f"npz {d}", b) for d, b in flips(data, rng, count)]
    cases += [("npz float64 inputs", npz_bytes({**arrays, name: x.astype(np.float64)})),
              ("npz int inputs", npz_bytes({**arrays, name: x.astype(np.int32)})),
              ("npz wrong rank", npz_bytes({**arrays, name: x[:, 0]})),
              ("npz wrong width", npz_bytes({**arrays, name: x[..., :-1]})),
              ("npz no samples", npz_bytes({**arrays, name: x[:0], "labels": arrays["labels"][:0]})),
              ("npz NaN samples", npz_bytes({**arrays, name: np.full_like(x, np.nan)})),
              ("npz inf samples", npz_bytes({**arrays, name: np.full_like(x, np.inf)})),
              ("npz labels out of range", npz_bytes({**arrays, "labels": arrays["labels"] + 1000})),
              ("npz fewer labels", npz_bytes({**arrays, "labels": arrays["labels"][:-1]})),
              ("npz object array", npz_bytes({**arrays, "labels": np.array(["a"] * len(x), dtype=object)}))]
    return cases


def small_model() -> onnx.ModelProto:
    """A model quick to optimize, with every field kind a mutation may hit: Conv, BatchNorm, Gemm."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "B"),
             numpy_helper.from_array(np.ones(8, np.float32), "scale"),
             numpy_helper.from_array(np.zeros(8, np.float32), "shift"),
             numpy_helper.from_array(np.zeros(8, np.float32), "mean"),
             numpy_helper.from_array(np.ones(8, np.float32), "var"),
             numpy_helper.from_array(rng.standard_normal((10, 8 * 4 * 4)).astype(np.float32), "G")]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["n"], name="bn"),
             helper.make_node("Relu", ["n"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "G"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
