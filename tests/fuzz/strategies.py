"""Hypothesis strategies: valid random ONNX models (:func:`models`), calibration feeds for them, and a recipe
of a pass with generated options, sometimes after another pass (:func:`pass_steps`).

Every model is built valid by construction (``families``: each op's attributes are drawn for its input's
shape, each op spelled as its opset wants) and then proven valid: ``onnx.checker`` with strict shape inference,
and one onnxruntime run whose output shapes must equal the shapes we computed. A model failing either is a bug
in this strategy, raised as one, never filtered away."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import helper

from graphopt.passes.nbits.support import runs_bits
from graphopt.runtime import make_session
from tests.fuzz.builder import BATCH, NODE_NAMES, VALUE_NAMES, Builder, Tensor, concrete, value_info
from tests.fuzz.families import FAMILIES, head
from tests.helpers import make_proto

MIN_OPSET, MAX_OPSET = 11, 21


@dataclasses.dataclass
class GeneratedModel:
    proto: onnx.ModelProto
    input: Tensor
    batch: int | None  # None: dynamic ("N")
    outputs: list[Tensor]
    opset: int
    families: list[str]  # in build order, for hypothesis' notes

    def feeds(self, samples: int, seed: int) -> dict[str, np.ndarray]:
        """``samples`` random samples (a multiple of a fixed batch), axis 0 = samples as in an .npz."""
        if self.batch is not None:
            samples = max(1, samples // self.batch) * self.batch
        rng = np.random.default_rng(seed)
        return {self.input.name: rng.standard_normal(concrete(self.input.shape, samples)).astype(np.float32)}

    def describe(self) -> str:
        ops = ", ".join(self.families)
        return f"opset {self.opset}, batch {self.batch or 'N'}, input {self.input.shape}: {ops}"


def _input_shape(draw: Any) -> tuple:
    rank = draw(st.sampled_from([4, 2, 3, 4]))  # 4-D twice: convs, pools and BatchNormalization need it
    if rank == 4:
        return (BATCH, draw(st.integers(1, 8)), draw(st.integers(1, 12)), draw(st.integers(1, 12)))
    if rank == 3:
        return (BATCH, draw(st.integers(1, 8)), draw(st.integers(1, 16)))
    return (BATCH, draw(st.integers(1, 32)))


@st.composite
def models(draw: Any, max_ops: int = 10) -> GeneratedModel:
    """A valid model of 2..``max_ops`` op families (a family is one to ~9 nodes) on one float input."""
    opset = draw(st.integers(MIN_OPSET, MAX_OPSET))
    seed = draw(st.integers(0, 2**32 - 1))
    batch = draw(st.sampled_from([None, 1, 2]))
    x = Tensor(draw(st.sampled_from(["input", "x", "input.1", "x:0"])), _input_shape(draw))
    naming = (draw(st.sampled_from(NODE_NAMES)), draw(st.sampled_from(list(VALUE_NAMES))))
    b = Builder(draw, opset, np.random.default_rng(seed), naming, batch, x)
    first = x
    used = []
    for _ in range(b.int(2, max_ops)):
        name, _, build = b.pick([f for f in FAMILIES if f[1](x)])
        used.append(name)
        x = build(b, x)
    if b.bool():
        used.append("head")
        x = head(b, x)
    outputs = [t for t in b.side_outputs if t.name != x.name]
    extra = [t for t in b.pool if t.name != x.name and t not in outputs]
    if extra and b.bool():  # a multi-output graph: an intermediate tensor is an output too
        outputs.append(b.pick(extra))
    if b.pick([False] * 7 + [True]):  # the input passed through as an output too
        outputs.append(first)
    outputs.append(x)
    with_shapes = b.pick([True, False])  # exporters do not always declare output shapes
    inputs = [value_info(first, batch)]
    if b.pick([False, False, False, True]):  # old exporters list initializers as graph inputs too
        inputs += [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                   for n, a in b.inits.items()]
    proto = make_proto(b.nodes, inputs, [value_info(t, batch, with_shapes) for t in outputs], b.inits, opset=opset)
    generated = GeneratedModel(proto, first, batch, outputs, opset, used)
    validate(generated)
    return generated


def validate(generated: GeneratedModel) -> None:
    """The model is valid ONNX (strict shape inference agrees with our shapes) and onnxruntime runs it with the
    output shapes we computed; anything else is a strategy bug."""
    what = generated.describe()
    try:
        onnx.checker.check_model(generated.proto, full_check=True)
    except Exception as err:
        raise AssertionError(f"strategy bug: onnx.checker refuses a generated model ({what}): {err}") from err
    try:
        session = make_session(generated.proto)
        feeds = generated.feeds(generated.batch or 2, 0)
        outs = session.run(None, feeds)
    except Exception as err:
        raise AssertionError(f"strategy bug: onnxruntime cannot run a generated model ({what}): {err}") from err
    n = next(iter(feeds.values())).shape[0]
    for t, out in zip(generated.outputs, outs):
        expect = concrete(t.shape, n)
        assert out.shape == expect, f"strategy bug: {t.name} is {out.shape}, computed {expect} ({what})"
        assert np.all(np.isfinite(out)), f"strategy bug: {t.name} is not finite ({what})"


# --- passes with generated options ------------------------------------------------------------------------------

EXACT_PASSES = ("canonicalize", "fold_batchnorm", "fuse", "gap", "compact", "cleanup")  # gap only without head=true


def _fraction(low: float, high: float) -> st.SearchStrategy[float]:
    return st.integers(int(low * 20), int(high * 20)).map(lambda i: i / 20)  # round values: readable recipes


# The pass under test and its options. Lossy passes first: hypothesis leans towards early entries.
OPTIONS: dict[str, st.SearchStrategy[dict]] = {
    "channel_prune": st.fixed_dictionaries(
        {"ratio": _fraction(0.1, 0.7)},
        optional={"scope": st.sampled_from(["layer", "global", "sensitivity"]),
                  "round_to": st.sampled_from([1, 2, 4]),
                  "importance": st.sampled_from(["l1", "l2", "bn", "activation", "reconstruction"]),
                  "repair": st.booleans(), "time_budget": st.just(5.0)}),
    # rank, energy, ratio and macs exclude each other; tiny layers need min_size 0 to be factorized at all
    "lowrank": st.tuples(
        st.fixed_dictionaries({"min_size": st.just(0), "min_saving": st.sampled_from([0.1, -1.0])},
                              optional={"data_aware": st.just(True), "time_budget": st.just(5.0),
                                        "scheme": st.sampled_from(["auto", "svd", "spatial", "tucker", "basis"])}),
        st.one_of(st.just({}), st.fixed_dictionaries({"energy": _fraction(0.5, 1.0)}),
                  st.fixed_dictionaries({"ratio": _fraction(0.1, 0.9) | st.just("auto")}),
                  st.fixed_dictionaries({"rank": st.integers(1, 8)}),
                  st.fixed_dictionaries({"macs": _fraction(0.1, 0.9)}))
    ).map(lambda t: {**t[0], **t[1]}),
    "kmeans": st.fixed_dictionaries(
        {"bits": st.integers(2, 8) | st.just("auto")},
        optional={"per_channel": st.booleans(), "uint4": st.booleans(), "time_budget": st.just(5.0),
                  "init": st.sampled_from(["linear", "density", "kmeans++"]), "data_aware": st.just(True)}),
    "prune": st.fixed_dictionaries({"min_size": st.sampled_from([0, 64]), "time_budget": st.just(5.0)}).flatmap(
        lambda base: st.one_of(  # sparsity=auto sets each layer's share itself: no scope, no sensitivity
            st.fixed_dictionaries({**{k: st.just(v) for k, v in base.items()}, "sparsity": _fraction(0.1, 0.9)},
                                  optional={"scope": st.sampled_from(["layer", "global"]),
                                            "sensitivity": st.just(True)}),
            st.just({**base, "sparsity": "auto"}))),
    "quantize": st.fixed_dictionaries(
        {"latency_budget_s": st.just(2.0), "sensitivity_budget_s": st.just(5.0)},
        optional={"target": st.just("size"), "per_channel": st.booleans(),
                  "activation_type": st.sampled_from(["auto", "uint8", "int8"]),
                  "calibration": st.sampled_from(["minmax", "percentile", "entropy", "mse"]),
                  "bias_correction": st.booleans(), "dynamic": st.sampled_from(["auto", "on", "off"])}),
    "quantize_dynamic": st.fixed_dictionaries({"latency_budget_s": st.just(2.0)},
                                              optional={"target": st.just("size"), "per_channel": st.booleans()}),
    "nbits": st.fixed_dictionaries(
        # 2 bits only where the runtime runs them (nbits refuses them up front otherwise: tests/test_nbits.py)
        {"bits": st.sampled_from([4, 8, 2] if runs_bits(2) else [4, 8]), "method": st.sampled_from(["rtn", "gptq"])},
        optional={"layers": st.sampled_from(["all", "budget"]), "block_size": st.sampled_from([16, 32]),
                  "symmetric": st.booleans(), "fallback_bits": st.sampled_from([0, 8])}),
    "distill": st.just({}),
    "bias_correct": st.just({}),
    "gap": st.sampled_from([{}, {"head": True}, {"head": True, "refit": False}, {"head": True, "through": 1}]),
    "fuse": st.sampled_from([{}, {"only": ["gelu", "hardswish", "hardsigmoid", "silu", "layernorm", "conv_affine"]},
                             {"contrib_ops": True}, {"hardswish_below_14": "upgrade"}]),
    "fold_batchnorm": st.just({}),
    "compact": st.sampled_from([{}, {"names": False}, {"model_notes": True}]),
    "cleanup": st.sampled_from([{}, {"onnxsim": False}]),
    "canonicalize": st.just({}),
}


def is_exact(name: str, options: dict) -> bool:
    return name in EXACT_PASSES and not (name == "gap" and options.get("head"))


# A pass run first, sometimes: compressed forms must survive later passes (ARCHITECTURE.md, rule 2), and distill
# has nothing to refit on an untouched model.
BEFORE: list[tuple[str, dict] | None] = [None, ("prune", {"sparsity": 0.5, "min_size": 0}), ("fold_batchnorm", {}),
                                         ("kmeans", {"bits": 4}), ("lowrank", {"min_size": 0, "energy": 0.9})]


@st.composite
def pass_steps(draw: Any) -> list[tuple[str, dict]]:
    """The passes of one run (cheap options: each runs in well under a second on these models): the pass under
    test, sometimes after one of BEFORE (always after a lossy one for distill)."""
    name = draw(st.sampled_from(list(OPTIONS)))
    if name == "bias_correct":  # it corrects a model quantized without correction
        return [("quantize", {"bias_correction": False, "target": "size"}), (name, {})]
    before = draw(st.sampled_from(BEFORE[1:] if name == "distill" else BEFORE))
    return ([before] if before else []) + [(name, draw(OPTIONS[name]))]
