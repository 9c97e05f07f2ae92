"""Recipes: which passes run, in order, with validated options.

One grammar in three spellings:
- YAML/JSON file: ``passes: [{prune: {sparsity: 0.5}}, quantize]`` (or a bare list);
- CLI string: ``"fold_batchnorm; prune:sparsity=0.5,scope=global; quantize"`` — passes split by ``;``,
  options after ``:`` as ``key=value`` split by ``,``, values parsed as YAML scalars, lists as ``a|b|c``,
  mappings as YAML flow ``{conv1: 0.5, conv2: 0.3}``;
- Python: the same list or string passed to ``graphopt.optimize(passes=...)``.
``canonicalize`` always runs first and ``cleanup`` last; listing them only sets their options.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from graphopt.cpu import TARGETS
from graphopt.errors import RecipeError
from graphopt.options import build_options

# Exact passes only; later pass families extend it once they are measured safe by default.
DEFAULT_PASSES = ["fold_batchnorm", "fuse"]
FIRST, LAST = "canonicalize", "cleanup"


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    pass_cls: type
    options: Any
    raw: dict[str, Any]

    def label(self) -> str:
        if not self.raw:
            return self.name
        return self.name + ":" + ",".join(f"{k}={_show(v)}" for k, v in self.raw.items())


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "|".join(str(v) for v in value)
    return str(value)


def registry() -> dict[str, type]:
    from graphopt.passes import REGISTRY

    return REGISTRY


def make_step(name: str, raw: dict[str, Any] | None) -> Step:
    passes = registry()
    if name not in passes:
        raise RecipeError(f"unknown pass {name!r} (passes: {', '.join(sorted(passes))})")
    if raw is not None and not isinstance(raw, dict):
        raise RecipeError(f"pass {name!r}: options must be a mapping of option to value, got {raw!r}")
    cls = passes[name]
    return Step(name, cls, build_options(cls.Options, raw, name), dict(raw or {}))


def _split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside {} and [] (so YAML flow mappings keep their commas)."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _scalar(text: str, where: str) -> Any:
    text = text.strip()
    if "|" in text and not text.startswith(("{", "[")):
        return [_scalar(part, where) for part in text.split("|") if part.strip()]
    try:
        return yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        raise RecipeError(f"{where}: cannot parse value {text!r}") from None


def parse_text(text: str) -> list[Step]:
    """Parse the CLI spelling."""
    steps = []
    for chunk in _split_top(text, ";"):
        chunk = chunk.strip()
        if not chunk:
            continue
        name, _, opts = chunk.partition(":")
        name = name.strip()
        raw: dict[str, Any] = {}
        for item in _split_top(opts, ","):
            if not item.strip():
                continue
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise RecipeError(f"pass {name!r}: option {item.strip()!r} is not key=value")
            raw[key.strip()] = _scalar(value, f"pass {name!r} option {key.strip()!r}")
        steps.append(make_step(name, raw))
    return steps


def target_of(obj: Any) -> str | None:
    """The recipe's ``target_cpu`` (YAML/JSON mapping spelling), validated; None when it names none."""
    if not isinstance(obj, dict) or obj.get("target_cpu") is None:
        return None
    target = str(obj["target_cpu"]).strip().lower()
    if target not in TARGETS:
        raise RecipeError(f"recipe: target_cpu {obj['target_cpu']!r}: expected one of {', '.join(TARGETS)}")
    return target


def parse_obj(obj: Any) -> list[Step]:
    """Parse the YAML/JSON spelling: {passes: [...], target_cpu: ...} or a bare list; items are names or
    {name: options}."""
    if isinstance(obj, dict):
        if "passes" not in obj or set(obj) - {"passes", "target_cpu"}:
            raise RecipeError(f"recipe: expected a mapping with the key 'passes' (and optionally 'target_cpu'), "
                              f"got keys {sorted(obj)}")
        target_of(obj)
        obj = obj["passes"]
    if not isinstance(obj, list):
        raise RecipeError("recipe: 'passes' must be a list of pass names or {name: {option: value}} items")
    steps = []
    for item in obj:
        if isinstance(item, str):
            steps.append(make_step(item.strip(), None))
        elif isinstance(item, dict) and len(item) == 1:
            (name, raw), = item.items()
            steps.append(make_step(str(name), raw))
        else:
            raise RecipeError(f"recipe: item {item!r} is neither a pass name nor a {{name: {{options}}}} mapping")
    return steps


def read_file(path: str | Path) -> Any:
    """The parsed YAML/JSON object of a recipe file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path}: no such file")
    text = path.read_text()
    try:
        obj = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise RecipeError(f"recipe {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                          f"{str(err).splitlines()[0]}") from None
    return obj


def parse_file(path: str | Path) -> list[Step]:
    return parse_obj(read_file(path))


def resolve(passes: str | list | dict | None = None, recipe: str | Path | None = None) -> list[Step]:
    """The full ordered recipe: canonicalize, the user's (or default) passes, cleanup."""
    return resolve_recipe(passes, recipe)[0]


def resolve_recipe(passes: str | list | dict | None = None, recipe: str | Path | None = None
                   ) -> tuple[list[Step], str | None]:
    """:func:`resolve` and the recipe's ``target_cpu`` (None when it names none)."""
    if passes is not None and recipe is not None:
        raise RecipeError("give either passes or a recipe file, not both")
    obj = read_file(recipe) if recipe is not None else passes
    target = target_of(obj)
    if isinstance(obj, str):
        steps = parse_text(obj)
    elif obj is not None:
        steps = parse_obj(obj if isinstance(obj, dict) else list(obj))
    else:
        available = registry()
        steps = [make_step(name, None) for name in DEFAULT_PASSES if name in available]
    first = [s for s in steps if s.name == FIRST] or [make_step(FIRST, None)]
    last = [s for s in steps if s.name == LAST] or [make_step(LAST, None)]
    middle = [s for s in steps if s.name not in (FIRST, LAST)]
    return [first[-1], *middle, last[-1]], target
