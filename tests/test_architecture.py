"""The rules ARCHITECTURE.md states, checked on the code: no import cycles (module- or function-level), no
lazy import of our own code outside the entry points, no `_private` name imported across modules, the core never
imports a pass, and its "adding a pass" example runs."""

from __future__ import annotations

import ast
import re
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest

import graphopt
from graphopt import recipe
from graphopt.pipeline import RunOptions
from tests.helpers import REPO

SOURCES = {"graphopt": REPO / "graphopt", "graphopt.passes": REPO / "passes"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join([package, *parts])
            if package == "graphopt" and name.startswith("graphopt.passes"):
                continue
            found[name] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import in the file, at any depth."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names = [a.name for a in node.names]
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES]
            out += [(m, []) for m in submodules]
            out.append((base, [n for n in names if f"{base}.{n}" not in MODULES]))
    return [(m, names) for m, names in out if m in MODULES]


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_no_import_cycles():
    edges = {name: {m for m, _ in deps if m != name} for name, deps in GRAPH.items()}
    # a package's __init__ importing its own submodules is its public face, not a cycle through them
    for name in edges:
        edges[name] = {m for m in edges[name] if not (MODULES[name].name == "__init__.py" and m.startswith(name + "."))}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(edges[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)


def _private_attributes(name: str, path: Path) -> list[str]:
    """``alias._name`` where ``alias`` is another graphopt module imported by this one."""
    tree = ast.parse(path.read_text())
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                if f"{node.module}.{a.name}" in MODULES:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            aliases.update({a.asname: a.name for a in node.names if a.asname and a.name in MODULES})
    return [f"{name} reads {aliases[n.value.id]}.{n.attr}" for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases
            and n.attr.startswith("_") and not n.attr.startswith("__") and aliases[n.value.id] != name]


def test_no_private_names_across_modules():
    crossing = [f"{name} imports {n} from {module}" for name, deps in GRAPH.items() for module, names in deps
                for n in names if n.startswith("_") and module != name and not n.startswith("__")]
    crossing += [hit for name, path in MODULES.items() for hit in _private_attributes(name, path)]
    assert crossing == []


def test_the_core_reaches_passes_only_through_the_registry():
    reach = [f"{name} -> {m}" for name, deps in GRAPH.items() if not name.startswith("graphopt.passes")
             for m, _ in deps if m.startswith("graphopt.passes") and not (name == "graphopt.recipe"
                                                                         and m == "graphopt.passes")]
    assert reach == []


# Entry points load the heavy parts on use (``import graphopt`` stays fast); the registry is the core's one
# door to the passes. Anywhere else a function-level import of our own code would be hiding a cycle.
LAZY_ALLOWED = {"graphopt", "graphopt.cli", "graphopt.recipe"}


def test_function_level_imports_only_at_the_entry_points():
    lazy = []
    for name, path in MODULES.items():
        if name in LAZY_ALLOWED:
            continue
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("graphopt")):
                        lazy.append(f"{name}.{fn.name} imports {node.module}")
                    elif isinstance(node, ast.Import) and any(a.name.startswith("graphopt") for a in node.names):
                        lazy.append(f"{name}.{fn.name} imports {node.names[0].name}")
    assert lazy == []


def test_adding_a_pass_as_architecture_shows(tmp_path, monkeypatch):
    text = (REPO / "ARCHITECTURE.md").read_text()
    code = re.search(r"```python\n(# passes/clip_weights.py\n.*?)```", text, re.S).group(1)
    module = types.ModuleType("clip_weights")  # a real module: dataclasses look their own module up
    monkeypatch.setitem(sys.modules, "clip_weights", module)
    exec(compile(code, "ARCHITECTURE.md", "exec"), module.__dict__)  # noqa: S102 - our own documentation
    from graphopt.passes import REGISTRY

    monkeypatch.setattr(recipe, "registry", lambda: {**REGISTRY, "clip_weights": module.ClipWeights})
    digits = REPO / "models" / "digits"
    out = tmp_path / "clipped.onnx"
    report = graphopt.optimize(str(digits / "digits.onnx"), out, passes="clip_weights:limit=0.05",
                               data=str(digits / "test.npz"), max_drop=1.0,
                               run=RunOptions(latency=False, progress=False))
    row = next(r for r in report.passes if r.step.startswith("clip_weights"))
    assert row.status == "kept" and row.rows
    gemms = {n.input[1] for n in onnx.load(str(out)).graph.node if n.op_type == "Gemm"}
    weights = [onnx.numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer if t.name in gemms]
    assert weights and all(np.abs(w).max() <= 0.05 + 1e-7 for w in weights)
