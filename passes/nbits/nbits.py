"""nbits: MatMul weights as onnxruntime's com.microsoft.MatMulNBits — block-wise 2/4/8-bit codes that stay packed
in memory and are dequantized inside the kernel (k-means codebooks and DequantizeLinear weights are folded back
to float when the session loads; these are not).

Per layer: round to nearest (``method=rtn``) or GPTQ (``method=gptq``: each input row's rounding error
compensated on the rows after it through the inverse Hessian of the layer's calibration inputs,
:mod:`.gptq`). Which layers: every eligible one (``layers=all``), or the most the run's accuracy budget allows
(``layers=budget``, :mod:`.select`), the rest staying float (or ``fallback_bits`` wide).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir

from graphopt.graphs import name_nodes
from graphopt.options import BaseOptions, option
from graphopt.passbase import GraphoptPass, GraphoptResult
from graphopt.passes.nbits.blocks import BITS, BLOCK_SIZES
from graphopt.passes.nbits.gather import emit_table, find_tables, quantize_table
from graphopt.passes.nbits.hessians import input_hessians
from graphopt.passes.nbits.rewrite import MS_DOMAIN, Site, emit, find_sites
from graphopt.passes.nbits.select import Quantizer, widths
from graphopt.passes.nbits.support import unsupported


class NBits(GraphoptPass):
    """MatMul/Gemm weights → com.microsoft.MatMulNBits with block-wise N-bit weights (RTN or GPTQ)."""

    name = "nbits"
    summary = "MatMul weights to onnxruntime MatMulNBits: block-wise 4-bit (2/8) codes kept packed in memory, " \
              "round-to-nearest or GPTQ, per layer inside the budget"
    size_objective = True  # the aim is memory and file size; the kernel may be slower than float GEMM

    @dataclasses.dataclass(frozen=True)
    class Options(BaseOptions):
        bits: int = option(4, "code width of every chosen layer", choices=BITS)
        block_size: int = option(32, "weights along K sharing one scale (MatMulNBits: a power of two, >= 16)",
                                 choices=BLOCK_SIZES)
        symmetric: bool = option(False, "codes around the kernel's fixed zero point 2^(bits-1), no zero points "
                                 "stored; false: one zero point per block (asymmetric)")
        method: Literal["gptq", "rtn"] = option(
            "gptq", "gptq: rounding errors compensated through the inputs' inverse Hessian (needs --calib); "
                    "rtn: round to nearest", choices=("gptq", "rtn"))
        layers: Literal["budget", "all"] = option(
            "budget", "budget: each layer's width measured, kept inside max_drop (needs --calib); all: every "
                      "eligible layer at bits", choices=("budget", "all"))
        fallback_bits: int = option(0, "layers=budget: a layer that cannot afford bits may take this width "
                                    "(0: it stays float)", choices=(0, *BITS))
        clip_search: bool = option(True, "each block's range shrunk up to 25% where that lowers its squared error")
        damp: float = option(0.01, "gptq: diagonal damping of XᵀX, a fraction of its mean diagonal", low=0.0,
                             low_open=True, high=1.0)
        accuracy_level: int = option(0, "MatMulNBits compute: 0 float activations; 4 int8 activations (faster, "
                                     "less exact)", choices=(0, 1, 4))
        max_samples: int = option(128, "calibration samples the Hessians are accumulated over (gptq)", low=1)
        sensitivity_samples: int = option(8, "calibration samples per layer's sensitivity measurement", low=1)
        budget_samples: int = option(64, "calibration samples per whole-model check of the budget (a few checks: "
                                     "more samples, a truer edge)", low=1)
        time_budget: float = option(300.0, "seconds for the layers=budget sensitivity measurements (the largest "
                                    "layers first; those not reached stay float)", low=0.0, low_open=True)
        min_size: int = option(4096, "weights with fewer elements stay float", low=0)
        exclude_nodes: list[str] = option([], "node or weight names kept float")
        embeddings: bool = option(False, "also Gather tables (embeddings) as com.microsoft.GatherBlockQuantized at "
                                  "bits, rounded to nearest, before the MatMul layers are chosen (the budget "
                                  "measures them on top)")
        embedding_bits: int = option(0, "embeddings=true: the tables' code width (0: bits), e.g. 8-bit tables "
                                     "beside 4-bit MatMuls", choices=(0, *BITS))

        def check(self) -> None:
            width = unsupported(self.bits, self.fallback_bits, self.embedding_bits if self.embeddings else 0)
            if width is not None:
                import onnxruntime

                raise ValueError(f"{width}-bit codes: onnxruntime {onnxruntime.__version__} runs MatMulNBits and "
                                 f"GatherBlockQuantized at 4 and 8 bits only")

    @classmethod
    def needs_data(cls, options) -> str | None:
        if options.method == "gptq":
            return "method=gptq compensates rounding errors on the layers' calibration inputs"
        return "layers=budget measures each layer's effect on data" if options.layers == "budget" else None

    def call(self, model: ir.Model) -> GraphoptResult:
        opts, notes = self.options, []
        name_nodes(model)  # sites are found again by name in clones
        # Tables first: the Hessians, the budget's measurements and its checks then see them quantized.
        table_rows = self._tables(model, notes) if opts.embeddings else []
        sites = find_sites(model, set(opts.exclude_nodes), opts.min_size, notes)
        if not sites:
            return self.result(model, table_rows,
                               notes + ["no MatMul/Gemm with a float32 2-D constant weight to rewrite"])
        hessians = self._hessians(model, sites, notes) if opts.method == "gptq" else {}
        quantizer = Quantizer(opts, hessians)
        chosen = widths(self.context, model, sites, quantizer, notes)
        rows = []
        for site in sites:
            bits = chosen.get(site.layer)
            if bits:
                rows.append(self._rewrite(site, quantizer, bits))
        if rows:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            before = sum(r["bytes_before"] for r in rows)
            after = sum(r["bytes_after"] for r in rows)
            notes.append(f"{len(rows)} of {len(sites)} layer(s) to MatMulNBits: weights {before} -> {after} bytes "
                         f"({before / after:.1f}x)")
        return self.result(model, table_rows + rows, notes)

    def _tables(self, model: ir.Model, notes: list[str]) -> list[dict]:
        opts = self.options
        bits = opts.embedding_bits or opts.bits
        tables = find_tables(model, set(opts.exclude_nodes), opts.min_size, opts.block_size, bits, notes)
        rows = [emit_table(t, quantize_table(t, bits, opts.block_size, opts.symmetric, opts.clip_search),
                           self.mark) for t in tables]
        if rows:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            before, after = sum(r["bytes_before"] for r in rows), sum(r["bytes_after"] for r in rows)
            notes.append(f"{len(rows)} Gather table(s) to GatherBlockQuantized: {before} -> {after} bytes "
                         f"({before / after:.1f}x)")
        return rows

    def _hessians(self, model: ir.Model, sites: list[Site], notes: list[str]) -> dict[str, np.ndarray]:
        main = {s.node.inputs[0].name: s.k for s in sites if s.node.graph is model.graph}
        if len(main) < len({s.node.inputs[0].name for s in sites}):
            notes.append("layers inside If/Loop bodies are rounded to nearest (their inputs cannot be captured)")
        found = input_hessians(self.context, model, main, self.options.max_samples, self.name)
        return {name: h for name, (h, rows) in found.items() if rows}

    def _rewrite(self, site: Site, quantizer: Quantizer, bits: int) -> dict:
        quant = quantizer.quants[site.layer, bits]
        w = site.array.astype(np.float64)
        row = {"layer": site.layer, "op": site.node.op_type, "weight": site.weight.name, "K": site.k, "N": site.n,
               "bits": bits, "block_size": quant.block_size, "method": quantizer.methods[site.layer],
               "bytes_before": int(site.array.nbytes), "bytes_after": int(quant.nbytes()),
               "rel_error": round(float(np.linalg.norm(quant.dequantize() - w) / max(np.linalg.norm(w), 1e-30)), 5)}
        if (site.layer, bits) in quantizer.output_errors:
            row["output_rel_error"] = round(quantizer.output_errors[site.layer, bits], 5)
        emit(site, quant, self.options.accuracy_level, self.mark)
        return row
