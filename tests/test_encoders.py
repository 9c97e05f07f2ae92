"""Breadth: every registered pass, with its default options, on each transformer encoder fixture that torch's exporter
wrote from a ``transformers`` config (models/encoders: BERT, DistilBERT, RoBERTa token classifier, ViT
classifier, Whisper encoder; MatMul attention with Softmax, masks from Shape/Range/Where, LayerNormalization, Erf
GELU, Gather embeddings, int64 inputs with dynamic batch and sequence). torch is not imported here: the .onnx
and .npz files are committed, and models/encoders/export.py re-makes them.

Two runs through ``graphopt.optimize`` from the file: each pass alone with the fixture's rows as data (how an encoder
is optimized: its inputs are token ids), and per model every pass that needs no data in one recipe without data
(graphopt's synthetic inputs; text models need ``shapes`` then, as a user's ``--shape``). What must hold:
- nothing escapes (not even a GraphoptError: the model is valid, its data fits it, the options are defaults) and no
  pass row is ``failed``;
- an exact pass is not rolled back (unless a lossy pass was kept before it: the model may then sit at the budget's
  edge) and an exact run's written model stays within RTOL/ATOL_OF_SCALE of the input's outputs;
- a lossy pass is kept only inside the gate's budget (``report.passed``), else rolled back or unchanged;
- the written model passes onnx.checker, runs in onnxruntime, and keeps its dynamic axes: a batch and (for text)
  a sequence length other than the data's give the input model's output shapes (and values, for exact runs).

Cases that fail today are strict xfails, each with its cause; the mark breaks when it is fixed.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import pytest

import graphopt
import graphopt.pipeline
from graphopt.passes import REGISTRY
from graphopt.report import FAILED, KEPT, ROLLED_BACK, Report
from tests.helpers import REPO, run_model

FIXTURES = REPO / "models" / "encoders"
ENCODERS = ("bert", "bert_torchscript", "distilbert", "roberta", "vit", "whisper_encoder")
TEXT = ("bert", "bert_torchscript", "distilbert", "roberta")  # inputs [batch, sequence], both axes dynamic
SAMPLES = 8  # rows 0-7 of each .npz (rows 3 and 7 of the text models are padded): 4 calibrate, 4 evaluate
RUN = graphopt.pipeline.RunOptions(latency=False, progress=False)

# Exact passes may reorder float32 operations or swap spelled-out ops for fused kernels (Erf GELU, LayerNorm,
# attention), never change what is computed. Activations sit near unit scale (LayerNorm after every block), two
# layers of a few dozen ops with fan-ins <= 128 each round by a few ulps: about 1e-6 of the output scale. 1e-4
# of the scale (plus 1e-3 relative) is a hundred times above that; a wrong rewrite (a lost mask, a wrong
# attention scale or epsilon, a misplaced axis) moves outputs by a sizeable fraction of their scale.
RTOL, ATOL_OF_SCALE = 1e-3, 1e-4

# Each run costs about 0.8 s of CPU (load, canonicalize, cleanup, sessions, the pipeline's gc) whatever the pass:
# the per-pass cases of DistilBERT, whose export spells the same graph as BERT's without token types and pooler,
# run with -m slow so the default run stays near a minute; it is in the default run's data-free test.
SLOW_PER_PASS = ("distilbert",)

# (model, pass) -> why it fails today, with the fixture's rows as data.
KNOWN_FAILURES: dict[tuple[str, str], str] = {
}
# model -> why its run without data fails today.
KNOWN_FAILURES_WITHOUT_DATA: dict[str, str] = {}


def _exact(name: str) -> bool:
    """Whether ``name`` with its default options keeps outputs (gap is exact without head=true)."""
    cls = REGISTRY[name]
    return cls.exact or (name == "gap" and not cls.Options().head)


def _needs_data(name: str) -> bool:
    cls = REGISTRY[name]
    return bool(cls.needs_data(cls.Options()))


def _rows(model: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"{model}.npz") as data:
        return {key: data[key][:SAMPLES] for key in data.files}


def _other_shape(model: str, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows at a batch (3) and, for text, a sequence length (11) the data never had: fixed shapes show here.
    Rows 1-3 keep the padded row 3, its mask still covering its first four tokens."""
    if model in TEXT:
        return {key: value[1:4, :11] for key, value in rows.items()}
    return {key: value[1:4] for key, value in rows.items()}


