"""The `fuse` pass: each family fuses its exact spelled-out forms only, and outputs stay within 1e-5 in ORT."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from graphopt.errors import RecipeError
from graphopt.options import build_options
from graphopt.passbase import PROVENANCE_KEY
from graphopt.passes.fuse import Fuse
from tests.helpers import assert_same_outputs, clone, make_model, op_types, randn, tensor_info

SHAPE = [2, 4, 5, 6]
FEEDS = {"x": randn(SHAPE, seed=1) * 4}  # spans both Clip corners of HardSwish (x < -3, x > 3)
X = tensor_info("x", np.float32, SHAPE)
F32 = np.float32


def const(name: str, value, shape=()) -> helper.NodeProto:
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, 1, shape, np.ravel(value)))


def scalars(**values: float) -> list:
    return [const(k, v) for k, v in values.items()]


def clip(t: str, out: str) -> helper.NodeProto:
    return helper.make_node("Clip", [t, "zero", "six"], [out])


def fuse(nodes, opset=14, outputs=("y",), feeds=FEEDS, atol=1e-6, **options):
    """Run the pass on a fresh model; check outputs against the unfused model; return (model, result)."""
    model = make_model(nodes, [X], list(outputs), opset=opset)
    before = clone(model)
    result = Fuse(Fuse.Options(**options))(model)
    assert_same_outputs(before, model, feeds, rtol=1e-5, atol=atol)
    return model, result


BASE = scalars(three=3.0, zero=0.0, six=6.0, sixth=1 / 6)
HARDSWISH_FORMS = {
    "mul_then_div": [helper.make_node("Add", ["x", "three"], ["a"]), clip("a", "c"),
                     helper.make_node("Mul", ["x", "c"], ["m"]), helper.make_node("Div", ["m", "six"], ["y"])],
    "div_then_mul": [helper.make_node("Add", ["three", "x"], ["a"]), clip("a", "c"),
                     helper.make_node("Div", ["c", "six"], ["d"]), helper.make_node("Mul", ["d", "x"], ["y"])],
    "mul_sixth": [helper.make_node("Add", ["x", "three"], ["a"]), clip("a", "c"),
                  helper.make_node("Mul", ["c", "x"], ["m"]), helper.make_node("Mul", ["sixth", "m"], ["y"])],
    "relu6_min": [helper.make_node("Add", ["x", "three"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
                  helper.make_node("Min", ["r", "six"], ["c"]), helper.make_node("Mul", ["c", "sixth"], ["d"]),
                  helper.make_node("Mul", ["x", "d"], ["y"])],
    "hardsigmoid": [helper.make_node("HardSigmoid", ["x"], ["h"], alpha=1 / 6, beta=0.5),
                    helper.make_node("Mul", ["h", "x"], ["y"])],
}


@pytest.mark.parametrize("form", sorted(HARDSWISH_FORMS))
def test_hardswish_forms_fuse_into_one_op(form: str) -> None:
    model, result = fuse(BASE + HARDSWISH_FORMS[form])
    assert [t for t in op_types(model) if t != "Constant"] == ["HardSwish"]
    assert [r["family"] for r in result.rows] == ["hardswish"]
    assert model.graph.outputs[0].name == "y"
    node = next(n for n in model.graph if n.op_type == "HardSwish")
    assert node.metadata_props[PROVENANCE_KEY] == "fuse"


def test_hardswish_below_opset_14() -> None:
    nodes = BASE + HARDSWISH_FORMS["mul_then_div"]
    model, _ = fuse(nodes, opset=13)  # default: x * HardSigmoid(x), no opset change
    assert [t for t in op_types(model) if t != "Constant"] == ["HardSigmoid", "Mul"]
    assert model.opset_imports[""] == 13
    model, result = fuse(nodes, opset=13, hardswish_below_14="upgrade")
    assert "HardSwish" in op_types(model) and model.opset_imports[""] == 14
    assert result.rows[0]["change"] == "opset"
    model, result = fuse(nodes, opset=13, hardswish_below_14="skip", only=["hardswish"])
    assert "HardSwish" not in op_types(model) and not result.rows and "opset 14" in result.notes[0]


@pytest.mark.parametrize("case", ["clip_max_5", "add_2.9", "div_6.5", "clip_used_twice"])
def test_hardswish_not_fused_when_not_exact(case: str) -> None:
    consts = scalars(three=2.9 if case == "add_2.9" else 3.0, zero=0.0, six=6.0,
                     six_or_5=5.0 if case == "clip_max_5" else 6.0, div=6.5 if case == "div_6.5" else 6.0)
    nodes = consts + [helper.make_node("Add", ["x", "three"], ["a"]),
                      helper.make_node("Clip", ["a", "zero", "six_or_5"], ["c"]),
                      helper.make_node("Mul", ["x", "c"], ["m"]), helper.make_node("Div", ["m", "div"], ["y"])]
    outputs = ("y", "c") if case == "clip_used_twice" else ("y",)
    model, result = fuse(nodes, outputs=outputs)
    assert not result.rows and "HardSwish" not in op_types(model) and "HardSigmoid" not in op_types(model)
    reason = {"clip_max_5": "Clip(0, 5), not (0, 6)", "add_2.9": "Add constant is 2.9, not 3",
              "div_6.5": "Div by 6.5, not 6", "clip_used_twice": "the Clip output inside the pattern is also used "
                                                                   "outside it"}[case]
    assert result.notes == [f"hardswish: 1 near-miss left unfused: 1 '{reason}'"]


def test_near_misses_counted_per_site_and_family() -> None:
    """Two HardSwish sites spelled with a wrong constant are left as they are and reported with their reasons;
    a plain Mul (no Clip: not a candidate) and a gate x * HardSigmoid(y) (not the same x) are not counted."""
    nodes = scalars(three=3.0, two9=2.9, zero=0.0, six=6.0, five9=5.9) + [
        helper.make_node("Add", ["x", "two9"], ["a"]), clip("a", "c"),
        helper.make_node("Mul", ["x", "c"], ["m"]), helper.make_node("Div", ["m", "six"], ["y1"]),
        helper.make_node("Add", ["y1", "three"], ["a2"]), clip("a2", "c2"),
        helper.make_node("Mul", ["y1", "c2"], ["m2"]), helper.make_node("Div", ["m2", "five9"], ["y2"]),
        helper.make_node("HardSigmoid", ["x"], ["h"], alpha=1 / 6, beta=0.5),
        helper.make_node("Mul", ["y2", "h"], ["y"]),
        helper.make_node("Mul", ["y", "y"], ["z"])]
    model, result = fuse(nodes, outputs=("z",), only=["hardswish"])
    assert not result.rows and "HardSwish" not in op_types(model)
    assert result.notes == ["hardswish: 2 near-misses left unfused: 1 'Div by 5.9, not 6', "
                            "1 'Add constant is 2.9, not 3'"]


def test_near_miss_fused_by_a_later_family_is_not_reported() -> None:
    """x * (Relu6(x + 3) / 6) whose Relu6(x + 3) / 6 is also a graph output: hardswish rejects the site (an inner
    value leaves the pattern), hardsigmoid then fuses that part, so no near-miss is left to report."""
    nodes = BASE + HARDSWISH_FORMS["div_then_mul"]
    model, result = fuse(nodes, outputs=("y", "d"))
    assert [r["family"] for r in result.rows] == ["hardsigmoid"] and "HardSwish" not in op_types(model)
    assert not any("near-miss" in n for n in result.notes)
    model, result = fuse(nodes, outputs=("y", "d"), only=["hardswish"])
    assert result.notes == ["hardswish: 1 near-miss left unfused: 1 'the Div output inside the pattern is also used "
                            "outside it'"]


def test_hardsigmoid_forms() -> None:
    nodes = BASE + [helper.make_node("Add", ["x", "three"], ["a"]), clip("a", "c"),
                    helper.make_node("Div", ["c", "six"], ["y"])]
    model, _ = fuse(nodes)
    assert [t for t in op_types(model) if t != "Constant"] == ["HardSigmoid"]
    nodes = scalars(a=0.2, b=0.5, zero=0.0, one=1.0) + [
        helper.make_node("Mul", ["x", "a"], ["m"]), helper.make_node("Add", ["b", "m"], ["s"]),
        helper.make_node("Clip", ["s", "zero", "one"], ["y"])]
    model, _ = fuse(nodes)
    node = next(n for n in model.graph if n.op_type == "HardSigmoid")
    assert node.attributes["alpha"].value == pytest.approx(0.2) and node.attributes["beta"].value == pytest.approx(0.5)
    bad = scalars(a=0.2, b=0.5, zero=0.0, one=1.5) + nodes[-3:]  # Clip(…, 0, 1.5) is no HardSigmoid
    model, result = fuse(bad)
    assert not result.rows


def test_silu_needs_contrib_below_opset_24() -> None:
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["s", "x"], ["y"])]
    model, result = fuse(nodes, only=["silu"])
    assert not result.rows and "contrib_ops" in result.notes[0]
    model, result = fuse(nodes, only=["silu"], contrib_ops=True)
    assert [(n.domain, n.op_type) for n in model.graph] == [("com.microsoft", "QuickGelu")]
    scaled = scalars(alpha=1.702) + [helper.make_node("Mul", ["x", "alpha"], ["t"]),
                                     helper.make_node("Sigmoid", ["t"], ["s"]), helper.make_node("Mul", ["x", "s"], ["y"])]
    model, _ = fuse(scaled, only=["silu"], contrib_ops=True)
    node = next(n for n in model.graph if n.op_type == "QuickGelu")
    assert node.attributes["alpha"].value == pytest.approx(1.702)


GELU_TERM = scalars(sqrt2=float(np.sqrt(2.0)), one=1.0, half=0.5) + [
    helper.make_node("Div", ["x", "sqrt2"], ["q"]), helper.make_node("Erf", ["q"], ["e"]),
    helper.make_node("Add", ["e", "one"], ["t"])]
GELU_FORMS = {
    "x_half_first": [helper.make_node("Mul", ["x", "half"], ["h"]), helper.make_node("Mul", ["h", "t"], ["y"])],
    "half_last": [helper.make_node("Mul", ["x", "t"], ["h"]), helper.make_node("Mul", ["half", "h"], ["y"])],
    "term_half": [helper.make_node("Mul", ["t", "half"], ["h"]), helper.make_node("Mul", ["x", "h"], ["y"])],
}


@pytest.mark.parametrize("form", sorted(GELU_FORMS))
def test_gelu_forms(form: str) -> None:
    model, _ = fuse(GELU_TERM + GELU_FORMS[form], opset=20)
    assert [t for t in op_types(model) if t != "Constant"] == ["Gelu"]
    model, _ = fuse(GELU_TERM + GELU_FORMS[form], opset=13, contrib_ops=True)
    assert [(n.domain, n.op_type) for n in model.graph if n.op_type != "Constant"] == [("com.microsoft", "Gelu")]


def test_gelu_wrong_half_not_fused() -> None:
    nodes = [n for n in GELU_TERM if n.output[0] != "half"] + [const("half", 0.45)] + GELU_FORMS["half_last"]
    _, result = fuse(nodes, opset=20)
    assert not result.rows and result.notes == ["gelu: 1 near-miss left unfused: 1 'Mul by 0.45, not 0.5'"]


def test_mish_forms_and_opset() -> None:
    softplus = [helper.make_node("Softplus", ["x"], ["p"]), helper.make_node("Tanh", ["p"], ["t"]),
                helper.make_node("Mul", ["x", "t"], ["y"])]
    log_exp = scalars(one=1.0) + [helper.make_node("Exp", ["x"], ["e"]), helper.make_node("Add", ["e", "one"], ["a"]),
                                  helper.make_node("Log", ["a"], ["p"]), helper.make_node("Tanh", ["p"], ["t"]),
                                  helper.make_node("Mul", ["t", "x"], ["y"])]
    for nodes in (softplus, log_exp):
        model, _ = fuse(nodes, opset=18)
        assert [t for t in op_types(model) if t != "Constant"] == ["Mish"]
    _, result = fuse(softplus, opset=17)
    assert not result.rows and "opset 18" in result.notes[0]


def layernorm_nodes(opset: int, gamma: bool = True, axes=(-1,), square: str = "Pow") -> list:
    reduce = ({"axes": list(axes)}, []) if opset < 18 else ({}, ["axes"])
    nodes = [const("eps", 1e-5), const("two", 2.0), helper.make_node("ReduceMean", ["x", *reduce[1]], ["mu"], **reduce[0]),
             helper.make_node("Sub", ["x", "mu"], ["d"]),
             helper.make_node("Pow", ["d", "two"], ["sq"]) if square == "Pow" else helper.make_node("Mul", ["d", "d"], ["sq"]),
             helper.make_node("ReduceMean", ["sq", *reduce[1]], ["var"], **reduce[0]),
             helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"]),
             helper.make_node("Div", ["d", "sd"], ["n" if gamma else "y"])]
    if opset >= 18:
        nodes.insert(0, helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("axes", 7, [len(axes)], axes)))
    if gamma:
        nodes += [const("g", randn([6], seed=3), [6]), const("b", randn([6], seed=4), [6]),
                  helper.make_node("Mul", ["n", "g"], ["gn"]), helper.make_node("Add", ["gn", "b"], ["y"])]
    return nodes


@pytest.mark.parametrize("opset,gamma,square", [(17, True, "Pow"), (18, True, "Mul"), (18, False, "Pow")])
def test_layernorm(opset: int, gamma: bool, square: str) -> None:
    model, _ = fuse(layernorm_nodes(opset, gamma, square=square), opset=opset, atol=1e-5)
    assert [t for t in op_types(model) if t != "Constant"] == ["LayerNormalization"]


def test_layernorm_skipped_on_other_axes_or_old_opset() -> None:
    _, result = fuse(layernorm_nodes(17, axes=(1,)), opset=17)
    assert not result.rows  # one site, tried from its Add, Mul and Div roots: counted once
    assert result.notes == ["layernorm: 1 near-miss left unfused: 1 'ReduceMean axes [1] are not the trailing axes "
                            "(rank 4)'"]
    _, result = fuse(layernorm_nodes(13), opset=13)
    assert not result.rows and "opset 17" in result.notes[0]


# ---------------------------------------------------------------- Conv + Mul/Add folding

W = randn([4, 4, 3, 3], seed=5)


def conv_model(ops: list[tuple[str, np.ndarray]], bias: bool = True, extra_output: bool = False,
               shared: bool = False):
    inits = {"W": W, "B": randn([4], seed=6)} if bias else {"W": W}
    nodes = [helper.make_node("Conv", ["x", "W", "B"] if bias else ["x", "W"], ["c0"], pads=[1, 1, 1, 1])]
    for i, (op, value) in enumerate(ops):
        inits[f"k{i}"] = value.astype(F32)
        nodes.append(helper.make_node(op, [f"c{i}", f"k{i}"] if op != "Mul" else [f"k{i}", f"c{i}"], [f"c{i + 1}"]))
    outputs = [f"c{len(ops)}"] + (["c0"] if extra_output else [])
    if shared:
        nodes.append(helper.make_node("Conv", ["x", "W"], ["other"], pads=[1, 1, 1, 1]))
        outputs.append("other")
    return make_model(nodes, [X], outputs, initializers=inits, opset=13)


def fold(model):
    before = clone(model)
    result = Fuse(Fuse.Options(only=["conv_affine"]))(model)
    assert_same_outputs(before, model, FEEDS, rtol=1e-5, atol=1e-5)
    return result


@pytest.mark.parametrize("ops,bias", [
    ([("Mul", randn([4, 1, 1], seed=7)), ("Add", randn([1, 4, 1, 1], seed=8))], True),
    ([("Mul", np.array([1.7])), ("Add", np.array([0.3]))], False),  # PP-LCNet's learnable affine: shape [1]
    ([("Div", randn([4, 1, 1], seed=9) + 3), ("Sub", np.array(0.5))], True),
])
def test_conv_affine_folds_exactly(ops, bias: bool) -> None:
    model = conv_model(ops, bias=bias)
    result = fold(model)
    assert op_types(model) == ["Conv"]
    assert result.rows[0]["replaced"] == ["Conv", *(op for op, _ in ops)]
    assert model.graph.outputs[0].name == f"c{len(ops)}"  # the model output keeps its name


@pytest.mark.parametrize("case", ["spatial", "last_axis", "second_consumer"])
def test_conv_affine_skipped(case: str) -> None:
    value = {"spatial": randn([1, 1, 5, 6], seed=10), "last_axis": randn([6], seed=11),
             "second_consumer": randn([4, 1, 1], seed=12)}[case]
    model = conv_model([("Mul", value)], extra_output=case == "second_consumer")
    result = fold(model)
    assert not result.rows and op_types(model) == ["Conv", "Mul"]
    reason = {"spatial": "Mul constant of shape [1, 1, 5, 6] is not per output channel",
              "last_axis": "Mul constant of shape [6] is not per output channel",
              "second_consumer": "the Conv output is also a graph output"}[case]
    assert result.notes == [f"conv_affine: 1 near-miss left unfused: 1 '{reason}'"]


def test_conv_affine_shared_weight_copied() -> None:
    model = conv_model([("Mul", randn([4, 1, 1], seed=13))], shared=True)
    fold(model)  # the second Conv keeps the original W
    convs = [n for n in model.graph if n.op_type == "Conv"]
    assert convs[0].inputs[1] is not convs[1].inputs[1]
    np.testing.assert_array_equal(convs[1].inputs[1].const_value.numpy(), W)


def test_options_are_validated() -> None:
    with pytest.raises(RecipeError, match="only"):
        build_options(Fuse.Options, {"only": ["bogus"]}, "fuse")
    opts = build_options(Fuse.Options, {"skip": ["conv_affine"]}, "fuse")
    assert "conv_affine" not in Fuse(opts).families() and "hardswish" in Fuse(opts).families()


def test_conv_affine_skips_compressed_weight() -> None:
    q = np.clip(np.round(W / 0.02), -127, 127).astype(np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "s"], ["W"]),
             helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Mul", ["c", "k"], ["y"])]
    model = make_model(nodes, [X], ["y"], initializers={"Wq": q, "s": np.array(0.02, F32),
                                                       "k": randn([4, 1, 1], seed=14)}, opset=13)
    result = fold(model)
    assert not result.rows and op_types(model) == ["DequantizeLinear", "Conv", "Mul"]
