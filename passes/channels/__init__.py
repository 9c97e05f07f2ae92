"""channel_prune as one package: structured pruning of whole channels with every coupled tensor.

Modules, bottom to top (each imports only those above it in this list):
- :mod:`types` — the data model: channel states (``Chan``/``Seg``), atoms, slots, links, groups;
- :mod:`state` — ``Analysis``, the record the walk fills in (union-find of atoms, slots, fixups, constraints);
- :mod:`units` — removal units under grouped-conv / channel-shuffle constraints;
- :mod:`targets` — Reshape targets: where each entry comes from (constant or shape read), rewriting them;
- :mod:`ops` — per-op channel rules (Conv/Gemm/MatMul, elementwise joins, Concat, Split, Slice, Reshape, …);
- :mod:`heads` — attention rules: head split/merge Reshapes, Transpose, score MatMuls, Softmax, Shape;
- :mod:`packed` — Q, K and V from one projection: the [.., 3, H, d] Reshape and the parts picked from it;
- :mod:`fused` — com.microsoft MultiHeadAttention (what fuse writes): heads as units, bias and num_heads follow;
- :mod:`deps` — the dependency analysis: walks the graph through the op rules and builds the groups;
- :mod:`importance` — one class per criterion (l1, l2, bn, activation, reconstruction) scoring a group;
- :mod:`select` — widths in channels and the units that reach them (knapsack);
- :mod:`rewrite` — slices every coupled tensor, fixes attributes, compensates consumer biases;
- :mod:`repair` — channel means and ridge refits of the consumer layers on calibration data;
- :mod:`plan` — how many channels each group loses (scope layer, global or sensitivity);
- :mod:`prune` — the pass, :class:`ChannelPrune`, running these as named steps.
"""

from __future__ import annotations

from graphopt.passes.channels.deps import analyze
from graphopt.passes.channels.importance import Importance, criterion, group_scores
from graphopt.passes.channels.prune import ChannelPrune
from graphopt.passes.channels.select import legal_keep
from graphopt.passes.channels.types import Group

__all__ = ["ChannelPrune", "Group", "Importance", "analyze", "criterion", "group_scores", "legal_keep"]
