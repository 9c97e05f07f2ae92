"""fuse: spelled-out activations and norms → the single ops onnxruntime has kernels for; Conv+Mul/Add folding.

Exporters often write HardSwish as x * Clip(x + 3, 0, 6) / 6 (PP-OCRv4 rec spends 37% of its time there),
and PP-LCNet's learnable affine blocks leave a Conv followed by Mul/Add by constants that onnxruntime does
not fold. Families (option ``only``/``skip``):

- ``hardswish``  → HardSwish (opset ≥ 14); below 14 see ``hardswish_below_14``
- ``hardsigmoid``→ HardSigmoid (Relu6(x + 3) / 6, Clip(a·x + b, 0, 1))
- ``silu``       → Swish (opset ≥ 24) or com.microsoft QuickGelu (``contrib_ops``)
- ``gelu``       → Gelu (opset ≥ 20) or com.microsoft Gelu (``contrib_ops``)
- ``mish``       → Mish (opset ≥ 18)
- ``layernorm``  → LayerNormalization (opset ≥ 17)
- ``conv_affine``→ Conv whose only consumer is Mul/Add/Sub/Div by a per-channel constant: folded into W, b

Defaults come from bench/fuse_bench.py on the PP-OCR models (1 thread): see ``DEFAULT_FAMILIES``.
Matching lives in :mod:`graphopt.passes.fuse_patterns`; this module checks and rewrites.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir

from graphopt.options import BaseOptions, option
from graphopt.passbase import GraphoptPass, GraphoptResult
from graphopt.graphs import default_opset, is_default_domain
from graphopt.proto_handoff import ensure_opset
from graphopt.passes.fuse_patterns import MATCHERS, Match, const
from graphopt.graphs import all_graphs
from graphopt.weights import constant_array, encoding_of, owned_initializer, replace_initializer, set_initializer

FAMILIES = (*MATCHERS, "conv_affine")
# Measured on PP-OCRv4 det/rec and PP-OCR mobile cls, 1 thread, median of 50 interleaved runs
# (bench/fuse_bench.py; latency ratio vs the canonicalized original, lower is faster):
# - hardswish: det 0.95, rec 0.92, cls 0.71 (as x*HardSigmoid(x) at opset 13). Upgrading to opset 14 for a
#   HardSwish op was no faster (det 1.01, rec 0.95, cls 0.72), hence hardswish_below_14="hardsigmoid".
# - conv_affine: det 0.93 (28 sites), rec 0.95 (28); all defaults: det 0.83, rec 0.82, cls 0.71.
# - silu: off. onnxruntime already fuses x*Sigmoid(x) into com.microsoft QuickGelu (rec, 7 sites: 0.99,
#   noise), so ours only adds a com.microsoft dependency.
# - layernorm (rec at opset 17: 1.00), gelu and mish (synthetic: 1.00): neutral, exact, standard ops: on.
DEFAULT_FAMILIES = ("hardswish", "hardsigmoid", "gelu", "mish", "layernorm", "conv_affine")
MIN_OPSET = {"HardSwish": 14, "HardSigmoid": 6, "Swish": 24, "Gelu": 20, "Mish": 18, "LayerNormalization": 17}
CONTRIB = {"Swish": "QuickGelu", "Gelu": "Gelu"}  # com.microsoft ops onnxruntime has for older opsets
MS_DOMAIN = "com.microsoft"


class Fuse(GraphoptPass):
    """Fuse spelled-out HardSwish/HardSigmoid/SiLU/GELU/Mish/LayerNorm and fold Conv+Mul/Add constants."""

    name = "fuse"
    summary = "fuse spelled-out activations/LayerNorm into single ops; fold Conv+Mul/Add constants into the conv"
    exact = True

    @dataclasses.dataclass(frozen=True)
    class Options(BaseOptions):
        only: list[str] = option([], "run only these fusion families (empty: the measured defaults)",
                                 choices=FAMILIES)
        skip: list[str] = option([], "fusion families not to run", choices=FAMILIES)
        hardswish_below_14: Literal["hardsigmoid", "upgrade", "skip"] = option(
            "hardsigmoid", "opset < 14 has no HardSwish: write x*HardSigmoid(x), upgrade the opset to 14, or skip",
            choices=("hardsigmoid", "upgrade", "skip"))
        contrib_ops: bool = option(False, "allow com.microsoft ops (QuickGelu, Gelu) where the opset lacks the op")

    def families(self) -> list[str]:
        chosen = self.options.only or list(DEFAULT_FAMILIES)
        return [f for f in FAMILIES if f in chosen and f not in self.options.skip]

    def call(self, model: ir.Model) -> GraphoptResult:
        rows: list[dict] = []
        notes: list[str] = []
        families = self.families()
        if "hardswish" in families and self.options.hardswish_below_14 == "upgrade" and _needs_upgrade(model):
            converted = ensure_opset(model, 14)
            if converted:
                rows.append({"family": "hardswish", "change": "opset", "from": converted[0], "to": converted[1]})
        opset = default_opset(model) or 0
        skipped: dict[str, str] = {}
        for family in families:
            if family == "conv_affine":
                for graph in all_graphs(model):
                    rows += self._fold_conv_affine(graph, notes)
                continue
            for graph in all_graphs(model):
                # Last nodes first: the largest form wins (LayerNorm with its gamma/beta, not without).
                for node in reversed(list(graph)):
                    if node.graph is not graph:  # removed by an earlier rewrite
                        continue
                    match = MATCHERS[family](node)
                    if match is None or not _self_contained(graph, match):
                        continue
                    plan = self._emit(model, match, opset)
                    if isinstance(plan, str):
                        skipped[family] = plan
                        continue
                    rows.append(self._rewrite(graph, match, plan))
        notes += [f"{family}: sites left unfused: {why}" for family, why in skipped.items()]
        if any(r.get("op") == "HardSigmoid+Mul" for r in rows):
            notes.append(f"hardswish: opset {opset} < 14, written as x*HardSigmoid(x) "
                         "(hardswish_below_14=upgrade raises the opset for a HardSwish op)")
        return self.result(model, rows, notes)

    # ------------------------------------------------------------ activations

    def _emit(self, model: ir.Model, match: Match, opset: int) -> list[tuple[str, str, dict]] | str:
        """The (op_type, domain, attributes) chain that replaces the match, or why it cannot be written."""
        op = match.op_type
        if opset >= MIN_OPSET[op]:
            attrs = match.attributes if op != "Swish" or match.attributes.get("alpha") != 1.0 else {}
            return [(op, "", attrs)]
        if op == "HardSwish" and self.options.hardswish_below_14 == "hardsigmoid":
            # Mul(x, HardSigmoid(x)); the chain's last op takes (x, previous output).
            return [("HardSigmoid", "", {"alpha": 1 / 6, "beta": 0.5}), ("Mul", "", {})]
        if op in CONTRIB and self.options.contrib_ops:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            return [(CONTRIB[op], MS_DOMAIN, match.attributes)]
        hint = " (or set contrib_ops)" if op in CONTRIB else ""
        return f"{op} needs opset {MIN_OPSET[op]}, the model has {opset}{hint}"

    def _rewrite(self, graph: ir.Graph, match: Match, plan: list[tuple[str, str, dict]]) -> dict:
        root = match.root
        inputs = list(match.inputs)
        for slot, hint, array in match.new_constants:
            inputs[slot] = set_initializer(graph, f"{root.name or match.family}_{hint}", array)
        while inputs and inputs[-1] is None:
            inputs.pop()
        new_nodes: list[ir.Node] = []
        for i, (op_type, domain, attrs) in enumerate(plan):
            node_inputs = inputs if i == 0 else [inputs[0], new_nodes[-1].outputs[0]]
            node = ir.node(op_type, node_inputs, attrs, domain=domain,
                           name=f"{root.name}_fused{i}" if root.name else None)
            if i < len(plan) - 1 and root.name:
                node.outputs[0].name = f"{root.name}_fused{i}_out"
            new_nodes.append(self.mark(node))
        ir.convenience.replace_nodes_and_values(graph, root, match.nodes, new_nodes,
                                                [root.outputs[0]], [new_nodes[-1].outputs[0]])
        return {"family": match.family, "node": new_nodes[-1].name,
                "op": "+".join(f"{d + '.' if d else ''}{o}" for o, d, _ in plan),
                "replaced": [n.op_type for n in match.nodes]}

    # ------------------------------------------------------------ Conv + per-channel Mul/Add

    def _fold_conv_affine(self, graph: ir.Graph, notes: list[str]) -> list[dict]:
        rows = []
        for conv in list(graph):
            if conv.op_type != "Conv" or not is_default_domain(conv):
                continue
            folded = []
            while (op := self._fold_one(graph, conv, notes)) is not None:
                folded.append(op)
            if folded:
                rows.append({"family": "conv_affine", "node": conv.name, "op": "Conv",
                             "replaced": ["Conv", *folded]})
        return rows

    def _fold_one(self, graph: ir.Graph, conv: ir.Node, notes: list[str]) -> str | None:
        """Fold the conv's single Mul/Add/Sub/Div-by-constant consumer into W and b; its op type, or None."""
        out = conv.outputs[0]
        uses = list(out.uses())
        if out.is_graph_output() or len(uses) != 1:
            return None
        user = uses[0].node
        if user.graph is not graph or not is_default_domain(user) or len(user.inputs) != 2:
            return None
        if user.op_type in ("Mul", "Add"):
            other = user.inputs[1 - uses[0].idx]
        elif user.op_type in ("Sub", "Div") and uses[0].idx == 0:
            other = user.inputs[1]
        else:
            return None
        weight = conv.inputs[1]
        w = constant_array(weight)
        c = const(other) if other is not out else None
        if w is None or c is None or not np.issubdtype(w.dtype, np.floating) or c.dtype != w.dtype:
            return None
        if encoding_of(weight) is not None:
            notes.append(f"conv_affine: {conv.name}: weight is {encoding_of(weight)}-encoded; left alone")
            return None
        vec = _per_channel(c, w.ndim, w.shape[0])
        bias = conv.inputs[2] if len(conv.inputs) > 2 else None
        b = constant_array(bias) if bias is not None else np.zeros(w.shape[0], dtype=w.dtype)
        if vec is None or b is None or (user.op_type == "Div" and not np.all(vec)):
            return None
        column = vec.reshape(-1, *[1] * (w.ndim - 1))
        if user.op_type == "Mul":
            w, b = w * column, b * vec
        elif user.op_type == "Div":
            w, b = w / column, b / vec
        else:
            b = b + vec if user.op_type == "Add" else b - vec
        scaled = user.op_type in ("Mul", "Div")
        if scaled:
            _set_input(graph, conv, 1, w.astype(c.dtype))
        if not scaled or bias is not None:
            _set_input(graph, conv, 2, b.astype(c.dtype))
        result = user.outputs[0]
        name = result.name
        result.replace_all_uses_with(out, replace_graph_outputs=True)
        graph.remove(user, safe=True)
        if out.is_graph_output():
            out.name = name  # the model's output keeps its name
        self.mark(conv)
        return user.op_type


