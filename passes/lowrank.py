"""lowrank: factorize Gemm/MatMul and Conv layers into thinner ones, per layer or under one global MACs budget.

- Gemm/MatMul (and 1×1 Conv): W ≈ A·B by truncated SVD → MatMul(x, A) then the original node with B (bias,
  Gemm transB/alpha/beta kept on the second factor; 1×1 conv: two 1×1 convs, geometry on the first).
- k×k Conv (groups=1): ``basis`` (r k×k filters C→r, then a 1×1 r→N: the SVD of W as [N, C·k·k]),
  ``spatial`` (k×1 conv C→r then 1×k r→N; strides/pads/dilations split per axis), ``tucker`` (Tucker-2 by
  HOSVD: 1×1 C→r_in, k×k r_in→r_out, 1×1 r_out→N). The factor with the kernel carries the conv's geometry;
  ``svd`` on a k×k conv means ``basis``. ``auto`` picks per layer by MACs saved at the chosen rank/error.
- Rank: fixed ``rank``; ``energy`` (relative squared error ≤ 1 - energy); ``ratio`` of MACs or params kept per
  layer; or ``macs``: one global budget (fraction of the factorizable MACs kept), spread greedily over the
  lower convex hulls of every layer's (MACs, error) candidates: the cheapest error per MAC saved goes first.
  The error proxy is the singular-value tail (relative, squared), whitened when data-aware.
- ``data_aware``: with calibration data, SVD of Lᵀ·W (Σ = L Lᵀ the layer's input covariance from
  graphopt.capture.layer_moments, im2col rows for convs), unwhitened; the bias absorbs the mean shift. That is
  the svd/basis schemes; spatial/tucker stay weight-based (bias re-fit only), so ``auto`` with data uses
  svd/basis. Layers inside If/Loop bodies or wider than ``max_whiten_dim`` inputs stay weight-based.
A layer is rewritten only when it saves at least ``min_saving`` of its MACs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np
import onnx_ir as ir

from graphopt.linear import LinearLayer, as_linear
from graphopt.options import BaseOptions, option
from graphopt.passbase import GraphoptPass, GraphoptResult
from graphopt.passes.lowrank_factor import Curve, Factorizer, Geometry, Whitener, pareto
from graphopt.graphs import all_graphs, all_nodes
from graphopt.weights import constant_array, encoding_of, set_initializer

DEFAULT_ENERGY = 0.98
_CONV_GEOMETRY = ("kernel_shape", "strides", "dilations", "pads", "auto_pad", "group")
# Which factor carries the conv geometry: full = all of it, unit = 1×1 stride 1, rows/cols = one axis only.
_PLACES = {"svd": ("full", "unit"), "basis": ("full", "unit"), "spatial": ("rows", "cols"),
           "tucker": ("unit", "full", "unit")}


@dataclasses.dataclass(frozen=True)
class Choice:
    scheme: str
    ranks: tuple[int, ...]
    macs: int
    params: int
    err2: float


def _choices(curve: Curve, idx: np.ndarray) -> list[Choice]:
    return [Choice(curve.scheme, tuple(int(r) for r in curve.ranks[i]), int(curve.macs[i]), int(curve.params[i]),
                   float(curve.err2[i])) for i in idx]


def allocate(layers: list[list[Choice]], base_macs: list[int], keep: float) -> list[Choice | None]:
    """One global budget: keep Σ MACs ≤ keep·Σ base_macs with the least summed error proxy (greedy on hulls).

    Each layer's candidates with the original (MACs base, error 0) form a lower convex hull in (MACs saved,
    error); hull segments of all layers are taken cheapest error-per-MAC-saved first. The last segment is cut
    short: that layer takes its least-error candidate that still meets the budget."""
    need = (1.0 - keep) * sum(base_macs)
    segments = []
    hulls: list[list[tuple[int, float, Choice | None]]] = []
    for l, (options, base) in enumerate(zip(layers, base_macs)):
        points = sorted([(0, 0.0, None)] + [(base - c.macs, c.err2, c) for c in options], key=lambda p: (p[0], p[1]))
        hull: list[tuple[int, float, Choice | None]] = []
        for p in points:
            while len(hull) >= 2 and ((hull[-1][0] - hull[-2][0]) * (p[1] - hull[-2][1])
                                      - (hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0])) <= 0:
                hull.pop()
            if not hull or p[0] > hull[-1][0]:
                hull.append(p)
        hulls.append(hull)
        for i in range(1, len(hull)):
            segments.append(((hull[i][1] - hull[i - 1][1]) / (hull[i][0] - hull[i - 1][0]), l, i))
    pos = [0] * len(layers)
    saved = 0.0
    chosen: list[Choice | None] = [None] * len(layers)
    for _, l, i in sorted(segments):
        if saved >= need:
            break
        if i != pos[l] + 1:  # ties in rate can list a later segment first; hull order wins
            continue
        before = hulls[l][pos[l]][0]
        pos[l] = i
        saved += hulls[l][i][0] - before
        chosen[l] = hulls[l][i][2]
        if saved > need:  # cut short: least error among this layer's candidates that still meet the budget
            floor = hulls[l][i][0] - (saved - need)
            fits = [c for c in layers[l] if base_macs[l] - c.macs >= floor - 1e-9]
            chosen[l] = min(fits, key=lambda c: (c.err2, c.macs))
            saved += (base_macs[l] - chosen[l].macs) - hulls[l][i][0]
    return chosen


def _dims(value: ir.Value, shapes: dict) -> tuple[int, ...] | None:
    dims = shapes.get(value.name)
    if dims is None and value.shape is not None:
        dims = tuple(d if isinstance(d, int) else None for d in value.shape)
    return dims if dims is not None and all(isinstance(d, int) for d in dims) else None


def geometry(layer: LinearLayer, shapes: dict) -> tuple[Geometry, bool]:
    """The layer's cost geometry (batch as inferred: 1 when symbolic) and whether its shapes were known."""
    out = _dims(layer.node.outputs[0], shapes)
    if layer.kind != "conv":
        rows = math.prod(out[:-1]) if out else 1
        return Geometry(layer.kind, layer.d_in, layer.d_out, rows=max(rows, 1)), out is not None
    x = _dims(layer.input, shapes)
    nsp = len(layer.kernel)
    known = x is not None and out is not None
    in_sp, out_sp = (tuple(x[2:]), tuple(out[2:])) if known else ((1,) * nsp, (1,) * nsp)
    batch = out[0] if known else 1
    return Geometry("conv", layer.d_in, layer.d_out, layer.kernel, in_sp, out_sp,
                    max(batch * math.prod(out_sp), 1), batch), known


