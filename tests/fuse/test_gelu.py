"""fuse's gelu and bias_gelu families: the GELU spellings torch and TF export, in both forms, fuse into one op
whose outputs match the unfused model in onnxruntime; GELUs with an off constant are reported, not fused."""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import helper

from graphopt.graphs import infer_shapes
from graphopt.passes.fuse import Fuse
from tests.helpers import assert_same_outputs, clone, make_model, op_types, randn, tensor_info

SHAPE = [2, 5, 8]
X = tensor_info("x", np.float32, SHAPE)
FEEDS = {"x": randn(SHAPE, seed=1) * 3}  # spans the tails, where the tanh form departs from the Erf form
BETA = math.sqrt(2 / math.pi)


def node(op: str, inputs: list[str], output: str, **attrs) -> object:
    return helper.make_node(op, inputs, [output], **attrs)


def scalar(name: str, value: float, as_node: bool) -> object | tuple[str, np.ndarray]:
    """A scalar constant as a Constant node, or (name, array) for an initializer."""
    if as_node:
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, 1, [], [value]))
    return name, np.array(value, np.float32)


# name → (nodes, tanh form); every spelling computes GELU of x into y.
ERF_TERM = [node("Erf", ["q"], "e"), node("Add", ["e", "one"], "t")]
FORMS = {
    # torch: (x * (1 + Erf(x / 1.4142))) * 0.5
    "torch_erf": ([node("Div", ["x", "sqrt2"], "q"), *ERF_TERM, node("Mul", ["x", "t"], "m"),
                   node("Mul", ["m", "half"], "y")], False),
    # TF/Keras: 0.5 * x * (1 + Erf(x * 0.7071))
    "tf_erf": ([node("Mul", ["x", "rsqrt2"], "q"), *ERF_TERM, node("Mul", ["half", "x"], "h"),
                node("Mul", ["h", "t"], "y")], False),
    # Div by Sqrt(2) left unfolded, the half on the Erf side
    "sqrt_node": ([node("Sqrt", ["two"], "s2"), node("Div", ["x", "s2"], "q"), *ERF_TERM,
                   node("Mul", ["t", "half"], "h"), node("Mul", ["x", "h"], "y")], False),
    # x * (1 + Erf(x / sqrt 2)) / 2
    "div_two": ([node("Div", ["x", "sqrt2"], "q"), *ERF_TERM, node("Mul", ["x", "t"], "m"),
                 node("Div", ["m", "two"], "y")], False),
    # torch's tanh GELU: 0.5 * (x * (1 + Tanh(beta * (x + kappa * (x * (x * x))))))
    "torch_tanh": ([node("Mul", ["x", "x"], "x2"), node("Mul", ["x", "x2"], "x3"), node("Mul", ["kappa", "x3"], "k3"),
                    node("Add", ["x", "k3"], "p"), node("Mul", ["beta", "p"], "a"), node("Tanh", ["a"], "th"),
                    node("Add", ["one", "th"], "t"), node("Mul", ["x", "t"], "m"), node("Mul", ["half", "m"], "y")],
                   True),
    # HF gelu_new: 0.5 * x * (1 + Tanh(beta * (x + kappa * Pow(x, 3))))
    "pow_tanh": ([node("Pow", ["x", "three"], "x3"), node("Mul", ["x3", "kappa"], "k3"), node("Add", ["k3", "x"], "p"),
                  node("Mul", ["p", "beta"], "a"), node("Tanh", ["a"], "th"), node("Add", ["th", "one"], "t"),
                  node("Mul", ["x", "half"], "h"), node("Mul", ["h", "t"], "y")], True),
    # HF gelu_fast: x * 0.5 * (1 + Tanh(x * beta * (1 + kappa * x * x)))
    "fast_tanh": ([node("Mul", ["x", "beta"], "xb"), node("Mul", ["kappa", "x"], "kx"), node("Mul", ["kx", "x"], "kx2"),
                   node("Add", ["one", "kx2"], "p"), node("Mul", ["xb", "p"], "a"), node("Tanh", ["a"], "th"),
                   node("Add", ["th", "one"], "t"), node("Mul", ["x", "half"], "h"), node("Mul", ["h", "t"], "y")],
                  True),
}
CONSTANTS = {"sqrt2": math.sqrt(2), "rsqrt2": 1 / math.sqrt(2), "half": 0.5, "one": 1.0, "two": 2.0, "three": 3.0,
             "beta": BETA, "kappa": 0.044715}


def gelu_model(form: str, opset: int, as_nodes: bool = False, **overrides: float):
    nodes, _ = FORMS[form]
    used = {i for n in nodes for i in n.input}
    values = {k: overrides.get(k, v) for k, v in CONSTANTS.items() if k in used}
    made = [scalar(k, v, as_nodes) for k, v in values.items()]
    const_nodes = [m for m in made if not isinstance(m, tuple)]
    inits = dict(m for m in made if isinstance(m, tuple))
    return make_model(const_nodes + nodes, [X], ["y"], initializers=inits, opset=opset)


