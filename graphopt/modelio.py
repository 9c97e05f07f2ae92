"""Load and save models on onnx_ir; the only place (with runtime.py) that touches protobuf files.

Loading checks what protobuf read: a cut-off file can parse into a smaller, valid-looking model, so the
re-serialized size must match the file. External data must stay inside the model's folder. onnx_ir drops
``sparse_initializer`` on load, so sparse initializers are densified in protobuf first and marked, and
written back as sparse at save time. Saving is atomic: temporary files in the target folder, then rename.

Shapes graphopt infers for its passes are not written: a saved model carries the value_info its source had
and no more. onnxruntime fuses differently when it is given intermediate shapes, and not always for the better
(a BERT-style encoder ran 1.09x slower: with inferred shapes onnxruntime's SkipLayerNormalization fusion fired
12 times, and its fp32 CPU kernel is slower than the Add and LayerNormalization it replaces).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from graphopt.errors import GraphoptError, first_line

# Value.metadata_props key a pass sets to ask for sparse storage at save time.
STORAGE_KEY = "graphopt.storage"
SPARSE = "sparse"
# Above this many bytes of tensors, the model is saved with external data (protobuf's 2 GB limit).
EXTERNAL_THRESHOLD = 1_800_000_000
# graph.meta key: bytes on disk of the file a model was loaded from (with its external data).
SOURCE_BYTES = "graphopt.source_bytes"
# graph.meta key: names of the intermediate values whose shapes the source file declared (the ones written).
WRITTEN_SHAPES = "graphopt.written_shapes"
# graph.meta key: {name: serialized TypeProto} the source declared for main-graph outputs that are also inputs.
PASSTHROUGH_OUTPUTS = "graphopt.passthrough_outputs"


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX file into onnx_ir after checking it is whole, safe and complete."""
    proto = load_proto(path)
    model = _deserialize(proto, path)
    _keep_input_declarations(model, proto)
    ir.external_data.set_base_dir(model.graph, str(Path(path).resolve().parent))
    folder = Path(path).resolve().parent
    model.graph.meta[SOURCE_BYTES] = Path(path).stat().st_size + sum(
        f.stat().st_size for f in external_files(proto, folder))
    record_written_shapes(model)
    return model


