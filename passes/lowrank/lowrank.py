"""lowrank: factorize Gemm/MatMul and Conv layers into thinner ones, per layer or under one global MACs budget.

- Gemm/MatMul (and 1×1 Conv): W ≈ A·B by truncated SVD → MatMul(x, A) then the original node with B (bias,
  Gemm transB/alpha/beta kept on the second factor; 1×1 conv: two 1×1 convs, geometry on the first).
- k×k Conv (groups=1): ``basis`` (r k×k filters C→r, then a 1×1 r→N: the SVD of W as [N, C·k·k]),
  ``spatial`` (k×1 conv C→r then 1×k r→N; strides/pads/dilations split per axis), ``tucker`` (Tucker-2 by
  HOSVD: 1×1 C→r_in, k×k r_in→r_out, 1×1 r_out→N). The factor with the kernel carries the conv's geometry;
  ``svd`` on a k×k conv means ``basis``. ``auto`` picks per layer by MACs saved at the chosen rank/error.
- Rank: fixed ``rank``; ``energy`` (relative squared error ≤ 1 - energy); ``ratio`` of MACs or params kept per
  layer (``ratio=auto``: each layer's ratio chosen inside the accuracy budget from measured sensitivity,
  :mod:`~graphopt.passes.lowrank.seek`); or ``macs``: one global budget (fraction of the factorizable MACs kept), spread greedily over the
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
from typing import Literal

import onnx_ir as ir

from graphopt.capture import layer_moments
from graphopt.costs import value_dims
from graphopt.data import feed_shapes
from graphopt.graphs import all_graphs, all_nodes
from graphopt.linear import LinearLayer, as_linear
from graphopt.options import BaseOptions, option
from graphopt.passbase import GraphoptPass, GraphoptResult
from graphopt.passes.lowrank.budget import Choice, allocate, choices, choose
from graphopt.passes.lowrank.geometry import Geometry, layer_geometry
from graphopt.passes.lowrank.rewrite import rewrite
from graphopt.passes.lowrank.schemes import Factorizer, Whitener, pareto
from graphopt.passes.lowrank.seek import inside_budget
from graphopt.weights import encoding_of

DEFAULT_ENERGY = 0.98


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
        ratio: float | Literal["auto"] | None = option(
            None, "per layer: keep at most this fraction of its MACs (or params, see ratio_of), least error; or auto: "
                  "each layer's fraction (from levels) chosen inside max_drop (needs --calib)",
            low=0.0, high=1.0, low_open=True, high_open=True)
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
        levels: list[float] = option([0.5, 0.35, 0.25, 0.15, 0.1, 0.06], "fractions kept, measured per layer with "
                                     "ratio=auto", low=0.0, high=1.0, low_open=True, high_open=True)
        time_budget: float = option(120.0, "seconds for the ratio=auto sensitivity measurements", low=0.0,
                                    low_open=True)
        max_samples: int = option(64, "calibration samples for the input statistics (data_aware) and ratio=auto",
                                  low=1)
        max_rows: int = option(100_000, "im2col rows kept per layer for the statistics (data_aware)", low=1)
        max_whiten_dim: int = option(4608, "layers with more inputs (C·k·k) than this stay weight-based", low=1)
        damping: float = option(1e-5, "relative ridge on the input covariance before its Cholesky", low=0.0)

        def check(self) -> None:
            given = [n for n in ("rank", "energy", "ratio", "macs") if getattr(self, n) is not None]
            if len(given) > 1:
                raise ValueError(f"give one of rank, energy, ratio, macs (got {', '.join(given)})")

    @classmethod
    def needs_data(cls, options) -> str | None:
        if options.ratio == "auto":
            return "ratio=auto measures each layer's levels on data"
        return "data_aware fits each layer's output on calibration activations" if options.data_aware else None

    def accepts_slower(self) -> bool:
        return self.options.ratio_of == "params"  # a parameter budget: the user asked for size

    def call(self, model: ir.Model) -> GraphoptResult:
        opts = self.options
        notes: list[str] = []
        plans = self._plans(model, notes)
        chosen = inside_budget(self.context, model, plans, opts, notes) if opts.ratio == "auto" else \
            self._plan(plans, notes)
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
            rewrite(layer, choice.scheme, weights, fz.bias_correction(w_hat), names, self.mark)
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
    def _plans(self, model: ir.Model, notes: list[str]) -> list[tuple[LinearLayer, Geometry, Factorizer, list[str]]]:
        """Every layer to consider with its cost geometry, its factorizer (whitened when data-aware) and schemes."""
        opts = self.options
        layers = self._layers(model, notes)
        try:
            shapes = value_dims(model, feed_shapes(model, self.context.calib))
        except Exception as err:  # noqa: BLE001 - costs fall back to per-row counts
            shapes, _ = {}, notes.append(f"shape inference failed ({err}); MACs counted per output row")
        whiteners = self._whiteners(model, layers, notes) if opts.data_aware else {}
        plans = []
        for layer in layers:
            geom, known = layer_geometry(layer, shapes)
            if not known and geom.kind == "conv":
                notes.append(f"{layer.name}: conv shapes unknown; MACs counted per output position")
            fz = Factorizer(geom, layer.matrix(), layer.bias_vector(), whiteners.get(layer.name))
            schemes = geom.schemes(opts.scheme)
            if fz.white is not None and opts.scheme == "auto":
                schemes = [s for s in schemes if fz.data_aware(s)]
            plans.append((layer, geom, fz, schemes))
        return plans

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
                    layer_options += choices(curve, pareto(curve, limit))
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
        return [choose(fz, geom, schemes, opts, energy) for _, geom, fz, schemes in plans]
