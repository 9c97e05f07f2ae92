"""How large an integer input may be: an index into a constant table (token ids, token types, positions).

Synthetic data draws integers; an id past the end of the table it indexes makes the model fail in Gather (BERT's
token_type_ids index a 2-row table). The bound is found by following the input through ops that keep its values
(Cast, reshapes) to every Gather that reads it as indices of a constant table: the smallest table's length.
"""

from __future__ import annotations

import onnx_ir as ir

from graphopt.graphs import attr, is_default_domain
from graphopt.weights import constant_tensor

# Ops whose output holds the input's values, rearranged: an index stays an index.
_VALUE_KEEPING = frozenset({"Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Expand", "Transpose",
                            "Slice"})


def index_limit(value: ir.Value) -> int | None:
    """The number of rows of the smallest constant table ``value`` indexes (via value-keeping ops), or None."""
    limits: list[int] = []
    seen: set[int] = set()
    stack = [value]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for use in current.uses():
            node = use.node
            if not is_default_domain(node):
                continue
            if node.op_type == "Gather" and use.idx == 1:
                rows = _table_rows(node)
                if rows is not None:
                    limits.append(rows)
            elif node.op_type in _VALUE_KEEPING and use.idx == 0:
                stack.extend(node.outputs)
    return min(limits) if limits else None


def _table_rows(gather: ir.Node) -> int | None:
    table = constant_tensor(gather.inputs[0])
    if table is None:
        return None
    axis = int(attr(gather, "axis", 0))
    dims = list(table.shape)
    axis = axis + len(dims) if axis < 0 else axis
    return dims[axis] if 0 <= axis < len(dims) and isinstance(dims[axis], int) and dims[axis] > 0 else None
