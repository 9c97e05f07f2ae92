"""The quantize family: static int8 (QDQ), dynamic int8 and bias correction, and what they share.

Modules, bottom to top (each imports only ones before it): calibrate, intweights, qdq, dynamic, bias, correct,
timing, placement, options, plan, select, passes.
"""

from __future__ import annotations

from graphopt.passes.quantize.correct import MARKER, correct_biases
from graphopt.passes.quantize.intweights import quantize_weight_safe
from graphopt.passes.quantize.options import BiasCorrectOptions, QuantizeDynamicOptions, QuantizeOptions
from graphopt.passes.quantize.passes import BiasCorrect, Quantize, QuantizeDynamic
from graphopt.passes.quantize.plan import already_quantized
from graphopt.passes.quantize.qdq import emit_weights_only

__all__ = ["MARKER", "BiasCorrect", "BiasCorrectOptions", "Quantize", "QuantizeDynamic", "QuantizeDynamicOptions",
           "QuantizeOptions", "already_quantized", "correct_biases", "emit_weights_only", "quantize_weight_safe"]