class _InvalidGraph(logging.Filter):
    """Catches onnx_ir's warnings that a graph is invalid (an input no scope defines, an output no node makes, a
    nameless initializer it skips): it would go on with an invented value, where graphopt refuses the file."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "invalid" in message or "Skipping" in message:
            self.found.append(message.split(". ")[0])
            return False
        return True


def _deserialize(proto: onnx.ModelProto, path: str | os.PathLike) -> ir.Model:
    """onnx_ir's model of ``proto``; a graph it cannot build (a value written twice, an input from nowhere) is
    refused in one line."""
    invalid = _InvalidGraph()
    serde_logger = logging.getLogger(ir.serde.__name__)
    serde_logger.addFilter(invalid)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as err:  # onnx_ir wraps the reason (ValueError) in its SerdeError
        while err.__cause__ is not None:
            err = err.__cause__
        raise GraphoptError(f"{path}: not a valid ONNX graph ({first_line(err, with_type=False)})") from None
    finally:
        serde_logger.removeFilter(invalid)
    if invalid.found:
        raise GraphoptError(f"{path}: not a valid ONNX graph ({invalid.found[0]})")
    return model


def _keep_input_declarations(model: ir.Model, proto: onnx.ModelProto) -> None:
    """A main-graph input that is also an output is one Value in onnx_ir, typed as the output was declared; the
    input's declaration is what the data must fit, so it wins, and the output's is written back at save."""
    outputs = {info.name: info.type for info in proto.graph.output}
    inputs = {value.name: value for value in model.graph.inputs}
    declared = {}
    for info in proto.graph.input:
        if info.name in outputs and info.name in inputs:
            inputs[info.name].type = ir.serde.deserialize_type_proto_for_type(info.type)
            inputs[info.name].shape = ir.serde.deserialize_type_proto_for_shape(info.type)
            declared[info.name] = outputs[info.name].SerializeToString()
    if declared:
        model.graph.meta[PASSTHROUGH_OUTPUTS] = declared


def _declare_passthrough_outputs(proto: onnx.ModelProto, model: ir.Model) -> onnx.ModelProto:
    """``proto`` with the source's own declarations of its outputs that are inputs (one Value held the input's)."""
    declared = model.graph.meta.get(PASSTHROUGH_OUTPUTS, {})
    inputs = {info.name for info in proto.graph.input}
    for output in proto.graph.output:
        if output.name in declared and output.name in inputs:
            source = onnx.TypeProto.FromString(declared[output.name])
            if source.tensor_type.elem_type == output.type.tensor_type.elem_type:  # else a pass retyped it
                output.type.CopyFrom(source)
    return proto


def record_written_shapes(model: ir.Model) -> None:
    """Remember which intermediate values have shapes now, as loaded: only those are written later."""
    if WRITTEN_SHAPES in model.graph.meta:
        return
    names = set()
    for graph in [model.graph, *model.graph.subgraphs()]:
        for node in graph:
            names.update(v.name for v in node.outputs if v.type is not None or v.shape is not None)
    model.graph.meta[WRITTEN_SHAPES] = frozenset(names)


def drop_inferred_shapes(proto: onnx.ModelProto, model: ir.Model) -> onnx.ModelProto:
    """``proto`` (serialized from ``model``) without the value_info its source did not declare."""
    keep = model.graph.meta.get(WRITTEN_SHAPES)
    if keep is None:
        return proto
    for graph in proto_graphs(proto.graph):
        infos = [v for v in graph.value_info if v.name in keep]
        if len(infos) != len(graph.value_info):
            del graph.value_info[:]
            graph.value_info.extend(infos)
    return proto


def external_files(proto: onnx.ModelProto, base_dir: Path) -> list[Path]:
    """The distinct existing files the model's external tensors point to, in first-use order."""
    files: dict[Path, None] = {}
    for tensor in _all_tensors(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = {e.key: e.value for e in tensor.external_data}.get("location", "")
            target = (base_dir / location).resolve()
            if location and target.is_file():
                files[target] = None
    return list(files)


def load_proto(path: str | os.PathLike) -> onnx.ModelProto:
    """Read and validate the protobuf of a model file; external data stays on disk."""
    path = Path(path)
    if not path.exists():
        raise GraphoptError(f"{path}: no such file")
    if path.is_dir():
        raise GraphoptError(f"{path}: is a folder, expected an .onnx file")
    size = path.stat().st_size
    if size == 0:
        raise GraphoptError(f"{path}: empty file, expected an ONNX model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as err:
        raise GraphoptError(f"{path}: not an ONNX model (protobuf could not parse it: {err})") from None
    if not proto.HasField("graph") or len(proto.graph.node) == 0 or not proto.opset_import:
        raise GraphoptError(f"{path}: not an ONNX model (no graph, nodes or opset_import)")
    if proto.ByteSize() != size:
        raise GraphoptError(
            f"{path}: file is truncated or damaged ({size} bytes on disk, the model parsed from it "
            f"is {proto.ByteSize()} bytes)"
        )
    check_external_data(proto, path.resolve().parent)
    _check_positive_geometry(proto, path)
    densify_sparse_initializers(proto)
    return proto


_POSITIVE = ("strides", "dilations", "kernel_shape")


def _check_positive_geometry(proto: onnx.ModelProto, path: Path) -> None:
    """Zero strides or dilations divide by zero in the shape inference of onnx < 1.22 and onnxruntime < 1.28 (the
    process dies of SIGFPE, found by a one-bit flip): refused before either sees the model."""
    for graph in proto_graphs(proto.graph):
        for node in graph.node:
            for attr in node.attribute:
                if attr.name in _POSITIVE and attr.type == onnx.AttributeProto.INTS and min(attr.ints, default=1) <= 0:
                    raise GraphoptError(f"{path}: not a valid ONNX graph (node {node.name or node.op_type}: "
                                        f"{attr.name} must be positive, got {list(attr.ints)})")


def proto_graphs(graph: onnx.GraphProto):
    """Every GraphProto level of a model: the graph and its If/Loop/Scan bodies."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from proto_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from proto_graphs(sub)


def _all_tensors(graph: onnx.GraphProto):
    for g in proto_graphs(graph):
        yield from g.initializer
        for sparse in g.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.TENSORS:
                    yield from attr.tensors


def check_external_data(proto: onnx.ModelProto, base_dir: Path) -> None:
    """Refuse external-data locations outside ``base_dir`` and files too short for their tensors."""
    base = base_dir.resolve()
    for tensor in _all_tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        where = f"tensor {tensor.name!r}: external data location {location!r}"
        if not location or os.path.isabs(location) or Path(location).drive:
            raise GraphoptError(f"{where} is not a relative path inside the model's folder; refused")
        target = (base / location).resolve()
        if base not in target.parents:
            raise GraphoptError(f"{where} points outside the model's folder {base}; refused")
        if not target.is_file():
            raise GraphoptError(f"{where}: file {target} is missing")
        offset = int(info.get("offset", 0) or 0)
        length = info.get("length")
        if length is not None and offset + int(length) > target.stat().st_size:
            raise GraphoptError(f"{where}: file {target} is shorter than the tensor needs (truncated?)")


def densify_sparse_initializers(proto: onnx.ModelProto) -> list[str]:
    """Turn sparse initializers into dense ones, marked for sparse storage at save; returns their names."""
    names = []
    for graph in proto_graphs(proto.graph):
        for sparse in list(graph.sparse_initializer):
            dense = sparse_to_dense(sparse)
            tensor = numpy_helper.from_array(dense, sparse.values.name)
            entry = tensor.metadata_props.add()
            entry.key, entry.value = STORAGE_KEY, SPARSE
            graph.initializer.append(tensor)
            names.append(sparse.values.name)
        del graph.sparse_initializer[:]
    return names


def sparse_to_dense(sparse: onnx.SparseTensorProto) -> np.ndarray:
    values = numpy_helper.to_array(sparse.values)
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    shape = tuple(sparse.dims)
    dense = np.zeros(int(np.prod(shape)), dtype=values.dtype)
    if indices.ndim == 2:  # [NNZ, rank] coordinates
        indices = np.ravel_multi_index(tuple(indices.T), shape)
    dense[indices] = values
    return dense.reshape(shape)


def dense_to_sparse(tensor: onnx.TensorProto) -> onnx.SparseTensorProto | None:
    """The sparse form of a dense initializer, or None when it would not be smaller."""
    dense = numpy_helper.to_array(tensor)
    flat = dense.reshape(-1)
    nonzero = np.flatnonzero(flat)
    # INT64 linear indices are what the checker accepts: 8 bytes per non-zero on top of the value.
    if nonzero.size * (8 + flat.itemsize) >= flat.nbytes:
        return None
    values = numpy_helper.from_array(flat[nonzero], tensor.name)
    indices = numpy_helper.from_array(nonzero.astype(np.int64), tensor.name + "_indices")
    return onnx.helper.make_sparse_tensor(values, indices, list(dense.shape))


def _sparsify_marked(proto: onnx.ModelProto) -> None:
    for graph in proto_graphs(proto.graph):
        keep = []
        for tensor in graph.initializer:
            marks = {p.key: p.value for p in tensor.metadata_props}
            sparse = dense_to_sparse(tensor) if marks.get(STORAGE_KEY) == SPARSE else None
            if sparse is None:
                keep.append(tensor)
            else:
                graph.sparse_initializer.append(sparse)
        if len(keep) != len(graph.initializer):
            sparse_names = {s.values.name for s in graph.sparse_initializer}
            del graph.initializer[:]
            graph.initializer.extend(keep)
            # value_info for a now-sparse initializer clashes with it in the full checker
            infos = [v for v in graph.value_info if v.name not in sparse_names]
            del graph.value_info[:]
            graph.value_info.extend(infos)


def tensor_bytes(model: ir.Model) -> int:
    total = 0
    for graph in [model.graph, *model.graph.subgraphs()]:
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialize for tools that only take a ModelProto (tensors must fit in memory, < 2 GB)."""
    proto = _declare_passthrough_outputs(drop_inferred_shapes(ir.serde.serialize_model(model), model), model)
    _sparsify_marked(proto)
    _inline_external(proto, model)
    return proto


def _inline_external(proto: onnx.ModelProto, model: ir.Model) -> None:
    """Tensors still read from the source's external-data file, written into ``proto``: a proto has no folder,
    so the checker and onnxruntime could not find that file (weights a pass left as they were)."""
    external = {value.name: value.const_value for graph in [model.graph, *model.graph.subgraphs()]
                for value in graph.initializers.values() if isinstance(value.const_value, ir.ExternalTensor)}
    if not external:
        return
    for tensor in _all_tensors(proto.graph):
        source = external.get(tensor.name)
        if tensor.data_location == onnx.TensorProto.EXTERNAL and source is not None:
            tensor.raw_data = source.tobytes()
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT


def saved_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of a model written by save_model (the file and its ``.data`` file)."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


TEMP_PREFIX = ".graphopt-"  # + pid: the temporary folder a save writes in, beside the output


def save_model(model: ir.Model, path: str | os.PathLike, *, external: bool | None = None) -> Path:
    """Write ``model`` to ``path`` atomically; external data beside it when large (or asked)."""
    path = Path(path)
    folder = path.resolve().parent
    if not folder.is_dir():
        raise GraphoptError(f"{path}: output folder {folder} does not exist")
    if external is None:
        external = tensor_bytes(model) > EXTERNAL_THRESHOLD
    try:
        _write_atomically(model, path, folder, external)
    except OSError as err:  # a full disk, a file size limit, a read-only folder: nothing partial is left
        raise GraphoptError(f"{path}: could not write the model ({err.strerror or first_line(err)})") from None
    return path


def _write_atomically(model: ir.Model, path: Path, folder: Path, external: bool) -> None:
    _remove_stale_temporaries(folder)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=folder))
    try:
        tmp_model = tmp_dir / path.name
        data_name = path.name + ".data"
        if external:
            ir.save(model, tmp_model, external_data=data_name)
            if WRITTEN_SHAPES in model.graph.meta or PASSTHROUGH_OUTPUTS in model.graph.meta:
                header = onnx.load_model(str(tmp_model), load_external_data=False)  # the data file stays as written
                onnx.save_model(_declare_passthrough_outputs(drop_inferred_shapes(header, model), model),
                                str(tmp_model))
        else:
            onnx.save_model(to_proto(model), str(tmp_model))
        if external and (tmp_dir / data_name).exists():
            os.replace(tmp_dir / data_name, folder / data_name)
        os.replace(tmp_model, folder / path.name)
    finally:
        _remove_folder(tmp_dir)


def _remove_folder(folder: Path) -> None:
    for leftover in folder.iterdir():
        leftover.unlink()
    folder.rmdir()


def _remove_stale_temporaries(folder: Path) -> None:
    """Temporary folders of saves whose process is gone (killed mid-write): removed before the next save there."""
    for tmp in folder.glob(f"{TEMP_PREFIX}*-*"):
        pid = tmp.name[len(TEMP_PREFIX):].split("-")[0]
        if not tmp.is_dir() or not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            _remove_folder(tmp)
        except OSError:  # another save cleaning it at the same moment, or not ours to remove
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def default_output(input_path: str | os.PathLike) -> Path:
    """``<input stem>.opt.onnx`` in the current folder."""
    return Path.cwd() / (Path(input_path).stem + ".opt.onnx")


def check_output_path(input_path: str | os.PathLike, output_path: str | os.PathLike) -> None:
    src, dst = Path(input_path).resolve(), Path(output_path).resolve()
    if src == dst or (dst.exists() and src.exists() and os.path.samefile(src, dst)):
        raise GraphoptError(f"-o {output_path}: output would overwrite the input model; choose another path")
    if not dst.parent.is_dir():
        raise GraphoptError(f"-o {output_path}: folder {dst.parent} does not exist")
