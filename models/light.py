"""Full-size model-zoo topologies with seeded random weights, built from the ``onnx`` package's "light" models.

``onnx/backend/test/data/light/light_<name>.onnx`` keeps the graph of nine classic ImageNet CNNs (IR 3,
opset 9, initializers listed as graph inputs) but stores each large weight as a ``ConstantOfShape`` node
(fill 0.02) fed by an int64 ``<name>__SHAPE`` initializer; small tensors (biases, some BatchNorm
statistics, DenseNet's per-channel Mul/Add constants) are kept as real initializers. The builder:
1. upgrades to opset 13 with ``onnx.version_converter`` (IR 3 wants initializers listed as inputs, as
   they are), then unlists them and sets IR 7;
2. replaces every float parameter (placeholder or kept) by a seeded random initializer chosen by its
   role: He-normal Conv/Gemm weights, small biases, positive BatchNorm/Mul scales. The kept pretrained
   values are replaced too: real BN means or -8 conv biases next to random weights kill every ReLU;
3. sets each BatchNorm's running mean/variance to the statistics of its input on a random image, so
   activations stay near unit scale through 50-120 layers and residual sums grow linearly, not
   exponentially (with identity BNs ShuffleNet's activations reach 1e6 by the last stage).
Cache: ``$GRAPHOPT_CACHE/light`` or ``~/.cache/graphopt/light``. ``python models/light.py [names]`` builds.
Notes: ResNet-50 and ShuffleNet join residuals with ``Sum``; DenseNet and Inception-v2 apply per-channel
constants with Unsqueeze -> Mul/Add after a BatchNorm whose own scale/bias are 1/0.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import version_converter

from graphopt.errors import GraphoptError
from graphopt.runtime import make_session

NAMES = ("resnet50", "vgg19", "densenet121", "inception_v1", "inception_v2", "shufflenet", "squeezenet",
         "bvlc_alexnet", "zfnet512")
OPSET = 13
IR_VERSION = 7  # the IR that goes with opset 13
BUILD_VERSION = 2  # bump when the weights a seed gives change, so stale cache files are not reused


def light_dir() -> Path:
    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def cache_dir() -> Path:
    env = os.environ.get("GRAPHOPT_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "graphopt"
    return root / "light"


def _upgrade(path: Path) -> onnx.ModelProto:
    proto = onnx.load(str(path))
    proto = version_converter.convert_version(proto, OPSET)
    inits = {t.name for t in proto.graph.initializer}
    keep = [v for v in proto.graph.input if v.name not in inits]
    del proto.graph.input[:]
    proto.graph.input.extend(keep)
    proto.ir_version = IR_VERSION
    return proto


def _final_use(value: ir.Value) -> tuple[ir.Node, int, tuple[int, ...] | None]:
    """The node that really consumes a parameter, looking through Reshape/Unsqueeze (and the reshape target)."""
    target = None
    while True:
        uses = list(value.uses())
        if len(uses) != 1:
            raise GraphoptError(f"parameter {value.name!r} has {len(uses)} consumers; expected one")
        node, idx = uses[0].node, uses[0].idx
        if node.op_type in ("Reshape", "Unsqueeze") and idx == 0:
            if node.op_type == "Reshape":
                target = tuple(int(d) for d in node.inputs[1].const_value.numpy())
            value = node.outputs[0]
            continue
        return node, idx, target


def _random_param(value: ir.Value, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    node, idx, target = _final_use(value)
    op = node.op_type
    if (op, idx) == ("Conv", 1):
        return rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
    if (op, idx) == ("Gemm", 1):
        dims = target if target is not None else shape
        trans_b = node.attributes.get_int("transB", 0)
        fan_in = dims[-1] if trans_b else dims[0]
        return rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    if (op, idx) in (("Conv", 2), ("Gemm", 2)):
        return rng.normal(0.0, 0.01, shape)
    if (op, idx) == ("BatchNormalization", 1) or op == "Mul":
        return rng.uniform(0.5, 1.5, shape)
    if (op, idx) == ("BatchNormalization", 2) or op == "Add":
        return rng.normal(0.0, 0.1, shape)
    if (op, idx) == ("BatchNormalization", 3):
        return np.zeros(shape)
    if (op, idx) == ("BatchNormalization", 4):
        return np.ones(shape)
    raise GraphoptError(f"parameter {value.name!r} feeds {op} input {idx}; no random initializer for that role")


def _randomize(model: ir.Model, rng: np.random.Generator) -> None:
    graph = model.graph
    made: set[str] = set()
    for node in list(graph):
        if node.op_type != "ConstantOfShape" or node.inputs[0].const_value is None:
            continue
        shape_value = node.inputs[0]
        shape = tuple(int(d) for d in shape_value.const_value.numpy())
        out = node.outputs[0]
        weight = ir.Value(name=out.name, const_value=ir.tensor(_random_param(out, shape, rng).astype(np.float32),
                                                                 name=out.name))
        out.name = out.name + "__placeholder"  # frees the name for the initializer
        out.replace_all_uses_with(weight)
        graph.remove(node, safe=True)
        graph.register_initializer(weight)
        made.add(weight.name)
        if not list(shape_value.uses()):
            del graph.initializers[shape_value.name]
    for value in list(graph.initializers.values()):
        tensor = value.const_value
        if tensor is None or tensor.dtype != ir.DataType.FLOAT or value.name in made:
            continue
        if not list(value.uses()):  # e.g. the caffe2 export's unused data-queue blob
            del graph.initializers[value.name]
            continue
        fresh = _random_param(value, tuple(tensor.shape.numpy()), rng).astype(np.float32)
        value.const_value = ir.tensor(fresh, name=value.name)


def _input_feed(model: ir.Model, rng: np.random.Generator) -> dict[str, np.ndarray]:
    (inp,) = [v for v in model.graph.inputs if not v.is_initializer()]
    return {inp.name: rng.standard_normal(tuple(int(d) for d in inp.shape)).astype(np.float32)}


def _calibrate_bn(model: ir.Model, feed: dict[str, np.ndarray]) -> None:
    """Set BatchNorm running stats to the per-channel mean/variance their inputs have on ``feed``.

    Each BN is judged against the inputs it gets once every BN before it is calibrated, so in a copy every
    BN becomes an InstanceNormalization (for batch 1 the same per-channel statistics): one run then sees
    the calibrated network's inputs everywhere. (Setting all stats from one plain run and repeating
    diverges: a rescaled early layer mis-scales every stale later one, and the errors multiply.)
    """
    bns = [n for n in model.graph if n.op_type == "BatchNormalization"]
    if not bns:
        return
    proto = ir.serde.serialize_model(model)
    for node in proto.graph.node:
        if node.op_type == "BatchNormalization":
            eps = [a for a in node.attribute if a.name == "epsilon"]
            node.op_type = "InstanceNormalization"
            del node.input[3:]
            del node.attribute[:]
            node.attribute.extend(eps)
    probes = [n.inputs[0].name for n in bns]
    proto.graph.output.extend(onnx.helper.make_tensor_value_info(p, onnx.TensorProto.FLOAT, None) for p in probes)
    sess = make_session(proto, threads=2)
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
    for node in bns:
        x = got[node.inputs[0].name].astype(np.float64)
        if x.ndim < 3 or x.shape[0] != 1:
            raise GraphoptError(f"BatchNormalization {node.name!r}: input of shape {x.shape}; expected 1xCxHxW")
        axes = (0, *range(2, x.ndim))
        mean, var = x.mean(axis=axes), x.var(axis=axes)
        # Dead channels (constant on this input) would divide by sqrt(eps) on another input.
        var = np.maximum(var, 1e-2 * float(np.median(var)) + 1e-6)
        node.inputs[3].const_value = ir.tensor(mean.astype(np.float32), name=node.inputs[3].name)
        node.inputs[4].const_value = ir.tensor(var.astype(np.float32), name=node.inputs[4].name)


def build_model(name: str, seed: int = 0) -> ir.Model:
    """The ``name`` topology at opset 13 with seeded random weights, in memory."""
    if name not in NAMES:
        raise GraphoptError(f"unknown light model {name!r}; choose one of {', '.join(NAMES)}")
    src = light_dir() / f"light_{name}.onnx"
    if not src.is_file():
        raise GraphoptError(f"{src} is missing; the installed onnx package has no light models")
    model = ir.serde.deserialize_model(_upgrade(src))
    rng = np.random.default_rng([seed, NAMES.index(name)])
    _randomize(model, rng)
    _calibrate_bn(model, _input_feed(model, np.random.default_rng([seed, 999])))
    model.producer_name = "graphopt.models.light"
    model.doc_string = f"{name} topology from onnx light models, random weights, seed {seed}"
    return model


def build_light(name: str, seed: int = 0, cache: bool = True) -> Path:
    """Path of the built ``name`` model (cached per name, seed and builder version)."""
    folder = cache_dir()
    path = folder / f"{name}-seed{seed}-v{BUILD_VERSION}.onnx"
    if cache and path.is_file():
        return path
    model = build_model(name, seed)
    folder.mkdir(parents=True, exist_ok=True)
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".onnx", dir=folder)
    os.close(fd)
    try:
        onnx.save_model(proto, tmp)  # largest (VGG-19) is ~575 MB: plain protobuf, under the 2 GB limit
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def main(argv: list[str]) -> int:
    for name in argv or NAMES:
        print(f"{name}\t{build_light(name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
