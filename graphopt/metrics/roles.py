"""What each model output is, so the gate judges it by a rule that means something: class scores (arg-max
agreement, accuracy with labels), features (embeddings, hidden states: cosine similarity) or other values
(worst-channel SNR). Read from the nodes that produce the output and from the reference outputs, never from names.

An output of rank 2 or 3 ([N, C] or [N, T, C], float, C > 1) is walked back through ops that keep its meaning
(Identity, Cast, Reshape, Squeeze, a bias Add or scale Mul, pooling over positions, a mask Mul, a count Div):
- class scores: a Softmax/LogSoftmax over the last axis, a Sigmoid, or a linear head (MatMul/Gemm/Conv with a
  constant weight); else rows that are probabilities (non-negative, summing to 1);
- features: a layer normalization (LayerNormalization, a spelled-out one, L2 normalization), a residual Add (one
  operand an ancestor of the other), a Tanh pooler — embeddings and hidden states, whose arg-max over features
  means nothing;
- with no evidence either way, class scores as before (the shape is all there is to go on), and said so.
Maps (rank 4) and narrow outputs are values (worst-channel SNR) unless ``--score-output`` names them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from graphopt.costs import is_constant

__all__ = ["FEATURES", "SCORES", "VALUES", "OutputRole", "graph_evidence", "output_roles", "rule_of",
           "score_output_of"]

SCORES, FEATURES, VALUES = "class scores", "features", "values"

_KEEP_MEANING = {"Identity", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Dropout", "DequantizeLinear",
                 "QuantizeLinear"}
_POOLING = {"ReduceMean", "ReduceMax", "ReduceSum", "GlobalAveragePool", "GlobalMaxPool", "Gather", "Slice"}
_NORMS = {"LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization", "RMSNormalization",
          "SkipSimplifiedLayerNormalization", "LpNormalization", "BatchNormalization"}
_NORM_DIVISORS = {"Sqrt", "ReduceL2", "ReduceSumSquare", "LpNormalization", "Pow", "Reciprocal"}
_LINEAR = {"MatMul", "Gemm", "Conv", "FusedMatMul", "FusedConv", "QGemm", "MatMulInteger", "QLinearMatMul",
           "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits", "QLinearConv", "ConvInteger"}
_COMPUTE = _LINEAR | {"ConvTranspose", "Einsum", "Attention", "MultiHeadAttention"}
_DEPTH = 64  # ops walked back from an output at most


@dataclasses.dataclass(frozen=True)
class OutputRole:
    name: str
    role: str  # SCORES | FEATURES | VALUES
    why: str  # one short phrase
    guessed: bool = False  # class scores by shape alone: no head, normalization or probabilities found


def _constant(value: ir.Value | None, memo: dict) -> bool:
    return value is None or is_constant(value, memo.setdefault("constant", {}))


def _computed(value: ir.Value | None, memo: dict) -> bool:
    """Whether a MatMul/Gemm/Conv-like op lies upstream: a mask or a token count has none."""
    if value is None or _constant(value, memo):
        return False
    computed = memo.setdefault("computed", {})
    if id(value) not in computed:
        computed[id(value)] = False  # cycles in malformed graphs
        producer = value.producer()
        computed[id(value)] = producer is not None and (producer.op_type in _COMPUTE or any(
            _computed(v, memo) for v in producer.inputs))
    return computed[id(value)]


def _ancestor(candidate: ir.Value, of: ir.Value, limit: int = 20000) -> bool:
    """Whether ``candidate`` feeds ``of`` (a residual: x + f(x))."""
    seen, stack = set(), [of]
    while stack and len(seen) < limit:
        value = stack.pop()
        if value is candidate:
            return True
        producer = value.producer()
        if producer is None or id(producer) in seen:
            continue
        seen.add(id(producer))
        stack.extend(v for v in producer.inputs if v is not None)
    return False


def _is_norm_divisor(value: ir.Value | None) -> bool:
    for _ in range(6):  # through eps Add/Clip/Max/Expand/Unsqueeze/Cast to the Sqrt or norm
        producer = value.producer() if value is not None else None
        if producer is None:
            return False
        if producer.op_type in _NORM_DIVISORS:
            return True
        value = producer.inputs[0] if producer.inputs else None
    return False


def _last_axis(node: ir.Node, default: int) -> bool:
    attr = node.attributes.get("axis")
    axis = attr.as_int() if attr is not None else default
    rank = node.inputs[0].shape.rank() if node.inputs[0] is not None and node.inputs[0].shape is not None else None
    return axis == -1 or (rank is not None and axis == rank - 1) or (rank is None and axis > 0)


def _walk(value: ir.Value, memo: dict, opset: int) -> tuple[str, str] | None:
    """(role, why) from the ops producing ``value``; None when they say nothing."""
    for _ in range(_DEPTH):
        node = value.producer()
        if node is None:
            return None
        op, inputs = node.op_type, [v for v in node.inputs]
        if op in ("Softmax", "LogSoftmax"):
            return (SCORES, f"{op.lower()} probabilities") if _last_axis(node, -1 if opset >= 13 else 1) else None
        if op == "Sigmoid":
            return SCORES, "sigmoid probabilities"
        if op in _NORMS:
            return FEATURES, f"a {op} output: hidden states or embeddings"
        if op == "Tanh":
            return FEATURES, "a Tanh output: a pooler's features"
        weight = 3 if op in ("QLinearMatMul", "QGemm", "QLinearConv") else 1
        if op in _LINEAR and len(inputs) > weight and not _constant(inputs[0], memo) \
                and _constant(inputs[weight], memo):
            return SCORES, f"a linear head ({op} with a constant weight)"
        if op == "Div" and len(inputs) == 2 and _is_norm_divisor(inputs[1]):
            return FEATURES, "divided by a norm: normalized features"
        if op in ("Add", "Sub", "Mul", "Div") and len(inputs) == 2:
            a, b = inputs
            if _constant(b, memo) or (op in ("Mul", "Div") and not _computed(b, memo)):
                value = a  # a bias, a scale, a mask, a token count
                continue
            if op in ("Add", "Mul") and (_constant(a, memo) or (op == "Mul" and not _computed(a, memo))):
                value = b
                continue
            if op == "Add" and (_ancestor(a, b) or _ancestor(b, a)):
                return FEATURES, "a residual Add: hidden states"
            return None
        if op in _KEEP_MEANING or op in _POOLING:
            if not inputs or inputs[0] is None:
                return None
            value = inputs[0]
            continue
        return None
    return None


def graph_evidence(model: Any) -> dict[str, tuple[str, str]] | None:
    """Output name -> (role, why) from the graph of ``model`` (an ir.Model, ModelProto or path; None for an
    onnxruntime session or a model that cannot be read): the part of :func:`output_roles` that needs the graph."""
    try:
        if isinstance(model, (str, os.PathLike)):
            model = onnx.load(str(model), load_external_data=False)
        if isinstance(model, onnx.ModelProto):
            model = ir.serde.deserialize_model(model)
        if not isinstance(model, ir.Model):
            return None
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        memo: dict = {}
        found = {}
        for value in model.graph.outputs:
            evidence = _walk(value, memo, opset)
            if evidence is not None:
                found[value.name] = evidence
        return found
    except Exception:  # noqa: BLE001 - an unreadable graph: roles from the reference outputs alone
        return None


def _probabilities(ref: np.ndarray) -> bool:
    rows = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    return bool(rows.size) and bool(np.all(rows >= -1e-6)) and bool(np.all(np.abs(rows.sum(-1) - 1.0) <= 1e-3))


def output_roles(names: Sequence[str], refs: Sequence[Any], evidence: dict[str, tuple[str, str]] | None,
                 score_output: str | None = None) -> list[OutputRole]:
    """Each output's role from ``evidence`` (:func:`graph_evidence`) and one feed of reference outputs."""
    roles = []
    for name, ref in zip(names, refs):
        ref = np.asarray(ref)
        if name == score_output:
            roles.append(OutputRole(name, SCORES, "named by --score-output"))
        elif ref.dtype.kind != "f":
            roles.append(OutputRole(name, VALUES, f"{ref.dtype} values: compared exactly"))
        elif ref.ndim == 4:
            roles.append(OutputRole(name, VALUES, "a map (--score-output gates one per pixel)"))
        elif ref.ndim not in (2, 3) or ref.shape[-1] <= 1:
            shape = f"rank {ref.ndim}" if ref.ndim not in (2, 3) else "one value a row"
            roles.append(OutputRole(name, VALUES, f"{shape}: not class scores"))
        elif evidence and name in evidence:
            roles.append(OutputRole(name, *evidence[name]))
        elif _probabilities(ref):
            roles.append(OutputRole(name, SCORES, "rows sum to 1: probabilities"))
        else:
            why = "shaped like class scores; no graph to read" if evidence is None else \
                "shaped like class scores; no head, normalization or probabilities found"
            roles.append(OutputRole(name, SCORES, why, guessed=True))
    return roles


def score_output_of(roles: Sequence[OutputRole]) -> str | None:
    """The output agreement is measured on: the first class-score output found in the graph or the data, else the
    first taken for one by its shape."""
    scores = [r for r in roles if r.role == SCORES]
    return min(scores, key=lambda r: r.guessed).name if scores else None


def rule_of(role: OutputRole, metric: str, score_output: str | None, cosine_outputs: set[str],
            min_snr: float | None) -> str:
    """How the gate ``metric`` judges this output: the metric itself, the worst-channel SNR floor, or not at all
    (``cosine_outputs``: the outputs the cosine metric is taken over, Comparison.cosine_outputs)."""
    if metric == "task":
        return "your metric function (the whole model)"
    if (metric in ("accuracy", "agreement") and role.name == score_output) or (
            metric == "cosine" and role.name in cosine_outputs):
        return metric
    if metric == "snr" or min_snr is not None:
        return "worst-channel SNR" + (f" >= {min_snr:g} dB" if min_snr is not None else "")
    return "not gated"
