"""Typed pass options: dataclass fields with docs and limits, validated when a recipe is parsed.

A pass declares ``Options`` as a dataclass whose fields come from :func:`option`. Values arriving from YAML,
JSON or the CLI string are converted by the field's annotation (bool, int, float, str, Literal choices,
lists, dicts, ``X | None``), then checked against ``choices``/``low``/``high``. Every error names the pass,
the option and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from graphopt.errors import RecipeError


def option(default: Any, doc: str, *, choices: tuple | None = None, low: float | None = None,
           high: float | None = None, low_open: bool = False, high_open: bool = False) -> Any:
    """A pass option: default, one-line doc, and the allowed values or range (inclusive unless *_open)."""
    meta = {"doc": doc, "choices": choices, "low": low, "high": high, "low_open": low_open, "high_open": high_open}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class BaseOptions:
    """Options every pass takes."""

    max_drop: float | None = option(
        None, "accuracy budget of this pass (fraction on the gate metric); the gate checks it after the pass",
        low=0.0, high=1.0)


def _describe(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return "one of " + "|".join(str(a) for a in get_args(annotation))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(annotation))
    if origin in (list, tuple):
        return f"a list of {_describe(get_args(annotation)[0])} (a|b|c)"
    if origin is dict:
        key, val = get_args(annotation)
        return f"a mapping of {_describe(key)} to {_describe(val)}"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


class _Bad(ValueError):
    pass


def _convert(value: Any, annotation: Any) -> Any:
    origin = get_origin(annotation)
    if annotation is Any:
        return value
    if origin is Literal:
        allowed = get_args(annotation)
        if value in allowed:
            return value
        if isinstance(value, str):  # YAML may read "8" as int where choices are strings, and vice versa
            for choice in allowed:
                if str(choice) == value:
                    return choice
        raise _Bad
    if origin in (Union, types.UnionType):
        args = get_args(annotation)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg)
            except _Bad:
                continue
        raise _Bad
    if origin in (list, tuple):
        (item,) = get_args(annotation)[:1]
        items = value if isinstance(value, (list, tuple)) else [value]
        converted = [_convert(v, item) for v in items]
        return tuple(converted) if origin is tuple else converted
    if origin is dict:
        key_t, val_t = get_args(annotation)
        if not isinstance(value, dict):
            raise _Bad
        return {_convert(k, key_t): _convert(v, val_t) for k, v in value.items()}
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise _Bad
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise _Bad
        return int(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Bad
        return float(value)
    if annotation is str:
        if isinstance(value, (dict, list)) or value is None:
            raise _Bad
        return str(value)
    raise _Bad


def _check_range(value: Any, meta: dict) -> bool:
    values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        low, high = meta.get("low"), meta.get("high")
        if low is not None and (v < low or (meta.get("low_open") and v == low)):
            return False
        if high is not None and (v > high or (meta.get("high_open") and v == high)):
            return False
    return True


def allowed_text(field: dataclasses.Field, annotation: Any) -> str:
    meta = field.metadata
    if meta.get("choices"):
        return "one of " + "|".join(str(c) for c in meta["choices"])
    text = _describe(annotation)
    low, high = meta.get("low"), meta.get("high")
    if low is not None or high is not None:
        lo = "" if low is None else ("(" if meta.get("low_open") else "[") + f"{low}"
        hi = "" if high is None else f"{high}" + (")" if meta.get("high_open") else "]")
        text += f" in {lo or '(-inf'}, {hi or 'inf)'}"
    return text


def build_options(options_cls: type, raw: dict[str, Any] | None, pass_name: str) -> Any:
    """Convert and validate raw option values; any problem is one RecipeError line."""
    raw = dict(raw or {})
    hints = typing.get_type_hints(options_cls)
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    values = {}
    for key, value in raw.items():
        if key not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise RecipeError(f"pass {pass_name!r}: unknown option {key!r} (options: {known})")
        field, annotation = fields[key], hints[key]
        allowed = allowed_text(field, annotation)
        try:
            converted = _convert(value, annotation)
        except _Bad:
            raise RecipeError(f"pass {pass_name!r}: option {key}={value!r} is not valid; allowed: {allowed}") from None
        choices = field.metadata.get("choices")
        items = converted if isinstance(converted, list) else [converted]
        if choices and any(item not in choices for item in items):
            raise RecipeError(f"pass {pass_name!r}: option {key}={value!r} is not valid; allowed: {allowed}")
        if not _check_range(converted, field.metadata):
            raise RecipeError(f"pass {pass_name!r}: option {key}={value!r} is out of range; allowed: {allowed}")
        values[key] = converted
    try:
        built = options_cls(**values)
        check = getattr(built, "check", None)
        if check is not None:
            check()
    except (ValueError, TypeError) as err:
        raise RecipeError(f"pass {pass_name!r}: {err}") from None
    return built


def describe_options(options_cls: type) -> list[tuple[str, str, str, str]]:
    """(name, default, allowed, doc) for every option, for `graphopt passes`."""
    hints = typing.get_type_hints(options_cls)
    rows = []
    for field in dataclasses.fields(options_cls):
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        rows.append((field.name, repr(default), allowed_text(field, hints[field.name]), field.metadata.get("doc", "")))
    return rows
