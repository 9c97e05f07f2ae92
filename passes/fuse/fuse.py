"""fuse: spelled-out activations and norms → the single ops onnxruntime has kernels for; Conv+Mul/Add folding.

Exporters often write HardSwish as x * Clip(x + 3, 0, 6) / 6 (PP-OCRv4 rec spends 37% of its time there),
and PP-LCNet's learnable affine blocks leave a Conv followed by Mul/Add by constants that onnxruntime does
not fold. Families (option ``only``/``skip``):

- ``hardswish``  → HardSwish (opset ≥ 14); below 14 see ``hardswish_below_14``
- ``hardsigmoid``→ HardSigmoid (Relu6(x + 3) / 6, Clip(a·x + b, 0, 1))
- ``silu``       → Swish (opset ≥ 24) or com.microsoft QuickGelu (``contrib_ops``)
- ``gelu``       → Gelu (opset ≥ 20; tanh form: approximate="tanh") or com.microsoft Gelu/FastGelu
                   (``contrib_ops``)
- ``mish``       → Mish (opset ≥ 18)
- ``layernorm``  → LayerNormalization (opset ≥ 17)
- ``conv_affine``→ Conv whose only consumer is Mul/Add/Sub/Div by a per-channel constant: folded into W, b

Transformer families, com.microsoft ops only (no standard op exists below opset 23; choosing the family is
choosing com.microsoft):

- ``bias_gelu``     → BiasGelu(y, bias) / FastGelu(y, bias): GELU of y + a constant bias along the last axis
- ``skip_layernorm``→ SkipLayerNormalization: LayerNormalization(a + b [+ bias]), the sum kept as output 3
- ``attention``     → MultiHeadAttention: Q/K/V head splits, Q·Kᵀ, scale, mask, Softmax, ·V, head merge
- ``packed_attention`` → the same when Q, K and V are columns of one projection reshaped to [b, s, 3, heads, d]
                   (ViT/SVTR exports): MultiHeadAttention reads them as Slices of it. Off by default (see below)

Defaults come from bench/fuse_bench.py on the PP-OCR models and from the encoder fixtures (1 thread): see
``DEFAULT_FAMILIES``. Matching lives in :mod:`~graphopt.passes.fuse.activations`, :mod:`~graphopt.passes.fuse.gelu`,
:mod:`~graphopt.passes.fuse.layernorm`, :mod:`~graphopt.passes.fuse.skiplayernorm` and
:mod:`~graphopt.passes.fuse.attention`, folding in :mod:`~graphopt.passes.fuse.conv_affine`; this module checks,
rewrites and reports. A candidate site that is
not fused says why (a :class:`~graphopt.passes.fuse.match.Miss`); the near-misses are counted per family and
the commonest reasons noted, e.g. ``hardswish: 2 near-misses left unfused: 2 'Add constant is 2.9, not 3'``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal

import onnx_ir as ir

from graphopt.graphs import all_graphs, default_opset, is_default_domain
from graphopt.options import BaseOptions, option
from graphopt.passbase import GraphoptPass, GraphoptResult
from graphopt.passes.fuse.activations import match_hardsigmoid, match_hardswish, match_mish, match_silu
from graphopt.passes.fuse.attention import match_attention, match_packed_attention
from graphopt.passes.fuse.conv_affine import fold_one
from graphopt.passes.fuse.gelu import match_bias_gelu, match_gelu
from graphopt.passes.fuse.layernorm import match_layernorm
from graphopt.passes.fuse.match import Match, Miss, NearMisses, near
from graphopt.passes.fuse.skiplayernorm import match_skip_layernorm
from graphopt.proto_handoff import ensure_opset
from graphopt.shapes import value_dims
from graphopt.weights import set_initializer

# family name → matcher, in the order the pass runs them (HardSwish before HardSigmoid and bias_gelu before gelu:
# each contains the other; layernorm before skip_layernorm: it makes the LayerNormalization).
MATCHERS: dict[str, Callable[[ir.Node], Match | Miss]] = {
    "hardswish": match_hardswish,
    "hardsigmoid": match_hardsigmoid,
    "silu": match_silu,
    "bias_gelu": match_bias_gelu,
    "gelu": match_gelu,
    "mish": match_mish,
    "layernorm": match_layernorm,
    "skip_layernorm": match_skip_layernorm,
    "attention": match_attention,
    "packed_attention": match_packed_attention,
}
FAMILIES = (*MATCHERS, "conv_affine")
# Measured on PP-OCRv4 det/rec and PP-OCR mobile cls, 1 thread, median of 50 interleaved runs
# (bench/fuse_bench.py; latency ratio vs the canonicalized original, lower is faster):
# - hardswish: det 0.95, rec 0.92, cls 0.71 (as x*HardSigmoid(x) at opset 13). Upgrading to opset 14 for a
#   HardSwish op was no faster (det 1.01, rec 0.95, cls 0.72), hence hardswish_below_14="hardsigmoid".
# - conv_affine: det 0.93 (28 sites), rec 0.95 (28); all defaults: det 0.83, rec 0.82, cls 0.71.
# - silu: off. onnxruntime already fuses x*Sigmoid(x) into com.microsoft QuickGelu (rec, 7 sites: 0.99,
#   noise), so ours only adds a com.microsoft dependency.
# - layernorm (rec at opset 17: 1.00), gelu and mish (synthetic: 1.00): neutral, exact, standard ops: on.
# Transformer encoders, 1 thread, batch 1, on a contended 2-core host (other jobs running): median of paired
# per-round ratios (graphopt.latency) against the canonicalized original, whose own copy measures 0.97-1.00.
# MiniLM-shaped BERT (384 wide, 6 layers, sequence 128) from torch's dynamo / TorchScript exporter, 60 rounds;
# the models/encoders fixtures (BERT ×2 exports, RoBERTa, ViT, Whisper encoder; 64 wide), 200 rounds:
# - attention: 0.971 / 0.980; fixtures 0.88-0.94: on.
# - bias_gelu: 0.995 / 0.995 (onnxruntime fuses BiasGelu itself where its pattern matches); fixtures 0.94-0.98: on.
# - skip_layernorm: 1.008 / 1.060; fixtures 0.97-1.11 (onnxruntime's fp32 SkipLayerNormalization kernel is slower
#   than the Add and LayerNormalization it replaces): off.
# - attention + bias_gelu (the defaults): 0.959 / 0.964; fixtures 0.83-0.93.
# - gelu with contrib_ops (com.microsoft Gelu below opset 20): ~1.00 on both exports: contrib_ops stays off.
# - packed_attention: PP-OCRv4 rec's SVTR neck (8 heads of 15, one qkv MatMul), one block alone, 400 rounds:
#   x1.12 / x1.07 / x1.06 at 40 / 80 / 160 tokens; whole rec model x0.996 (noise ±0.02): off
#   (bench/results/svtr_neck.md).
DEFAULT_FAMILIES = ("hardswish", "hardsigmoid", "bias_gelu", "gelu", "mish", "layernorm", "attention", "conv_affine")
MIN_OPSET = {"HardSwish": 14, "HardSigmoid": 6, "Swish": 24, "Gelu": 20, "Mish": 18, "LayerNormalization": 17}
CONTRIB = {"Swish": "QuickGelu", "Gelu": "Gelu"}  # com.microsoft ops onnxruntime has for older opsets
MS_DOMAIN = "com.microsoft"


class Fuse(GraphoptPass):
    """Fuse spelled-out HardSwish/HardSigmoid/SiLU/GELU/Mish/LayerNorm and transformer blocks (bias+GELU,
    Add+LayerNorm, attention); fold Conv+Mul/Add constants."""

    name = "fuse"
    summary = ("fuse spelled-out activations/LayerNorm and attention into single ops; fold Conv+Mul/Add constants "
               "into the conv")
    exact = True

    @dataclasses.dataclass(frozen=True)
    class Options(BaseOptions):
        only: list[str] = option([], "run only these fusion families (empty: the measured defaults)",
                                 choices=FAMILIES)
        skip: list[str] = option([], "fusion families not to run", choices=FAMILIES)
        hardswish_below_14: Literal["hardsigmoid", "upgrade", "skip"] = option(
            "hardsigmoid", "opset < 14 has no HardSwish: write x*HardSigmoid(x), upgrade the opset to 14, or skip",
            choices=("hardsigmoid", "upgrade", "skip"))
        contrib_ops: bool = option(False, "allow com.microsoft ops (QuickGelu, Gelu, FastGelu) where the opset "
                                          "lacks the op")

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
        misses = NearMisses()
        for family in families:
            annotated = _annotate_ranks(model) if family in ("attention", "packed_attention") else []
            for graph in all_graphs(model):
                if family == "conv_affine":
                    rows += self._fold_conv_affine(graph, notes, misses)
                else:
                    rows += self._fuse_family(model, graph, family, opset, skipped, misses)
            for value in annotated:  # the annotations were for matching only
                value.shape = None
        notes += [f"{family}: sites left unfused: {why}" for family, why in skipped.items()]
        if any(r.get("op") == "HardSigmoid+Mul" for r in rows):
            notes.append(f"hardswish: opset {opset} < 14, written as x*HardSigmoid(x) "
                         "(hardswish_below_14=upgrade raises the opset for a HardSwish op)")
        notes += misses.notes()
        return self.result(model, rows, notes)

    def _fuse_family(self, model: ir.Model, graph: ir.Graph, family: str, opset: int, skipped: dict[str, str],
                     misses: NearMisses) -> list[dict]:
        """Every site of one family in one graph: matched, checked, rewritten; near-misses into ``misses``."""
        rows = []
        # Last nodes first: the largest form wins (LayerNorm with its gamma/beta, not without).
        for node in reversed(list(graph)):
            if node.graph is not graph:  # removed by an earlier rewrite
                continue
            match = MATCHERS[family](node)
            if isinstance(match, Miss):
                misses.add(family, match)
                continue
            leak = _leak(graph, match)
            if leak is not None:
                misses.add(family, near(leak, match.site))
                continue
            if match.domain == MS_DOMAIN:  # no standard op: choosing the family is choosing com.microsoft
                model.opset_imports.setdefault(MS_DOMAIN, 1)
            if match.build is not None:
                rows.append(self._rewrite_built(graph, match))
                continue
            plan = self._emit(model, match, opset)
            if isinstance(plan, str):
                skipped[family] = plan
                continue
            rows.append(self._rewrite(graph, match, plan))
        return rows

    # ------------------------------------------------------------ activations

    def _emit(self, model: ir.Model, match: Match, opset: int) -> list[tuple[str, str, dict]] | str:
        """The (op_type, domain, attributes) chain that replaces the match, or why it cannot be written."""
        op = match.op_type
        if match.domain:
            return [(op, match.domain, match.attributes)]
        if opset >= MIN_OPSET[op]:
            attrs = match.attributes if op != "Swish" or match.attributes.get("alpha") != 1.0 else {}
            return [(op, "", attrs)]
        if op == "HardSwish" and self.options.hardswish_below_14 == "hardsigmoid":
            # Mul(x, HardSigmoid(x)); the chain's last op takes (x, previous output).
            return [("HardSigmoid", "", {"alpha": 1 / 6, "beta": 0.5}), ("Mul", "", {})]
        if op in CONTRIB and self.options.contrib_ops:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            if op == "Gelu" and match.attributes.get("approximate") == "tanh":
                return [("FastGelu", MS_DOMAIN, {})]
            return [(CONTRIB[op], MS_DOMAIN, {} if op == "Gelu" else match.attributes)]
        contrib = "FastGelu" if match.attributes.get("approximate") == "tanh" else CONTRIB.get(op)
        hint = f" (or set contrib_ops for com.microsoft {contrib})" if op in CONTRIB else ""
        return f"{op} needs opset {MIN_OPSET[op]}, the model has {opset}{hint}"

    def _rewrite_built(self, graph: ir.Graph, match: Match) -> dict:
        """Replace a match that builds its own nodes (several nodes, or several outputs read outside)."""
        root = match.root
        new_nodes, new_values = match.build(graph, f"{root.name}_fused" if root.name else None)
        for old, new in zip(match.exposed, new_values):
            new.name = old.name  # shapes are the builder's: a fused value may differ in rank (attention)
            if new.type is None:
                new.type = old.type
        for i, node in enumerate(new_nodes):
            if node.name is None and root.name:
                node.name = f"{root.name}_fused{i}"
            self.mark(node)
        graph.insert_after(root, new_nodes)
        for old, new in zip(match.exposed, new_values):
            old.replace_all_uses_with(new, replace_graph_outputs=True)
        graph.remove(match.nodes, safe=True)
        graph.sort()  # values read outside the match may be read before its root
        main = next(n for n in new_nodes if n.domain == match.domain and n.op_type == match.op_type)
        return {"family": match.family, "node": main.name, "op": f"{match.domain}.{match.op_type}",
                "replaced": [n.op_type for n in match.nodes]}

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

    def _fold_conv_affine(self, graph: ir.Graph, notes: list[str], misses: NearMisses) -> list[dict]:
        rows = []
        for conv in list(graph):
            if conv.op_type != "Conv" or not is_default_domain(conv):
                continue
            folded = []
            while not isinstance(user := fold_one(graph, conv, notes), Miss):
                self.mark(conv)
                folded.append(user.op_type)
            misses.add("conv_affine", user)
            if folded:
                rows.append({"family": "conv_affine", "node": conv.name, "op": "Conv",
                             "replaced": ["Conv", *folded]})
        return rows


def _leak(graph: ir.Graph, match: Match) -> str | None:
    """Why the match cannot be replaced as a whole, or None: every node must be in this graph once, and only the
    root's output (or the match's ``exposed`` values) may be seen outside the match."""
    nodes = set(match.nodes)
    if len(nodes) != len(match.nodes) or any(n.graph is not graph for n in nodes):
        return "a node of the pattern is repeated or in another graph"
    exposed = set(match.exposed)
    for node in match.nodes:
        for value in node.outputs:
            if value in exposed:
                continue
            if value.is_graph_output() or any(use.node not in nodes for use in value.uses()):
                return f"the {node.op_type} output inside the pattern is also used outside it"
    if match.build is None and not all(len(n.outputs) == 1 for n in match.nodes):
        return "a node of the pattern has several outputs"
    return None


def _annotate_ranks(model: ir.Model) -> list[ir.Value]:
    """Give rank-only shapes to the values ONNX inference left without one, from graphopt's own inference at
    default input sizes (it evaluates shape arithmetic): after a Reshape to a computed target (Paddle's exports
    build every one from Cast/Concat) ONNX loses all ranks, and the attention matcher reads ranks. Returns the
    values annotated."""
    missing = [v for g in all_graphs(model) for n in g for v in n.outputs if v.shape is None and v.name]
    if not missing:
        return []
    try:
        dims = value_dims(model)
    except Exception:  # noqa: BLE001 - ranks help the matcher; without them it reports its near-misses
        return []
    annotated = []
    for value in missing:
        found = dims.get(value.name)
        if found is not None:
            value.shape = ir.Shape([None] * len(found))
            annotated.append(value)
    return annotated


def _needs_upgrade(model: ir.Model) -> bool:
    """The model is below opset 14 and has a spelled-out HardSwish."""
    if (default_opset(model) or 14) >= 14:
        return False
    return any(isinstance(MATCHERS["hardswish"](n), Match) for g in all_graphs(model) for n in g)