def _optimize(model: str, names: list[str], out: Path, **data) -> Report:
    """One run from the fixture file; checks the input file is untouched and the rows' rules (module docstring)."""
    src = FIXTURES / f"{model}.onnx"
    source_bytes = src.read_bytes()
    report = graphopt.optimize(str(src), str(out), passes=[{name: {}} for name in names], run=RUN, **data)
    assert src.read_bytes() == source_bytes, "the input file changed"
    lossy_kept = False
    for row in report.passes[1:]:
        step = row.step.partition(":")[0]
        assert row.status != FAILED, f"step {row.step!r} failed: {row.reason}"
        exact = step in ("canonicalize", "cleanup") or (step in names and _exact(step))
        assert not (exact and row.status == ROLLED_BACK and not lossy_kept), f"exact {step} rolled back: {row.reason}"
        lossy_kept = lossy_kept or (row.status == KEPT and not exact)
    assert report.passed, f"the gate failed after {names}: {report.final}"
    return report


@functools.lru_cache(maxsize=None)
def _reference(model: str, other_shape: bool) -> dict[str, np.ndarray]:
    """The input model's outputs on the rows (or on _other_shape of them), computed once per model."""
    rows = _rows(model)
    return run_model(str(FIXTURES / f"{model}.onnx"), _other_shape(model, rows) if other_shape else rows)


def _check_written(model: str, out: Path, rows: dict[str, np.ndarray], exact: bool) -> None:
    onnx.checker.check_model(onnx.load(str(out)))
    for other_shape in (False, True):
        before = _reference(model, other_shape)
        after = run_model(str(out), _other_shape(model, rows) if other_shape else rows)
        assert list(after) == list(before), f"output names {list(after)}, the input's {list(before)}"
        scale = max(float(np.max(np.abs(v))) for v in before.values())
        for key, value in before.items():
            assert after[key].shape == value.shape, f"{key}: shape {after[key].shape} vs {value.shape}"
            assert after[key].dtype == value.dtype, f"{key}: dtype {after[key].dtype} vs {value.dtype}"
            assert np.isfinite(after[key]).all(), f"{key}: not finite"
            if exact:
                np.testing.assert_allclose(after[key], value, rtol=RTOL, atol=ATOL_OF_SCALE * scale, err_msg=key)


def _xfail(reason: str | None) -> list:
    return [pytest.mark.xfail(strict=True, reason=reason)] if reason else []


def _cases() -> list:
    return [pytest.param(model, name, id=f"{model}-{name}",
                         marks=_xfail(KNOWN_FAILURES.get((model, name))) + [pytest.mark.slow] * (model in SLOW_PER_PASS))
            for model in ENCODERS for name in REGISTRY]


def test_fixtures_are_the_exported_encoders():
    """Each fixture is a valid opset-17 model whose inputs are the .npz keys, with dynamic batch (and sequence)."""
    for model in ENCODERS:
        proto = onnx.load(str(FIXTURES / f"{model}.onnx"))
        onnx.checker.check_model(proto, full_check=True)
        assert [(o.domain or "", o.version) for o in proto.opset_import] == [("", 17)]
        ops = {node.op_type for node in proto.graph.node}
        assert {"MatMul", "Softmax", "LayerNormalization", "Erf"} <= ops, f"{model}: {sorted(ops)}"
        dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
        assert sorted(dims) == sorted(_rows(model)), model
        for name, shape in dims.items():
            dynamic = shape[:2] if model in TEXT else shape[:1]
            assert all(isinstance(d, str) for d in dynamic), f"{model}: input {name} has shape {shape}"


@pytest.mark.parametrize(("model", "name"), _cases())
def test_pass_on_encoder(model: str, name: str, tmp_path: Path):
    rows = _rows(model)
    _optimize(model, [name], tmp_path / "out.onnx", data=rows)
    _check_written(model, tmp_path / "out.onnx", rows, _exact(name))


@pytest.mark.parametrize("model", [pytest.param(m, marks=_xfail(KNOWN_FAILURES_WITHOUT_DATA.get(m))) for m in ENCODERS])
def test_passes_without_data_on_encoder(model: str, tmp_path: Path):
    names = [name for name in REGISTRY if not _needs_data(name)]
    rows = _rows(model)
    shapes = {key: (2, value.shape[1]) for key, value in rows.items()} if model in TEXT else None
    _optimize(model, names, tmp_path / "out.onnx", shapes=shapes)
    _check_written(model, tmp_path / "out.onnx", rows, all(_exact(name) for name in names))
