"""onnxruntime's fused attention in the channel analysis: com.microsoft MultiHeadAttention, as fuse writes it
(separate 3-D Q, K, V — projections, or Slices of one packed projection — an optional packed bias
[Q | K | V], a mask or attention bias that carries no channels).

Head h is channels h·d ... + d of Q and of K and h·dv ... + dv of V, and the output [.., H·dv] is V's channels
head by head. One tie per head makes it one removal unit; the bias is sliced with them; ``num_heads`` follows
(a fixup). Other input layouts (packed QKV in ``query``, past key/value) block the channels, with the reason.
"""

from __future__ import annotations

import onnx_ir as ir

from graphopt.graphs import attr as _attr
from graphopt.passes.channels.state import Analysis
from graphopt.passes.channels.types import Chan, const_array, label


def multihead(an: Analysis, node: ir.Node, ins: list[Chan | None]) -> None:
    q, k, v = (list(ins) + [None] * 3)[:3]
    heads = int(_attr(node, "num_heads", 0))
    why = _unsupported(an, node, ins, q, k, v, heads)
    if why is not None:
        for c in ins:
            an.block(c, f"MultiHeadAttention {label(node)!r}: {why}")
        return
    assert q is not None and k is not None and v is not None
    d, dv = q.total // heads, v.total // heads
    qe, ke, ve = q.elements(), k.elements(), v.elements()
    an.ties.extend(qe[h * d:(h + 1) * d] + ke[h * d:(h + 1) * d] + ve[h * dv:(h + 1) * dv] for h in range(heads))
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        an.link(node, 3, 0, Chan([*q.segs, *k.segs, *v.segs], -1), "member")
    an.fixups[node] = {"kind": "heads", "value": node.inputs[0], "unit": d}
    an.follow(Chan(q.segs, -1), node)
    an.set_state(node.outputs[0], Chan(list(v.segs), -1))


def _unsupported(an: Analysis, node: ir.Node, ins: list[Chan | None], q: Chan | None, k: Chan | None,
                 v: Chan | None, heads: int) -> str | None:
    """Why the channels cannot follow the op's heads, or None."""
    if q is None or k is None or v is None:
        return "Q, K and V are not three tracked 3-D inputs (packed QKV, or one of them carries no channels)"
    if any(c is not None for c in ins[3:]):
        return "an input after Q, K, V carries channels"
    if any(c.axis != -1 or c.block != 1 or c.per != 1 for c in (q, k, v)):
        return "Q, K or V carries its channels on another axis than the last"
    if any(len(an.dims(node.inputs[i]) or ()) != 3 for i in range(3)):
        return "Q, K or V is not known to be of rank 3"
    if heads < 1 or q.total != k.total or q.total % heads or v.total % heads:
        return f"{q.total}, {k.total}, {v.total} channels do not split into num_heads={heads}"
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        bias = const_array(node.inputs[3])
        if bias is None or bias.ndim != 1 or bias.size != q.total + k.total + v.total:
            return "its bias is not a constant [Q | K | V] vector"
    if any(o is not None and (o.uses() or o.is_graph_output()) for o in node.outputs[1:]):
        return "its present key/value outputs are read"
    return None