def _per_channel(c: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """The (channels,) vector of a constant that varies along the conv output's axis 1 only, else None."""
    if c.ndim > rank:
        return None
    shape = (1,) * (rank - c.ndim) + tuple(c.shape)
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(c.reshape(shape[1]), (channels,)).copy()


def _set_input(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray) -> None:
    """Give the node's input ``index`` new constant contents: in place if only it uses it, else a new one."""
    owned = owned_initializer(node, index)
    if owned is not None:
        replace_initializer(owned, array, keep_marks=True)
        return
    hint = f"{node.name or node.op_type}_{'W' if index == 1 else 'B'}"
    if len(node.inputs) <= index:
        node.resize_inputs(index + 1)
    node.replace_input_with(index, set_initializer(graph, hint, array))


def _self_contained(graph: ir.Graph, match: Match) -> bool:
    """Every node is in this graph once, and only the root's output is seen outside the match."""
    nodes = set(match.nodes)
    if len(nodes) != len(match.nodes) or any(n.graph is not graph for n in nodes):
        return False
    for node in match.nodes[:-1]:
        for value in node.outputs:
            if value.is_graph_output() or any(use.node not in nodes for use in value.uses()):
                return False
    return all(len(n.outputs) == 1 for n in match.nodes)


def _needs_upgrade(model: ir.Model) -> bool:
    """The model is below opset 14 and has a spelled-out HardSwish."""
    if (default_opset(model) or 14) >= 14:
        return False
    return any(MATCHERS["hardswish"](n) is not None for g in all_graphs(model) for n in g)