def run_fuse(model, atol: float, **options):
    before = clone(model)
    result = Fuse(Fuse.Options(**options))(model)
    # GELU is x times a bounded factor: the fused kernel's Erf/Tanh differ from the unfused ones by a few float32
    # ulps of that factor, so |diff| stays below ~1e-6·|x| (|x| < 15 here); atol covers the tanh kernels.
    assert_same_outputs(before, model, FEEDS, rtol=1e-5, atol=atol)
    return result


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("as_nodes", [False, True])
def test_gelu_spellings_fuse_into_one_op(form: str, as_nodes: bool) -> None:
    tanh = FORMS[form][1]
    model = gelu_model(form, 20, as_nodes)
    result = run_fuse(model, 1e-5, only=["gelu"])
    fused = [n for n in model.graph if n.op_type not in ("Constant", "Sqrt")]
    assert [n.op_type for n in fused] == ["Gelu"] and [r["family"] for r in result.rows] == ["gelu"]
    assert fused[0].attributes.get("approximate", None) is None if not tanh else \
        fused[0].attributes["approximate"].value == "tanh"
    model = gelu_model(form, 17, as_nodes)
    run_fuse(model, 1e-5, only=["gelu"], contrib_ops=True)
    ops = [(n.domain, n.op_type) for n in model.graph if n.op_type not in ("Constant", "Sqrt")]
    assert ops == [("com.microsoft", "FastGelu" if tanh else "Gelu")]


@pytest.mark.parametrize("form,override,reason", [
    ("torch_erf", {"half": 0.45}, "Mul by 0.45, not 0.5"),
    ("tf_erf", {"rsqrt2": 0.7}, "Erf of 0.7·x, not x/sqrt(2)"),
    ("torch_tanh", {"kappa": 0.045}, "cubic coefficient 0.045, not 0.044715"),
    ("pow_tanh", {"beta": 0.8}, "Tanh of 0.8·x + 0.03577·x^3, not sqrt(2/pi)·(x + 0.044715·x^3)"),
])
def test_off_constants_are_near_misses(form: str, override: dict, reason: str) -> None:
    model = gelu_model(form, 20, **override)
    result = run_fuse(model, 1e-6, only=["gelu", "bias_gelu"])
    assert not result.rows and "Gelu" not in op_types(model)
    assert result.notes == [f"gelu: 1 near-miss left unfused: 1 '{reason}'"]


def test_gated_gelu_is_not_a_near_miss() -> None:
    """GELU(x) * g (a gated unit) fuses its GELU; the gate Mul is not reported as a GELU gone wrong."""
    nodes, _ = FORMS["torch_erf"]
    model = make_model(nodes + [node("Mul", ["y", "g"], "z")], [X, tensor_info("g", np.float32, SHAPE)], ["z"],
                       initializers={k: np.array(CONSTANTS[k], np.float32) for k in ("sqrt2", "one", "half")},
                       opset=20)
    before = clone(model)
    result = Fuse(Fuse.Options(only=["gelu"]))(model)
    assert_same_outputs(before, model, {**FEEDS, "g": randn(SHAPE, seed=2)}, rtol=1e-5, atol=1e-5)
    assert [n.op_type for n in model.graph] == ["Gelu", "Mul"] and not result.notes


def linear_gelu(form: str, bias_shape: list[int]):
    """x · W + b → GELU (the FFN's first half)."""
    nodes, _ = FORMS[form]
    renamed = [helper.make_node(n.op_type, ["h" if i == "x" else i for i in n.input], list(n.output)) for n in nodes]
    inits = {k: np.array(v, np.float32) for k, v in CONSTANTS.items()}
    inits.update(W=randn([8, 12], seed=3) * 0.5, b=randn(bias_shape, seed=4))
    head = [node("MatMul", ["x", "W"], "xw"), node("Add", ["xw", "b"], "h")]
    model = make_model(head + renamed, [X], ["y"], initializers=inits, opset=17)
    infer_shapes(model)  # as canonicalize leaves it: a [1, 1, n] bias needs the input's rank
    return model


@pytest.mark.parametrize("form,op", [("torch_erf", "BiasGelu"), ("torch_tanh", "FastGelu")])
@pytest.mark.parametrize("bias_shape", [[12], [1, 1, 12]])
def test_bias_gelu(form: str, op: str, bias_shape: list[int]) -> None:
    model = linear_gelu(form, bias_shape)
    result = run_fuse(model, 1e-5, only=["bias_gelu"])
    assert [(n.domain, n.op_type) for n in model.graph] == [("", "MatMul"), ("com.microsoft", op)]
    assert result.rows[0]["replaced"][0] == "Add"
    bias = next(n for n in model.graph if n.op_type == op).inputs[1]
    assert list(bias.const_value.shape) == [12]


def test_bias_gelu_needs_a_bias_along_the_last_axis() -> None:
    model = linear_gelu("torch_erf", [5, 1])  # varies along the sequence: BiasGelu cannot take it
    result = run_fuse(model, 1e-6, only=["bias_gelu"])
    assert not result.rows and result.notes == [
        "bias_gelu: 1 near-miss left unfused: 1 'bias of shape [5, 1] is not a vector along the last axis'"]
    result = run_fuse(model, 1e-5, only=["bias_gelu", "gelu"], contrib_ops=True)
    assert [r["family"] for r in result.rows] == ["gelu"] and not result.notes  # the GELU alone fuses
