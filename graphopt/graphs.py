"""What every pass asks of an onnx_ir graph: attributes, every graph and node (subgraphs too), the default domain
and its opset, unique node names, inferred shapes, and the axis of a layer's input that holds its channels.

One helper for each, so the opset lookup has one default and the domain test one spelling.
"""

from __future__ import annotations

import collections
import logging
from typing import Iterator

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

DEFAULT_DOMAINS = ("", "ai.onnx")


def attr(node: ir.Node, name: str, default):
    """The value of a node attribute, or ``default`` when it is absent."""
    found = node.attributes.get(name)
    return default if found is None else found.value


def all_graphs(model: ir.Model) -> list[ir.Graph]:
    """The main graph and every subgraph (If/Loop/Scan bodies), outermost first."""
    return [model.graph, *model.graph.subgraphs()]


def all_nodes(model: ir.Model) -> Iterator[ir.Node]:
    for graph in all_graphs(model):
        yield from list(graph)


def is_default_domain(node: ir.Node) -> bool:
    """The node is an ONNX standard op (not com.microsoft or another custom domain)."""
    return node.domain in DEFAULT_DOMAINS


def default_opset(model: ir.Model | ir.Graph, fallback: int | None = None) -> int | None:
    """The default-domain opset a model (or graph) imports, else ``fallback``."""
    for domain in DEFAULT_DOMAINS:
        if domain in model.opset_imports:
            return model.opset_imports[domain]
    return fallback


def name_nodes(model: ir.Model) -> tuple[int, int]:
    """Give unnamed nodes a name and rename duplicates, unique over the whole model; (named, renamed)."""
    nodes = list(all_nodes(model))
    taken = collections.Counter(n.name for n in nodes if n.name)
    seen: set[str] = set()
    counters: collections.Counter[str] = collections.Counter()
    named = renamed = 0
    for node in nodes:
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = node.name or node.op_type
        while True:
            counters[base] += 1
            candidate = f"{base}_{counters[base]}"
            if candidate not in taken and candidate not in seen:
                break
        if node.name:
            renamed += 1
        else:
            named += 1
        node.name = candidate
        seen.add(candidate)
    return named, renamed



def input_channel_axis(node: ir.Node, weight_index: int = 1) -> int:
    """Axis of a layer's activation input that meets the weight's input channels: Conv/ConvTranspose 1, Gemm 1
    (0 with transA), MatMul the last (x @ W), or the rows (-2) when the weight is the first input (W @ x)."""
    op = node.op_type
    if op in ("Conv", "ConvTranspose"):
        return 1
    if op == "Gemm":
        return 0 if int(attr(node, "transA", 0)) else 1
    return -1 if weight_index == 1 else -2


class _Failures(logging.Handler):
    """Collects the warning ShapeInferencePass logs when onnx's inference fails (it never raises)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        err = record.exc_info[1] if record.exc_info else None
        self.messages.append(" ".join(str(err or record.getMessage()).split())[:300])


def infer_shapes(model: ir.Model) -> str | None:
    """Strict shape inference, else partial; returns a note when strict inference failed."""
    logger = logging.getLogger("onnx_ir.passes.common.shape_inference")
    catcher = _Failures()
    saved = logger.level, logger.propagate
    logger.addHandler(catcher)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    try:
        ShapeInferencePass(strict_mode=True)(model)
        if not catcher.messages:
            return None
        first = catcher.messages[0]
        catcher.messages.clear()
        ShapeInferencePass(strict_mode=False)(model)
        partial = "partial shapes kept" if not catcher.messages else "model left without inferred shapes"
        return f"shape inference failed ({partial}): {first}"
    finally:
        logger.removeHandler(catcher)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
