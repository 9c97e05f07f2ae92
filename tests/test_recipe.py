"""Recipe grammar (CLI string, YAML, JSON) and option validation at parse time."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest

from graphopt import recipe
from graphopt.errors import RecipeError
from graphopt.options import BaseOptions, build_options, describe_options, option
from graphopt.passbase import GraphoptPass


@dataclasses.dataclass(frozen=True)
class ToyOptions(BaseOptions):
    sparsity: float | dict[str, float] = option(0.5, "fraction of weights to zero", low=0.0, high=1.0,
                                                high_open=True)
    scope: Literal["layer", "global"] = option("layer", "per layer or one global threshold")
    bits: int = option(8, "code width", low=1, high=8)
    skip: list[str] = option([], "node names to leave alone")
    flag: bool = option(False, "a switch")


class Toy(GraphoptPass):
    name = "toy"
    summary = "a toy pass"
    Options = ToyOptions

    def call(self, model):
        return self.result(model)


class Plain(Toy):
    name = "plain"


@pytest.fixture(autouse=True)
def toy_registry(register_passes):
    register_passes(Toy, Plain)


def test_cli_string_grammar():
    steps = recipe.parse_text("plain; toy:sparsity=0.7,scope=global,skip=a|b|c,flag=true ;toy:bits=4")
    assert [s.name for s in steps] == ["plain", "toy", "toy"]
    opts = steps[1].options
    assert (opts.sparsity, opts.scope, opts.skip, opts.flag) == (0.7, "global", ["a", "b", "c"], True)
    assert steps[2].options.bits == 4 and steps[2].options.sparsity == 0.5


def test_cli_flow_mapping_value():
    (step,) = recipe.parse_text("toy:sparsity={conv1: 0.5, conv2: 0.25},bits=2")
    assert step.options.sparsity == {"conv1": 0.5, "conv2": 0.25}
    assert step.options.bits == 2


def test_yaml_and_json_files(tmp_path):
    yml = tmp_path / "r.yaml"
    yml.write_text("passes:\n  - plain\n  - toy: {sparsity: 0.3, scope: global}\n")
    jsn = tmp_path / "r.json"
    jsn.write_text('{"passes": ["plain", {"toy": {"sparsity": 0.3, "scope": "global"}}]}')
    for path in (yml, jsn):
        steps = recipe.parse_file(path)
        assert [s.name for s in steps] == ["plain", "toy"]
        assert steps[1].options.sparsity == 0.3 and steps[1].options.scope == "global"


def test_resolve_wraps_with_canonicalize_and_cleanup():
    steps = recipe.resolve("toy; cleanup:onnxsim=false")
    assert [s.name for s in steps] == ["canonicalize", "toy", "cleanup"]
    assert steps[-1].options.onnxsim is False
    default = recipe.resolve()
    assert default[0].name == "canonicalize" and default[-1].name == "cleanup"
    assert "fold_batchnorm" in [s.name for s in default]


@pytest.mark.parametrize("text,match", [
    ("nosuch", "unknown pass 'nosuch'"),
    ("toy:colour=red", "pass 'toy': unknown option 'colour'"),
    ("toy:sparsity=1.2", "pass 'toy': option sparsity=1.2 is out of range"),
    ("toy:sparsity=1.0", "out of range"),
    ("toy:scope=sideways", "pass 'toy': option scope='sideways' is not valid; allowed: one of layer|global"),
    ("toy:bits=0", "option bits=0 is out of range"),
    ("toy:bits=9", "option bits=9 is out of range"),
    ("toy:bits=2.5", "option bits=2.5 is not valid"),
    ("toy:flag=maybe", "option flag='maybe' is not valid"),
    ("toy:max_drop=-0.1", "option max_drop=-0.1 is out of range"),
    ("toy:sparsity", "is not key=value"),
])
def test_bad_options_are_one_clear_line(text, match):
    with pytest.raises(RecipeError, match=match) as info:
        recipe.parse_text(text)
    assert "\n" not in str(info.value)


def test_bad_recipe_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("passes: [toy: {sparsity: [}")
    with pytest.raises(RecipeError, match="not valid YAML"):
        recipe.parse_file(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("steps: [toy]\n")
    with pytest.raises(RecipeError, match="with the key 'passes'"):
        recipe.parse_file(wrong)
    with pytest.raises(RecipeError, match="no such file"):
        recipe.parse_file(tmp_path / "missing.yaml")


def test_describe_options_lists_every_option():
    names = [row[0] for row in describe_options(ToyOptions)]
    assert names == ["max_drop", "sparsity", "scope", "bits", "skip", "flag"]


def test_build_options_defaults_are_fresh():
    a = build_options(ToyOptions, None, "toy")
    b = build_options(ToyOptions, {}, "toy")
    assert a.skip == [] and a.skip is not b.skip