def _conv_attrs(layer: LinearLayer, kernel: tuple[int, ...], place: str) -> list[ir.Attr]:
    nsp = len(kernel)
    strides, dilations, pads, auto = list(layer.strides), list(layer.dilations), list(layer.pads), layer.auto_pad
    if place == "unit":
        strides, dilations, pads, auto = [1] * nsp, [1] * nsp, [0] * (2 * nsp), "NOTSET"
    elif place in ("rows", "cols"):
        axis = 0 if place == "rows" else 1
        strides = [s if i == axis else 1 for i, s in enumerate(strides)]
        dilations = [d if i == axis else 1 for i, d in enumerate(dilations)]
        pads = [p if i % nsp == axis else 0 for i, p in enumerate(pads)]
    attrs = [ir.AttrInt64s("kernel_shape", list(kernel)), ir.AttrInt64s("strides", strides),
             ir.AttrInt64s("dilations", dilations), ir.AttrInt64("group", 1)]
    attrs.append(ir.AttrInt64s("pads", pads) if auto == "NOTSET" else ir.AttrString("auto_pad", auto))
    return attrs


class LowRank(GraphoptPass):
    """Low-rank factorization of Gemm/MatMul/Conv weights (SVD, spatial, Tucker-2, basis filters)."""

    name = "lowrank"
    summary = "low-rank factorization: Gemm/MatMul SVD, Conv spatial/tucker/basis; per-layer or global MACs budget"

    @dataclasses.dataclass(frozen=True)
    class Options(BaseOptions):
        scheme: Literal["auto", "svd", "spatial", "tucker", "basis"] = option(
            "auto", "k×k conv factorization (Gemm/MatMul/1×1 conv always use svd; svd on k×k = basis); auto: "
            "per layer, most MACs saved at the chosen rank/error", choices=("auto", "svd", "spatial", "tucker", "basis"))
        rank: int | None = option(None, "fixed rank per layer (tucker: on both modes)", low=1)
        energy: float | None = option(None, f"keep this fraction of the (whitened) spectrum's energy: relative "
                                            f"squared error ≤ 1 - energy (default {DEFAULT_ENERGY} when no rank "
                                            "option is given)", low=0.0, high=1.0, low_open=True)
        ratio: float | None = option(None, "per layer: keep at most this fraction of its MACs (or params, see "
                                           "ratio_of), least error", low=0.0, high=1.0, low_open=True, high_open=True)
        ratio_of: Literal["macs", "params"] = option("macs", "what ratio counts", choices=("macs", "params"))
        macs: float | None = option(None, "global budget: fraction of the factorizable layers' MACs to keep, spread "
                                          "over layers by the error each rank costs", low=0.0, high=1.0,
                                    low_open=True, high_open=True)
        data_aware: bool = option(False, "minimize each layer's output error on calibration data (needs --calib)")
        min_saving: float = option(0.1, "rewrite a layer only if it saves at least this fraction of its MACs "
                                        "(negative: layers may grow, for exactness checks)",
                                   low=-100.0, high=1.0, high_open=True)
        min_size: int = option(4096, "layers with fewer weight elements are left alone", low=0)
        skip_nodes: list[str] = option([], "node or weight names never factorized")
        max_samples: int = option(64, "calibration samples for the input statistics (data_aware)", low=1)
        max_rows: int = option(100_000, "im2col rows kept per layer for the statistics (data_aware)", low=1)
        max_whiten_dim: int = option(4608, "layers with more inputs (C·k·k) than this stay weight-based", low=1)
        damping: float = option(1e-5, "relative ridge on the input covariance before its Cholesky", low=0.0)

        def check(self) -> None:
            given = [n for n in ("rank", "energy", "ratio", "macs") if getattr(self, n) is not None]
            if len(given) > 1:
                raise ValueError(f"give one of rank, energy, ratio, macs (got {', '.join(given)})")

    @classmethod
    def needs_data(cls, options) -> str | None:
        return "data_aware fits each layer's output on calibration activations" if options.data_aware else None

    def accepts_slower(self) -> bool:
        return self.options.ratio_of == "params"  # a parameter budget: the user asked for size

    def call(self, model: ir.Model) -> GraphoptResult:
        from graphopt.costs import infer_shapes
        from graphopt.data import feed_shapes

        opts = self.options
        notes: list[str] = []
        layers = self._layers(model, notes)
        try:
            shapes = infer_shapes(model, feed_shapes(model, self.context.calib))
        except Exception as err:  # noqa: BLE001 - costs fall back to per-row counts
            shapes, _ = {}, notes.append(f"shape inference failed ({err}); MACs counted per output row")
        whiteners = self._whiteners(model, layers, notes) if opts.data_aware else {}
        plans = []
        for layer in layers:
            geom, known = geometry(layer, shapes)
            if not known and geom.kind == "conv":
                notes.append(f"{layer.name}: conv shapes unknown; MACs counted per output position")
            fz = Factorizer(geom, layer.matrix(), layer.bias_vector(), whiteners.get(layer.name))
            schemes = geom.schemes(opts.scheme)
            if fz.white is not None and opts.scheme == "auto":
                schemes = [s for s in schemes if fz.data_aware(s)]
            plans.append((layer, geom, fz, schemes))
        chosen = self._plan(plans, notes)
        rows = []
        names = {v.name for g in all_graphs(model) for n in g for v in n.outputs if v.name}
        left = 0
        for (layer, geom, fz, _), choice in zip(plans, chosen):
            if choice is None or choice.macs > (1.0 - opts.min_saving) * geom.macs:
                left += 1
                continue
            weights, w_hat = fz.factors(choice.scheme, choice.ranks)
            err, space = fz.report_error(w_hat)
            row = {"layer": layer.name, "op": layer.node.op_type, "scheme": choice.scheme,
                   "rank": choice.ranks[0] if len(choice.ranks) == 1 else list(choice.ranks),
                   "full_rank": list(fz.full_rank(choice.scheme)),
                   "params_before": geom.params, "params_after": choice.params,
                   "macs_before": geom.macs, "macs_after": choice.macs,
                   "rel_error": round(err, 6), "error_space": space, "data_aware": fz.data_aware(choice.scheme)}
            self._rewrite(layer, choice.scheme, weights, fz.bias_correction(w_hat), names)
            rows.append(row)
        if left:
            saving = f"no rank meeting the options saves {opts.min_saving:.0%} of their MACs"
            if opts.macs is not None:
                saving = f"the budget was met without them, or {saving}"
            notes.append(f"{left} layer(s) left alone: {saving}")
        if rows:
            before, after = sum(r["macs_before"] for r in rows), sum(r["macs_after"] for r in rows)
            total = sum(geom.macs for _, geom, _, _ in plans)
            notes.append(f"{len(rows)} layer(s) factorized: their MACs {before:,} -> {after:,}; factorizable MACs "
                         f"kept {(total - before + after) / max(total, 1):.1%}")
        return self.result(model, rows, notes)

    # --- analysis ----------------------------------------------------------------------------------------
    def _layers(self, model: ir.Model, notes: list[str]) -> list[LinearLayer]:
        opts = self.options
        found, small = [], 0
        for node in all_nodes(model):
            if node.op_type not in ("Gemm", "MatMul", "Conv") or (node.name or "") in opts.skip_nodes:
                continue
            layer = as_linear(node)
            if layer is None:
                form = encoding_of(node.inputs[1]) if len(node.inputs) > 1 else None
                if form is not None:
                    notes.append(f"{node.name}: weight already in a compressed form ({form}); skipped")
                elif node.op_type == "Conv" and node.inputs[1] is not None and node.inputs[1].is_initializer():
                    notes.append(f"{node.name}: grouped conv weight; not factorized")
                continue
            if layer.weight.name in opts.skip_nodes:
                continue
            if layer.d_in * layer.d_out < opts.min_size:
                small += 1
                continue
            found.append(layer)
        if small:
            notes.append(f"{small} layer(s) below min_size weight elements left alone")
        return found

    def _whiteners(self, model: ir.Model, layers: list[LinearLayer], notes: list[str]) -> dict[str, Whitener]:
        from graphopt.capture import layer_moments

        opts = self.options
        calib = self.context.require_calib(self.name)
        main = [l for l in layers if l.node.graph is model.graph and l.d_in <= opts.max_whiten_dim]
        if len(main) < len(layers):
            notes.append(f"{len(layers) - len(main)} layer(s) inside subgraphs or wider than max_whiten_dim inputs: "
                         "weight-based")
        if not main:
            return {}
        moments = layer_moments(model, main, calib, threads=self.context.threads, max_samples=opts.max_samples,
                                max_rows=opts.max_rows, progress=self.context.progress)
        return {name: Whitener(m, opts.damping) for name, m in moments.items()}

    def _plan(self, plans: list, notes: list[str]) -> list[Choice | None]:
        opts = self.options
        if opts.macs is not None:
            options = []
            for _, geom, fz, schemes in plans:
                limit = (1.0 - opts.min_saving) * geom.macs
                layer_options: list[Choice] = []
                for scheme in schemes:
                    curve = fz.curve(scheme)
                    layer_options += _choices(curve, pareto(curve, limit))
                options.append(layer_options)
            chosen = allocate(options, [g.macs for _, g, _, _ in plans], opts.macs)
            total = sum(g.macs for _, g, _, _ in plans)
            kept = sum(c.macs if c else g.macs for c, (_, g, _, _) in zip(chosen, plans))
            if kept > opts.macs * total * (1 + 1e-9):
                notes.append(f"macs budget {opts.macs:g} not reachable: kept {kept / max(total, 1):.1%}")
            return chosen
        energy = opts.energy
        if energy is None and opts.rank is None and opts.ratio is None:
            energy = DEFAULT_ENERGY
        return [self._choose(fz, geom, schemes, energy) for _, geom, fz, schemes in plans]

    def _choose(self, fz: Factorizer, geom: Geometry, schemes: list[str], energy: float | None) -> Choice | None:
        """Per layer: the best candidate of each scheme, then the best scheme (most MACs saved; ratio: least error)."""
        opts = self.options
        best: list[Choice] = []
        for scheme in schemes:
            if opts.rank is not None:
                best += _choices(fz.point(scheme, opts.rank), np.array([0]))
                continue
            curve = fz.curve(scheme)
            if opts.ratio is not None:
                cost = curve.macs / geom.macs if opts.ratio_of == "macs" else curve.params / geom.params
                idx = np.flatnonzero(cost <= opts.ratio + 1e-12)
                key = np.lexsort((curve.macs[idx], curve.err2[idx]))
            else:
                idx = np.flatnonzero(curve.err2 <= (1.0 - energy) + 1e-12)
                key = np.lexsort((curve.err2[idx], curve.macs[idx]))
            best += _choices(curve, idx[key[:1]])
        if not best:
            return None
        if opts.ratio is not None:
            return min(best, key=lambda c: (c.err2, c.macs))
        return min(best, key=lambda c: (c.macs, c.err2))

    # --- rewriting ---------------------------------------------------------------------------------------
    def _fresh(self, names: set[str], hint: str) -> str:
        name, i = hint, 0
        while name in names:
            i += 1
            name = f"{hint}_{i}"
        names.add(name)
        return name

    def _rewrite(self, layer: LinearLayer, scheme: str, weights: list[np.ndarray], bias: np.ndarray | None,
                 names: set[str]) -> None:
        node, graph = layer.node, layer.node.graph
        dtype = constant_array(layer.weight).dtype
        base = node.name or node.outputs[0].name or node.op_type
        x, new_nodes = node.inputs[0], []
        places = _PLACES[scheme]
        for i, w in enumerate(weights[:-1]):
            w_value = set_initializer(graph, f"{layer.weight.name}_lowrank{i}", w.astype(dtype))
            if layer.kind == "conv":
                factor = ir.Node("", "Conv", [x, w_value], _conv_attrs(layer, w.shape[2:], places[i]),
                                 name=f"{base}_lowrank{i}")
            else:
                factor = ir.Node("", "MatMul", [x, w_value], name=f"{base}_lowrank{i}")
            x = factor.outputs[0]
            x.name = self._fresh(names, f"{base}_lowrank{i}_out")
            x.type = ir.TensorType(ir.DataType.from_numpy(dtype))
            new_nodes.append(self.mark(factor))
        graph.insert_before(node, new_nodes)
        node.replace_input_with(0, x)
        self.mark(node)
        if layer.kind != "conv":  # the original Gemm/MatMul becomes the second factor (bias, alpha/beta folded)
            layer.set_matrix(weights[-1], bias)
            return
        old = [v for v in node.inputs[1:]]
        node.replace_input_with(1, set_initializer(graph, f"{layer.weight.name}_lowrank{len(weights) - 1}",
                                                   weights[-1].astype(dtype)))
        for key in _CONV_GEOMETRY:
            node.attributes.pop(key, None)
        for attr in _conv_attrs(layer, weights[-1].shape[2:], places[-1]):
            node.attributes[attr.name] = attr
        if bias is not None:
            b_dtype = constant_array(layer.bias).dtype if layer.bias is not None else dtype
            if len(node.inputs) < 3:
                node.resize_inputs(3)
            node.replace_input_with(2, set_initializer(graph, f"{layer.weight.name}_lowrank_bias", bias.astype(b_dtype)))
        for value in old:  # drop replaced initializers nothing else uses
            if (value is not None and not value.uses() and not value.is_graph_output() and value.graph is not None
                    and value.graph.initializers.get(value.name) is value):
                value.graph.initializers.pop(value.name)
