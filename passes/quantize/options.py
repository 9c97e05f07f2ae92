"""The options of the quantize family's three passes: quantize (static), quantize_dynamic and bias_correct."""

from __future__ import annotations

import dataclasses

from graphopt.options import BaseOptions, option


@dataclasses.dataclass(frozen=True)
class QuantizeOptions(BaseOptions):
    calibration: str = option("minmax", "how activation ranges are chosen",
                              choices=("minmax", "percentile", "entropy", "mse"))
    percentile: float = option(99.999, "percentile kept by calibration=percentile", low=50.0, high=100.0)
    activation_type: str = option("auto", "activation integer type; auto: uint8, and with target=latency int8 "
                                  "too where the whole model measures faster", choices=("auto", "uint8", "int8"))
    per_channel: bool = option(True, "one weight scale per output channel (false: per tensor)")
    target: str = option("latency", "latency: int8 only where measured faster than float on this machine, never "
                         "a slower model; size: every op that can be int8", choices=("latency", "size"))
    dynamic: str = option("auto", "MatMul/Gemm/LSTM in dynamic int8: auto (where measured fastest; LSTM always), "
                          "on (every MatMul/Gemm/LSTM), off (static QDQ only)", choices=("auto", "on", "off"))
    latency_budget_s: float = option(90.0, "seconds spent timing ops and the whole model (target=latency)", low=0.0)
    sensitivity_budget_s: float = option(120.0, "seconds spent measuring each op's accuracy effect", low=0.0)
    sensitivity_samples: int = option(16, "calibration samples per single-op sensitivity measurement", low=1)
    budget_samples: int = option(16, "calibration samples for each check of a whole selection against max_drop",
                                 low=1)
    bias_correction: bool = option(True, "correct each int8 layer's per-channel output mean shift (vs float) in "
                                   "its bias; the accuracy budget's checks see the corrected model")
    correction_samples: int = option(32, "calibration samples bias correction measures on (the budget's checks: "
                                     "a quarter of them, at least 4)", low=1)
    min_snr_db: float = option(30.0, "the accuracy budget when the gate metric is snr (no score output)")
    exclude_nodes: list[str] = option([], "node names kept float")
    exclude_ops: list[str] = option([], "op types kept float")
    quantize_outputs: bool = option(False, "also put Q/DQ on the model's outputs")
    concat_ratio: float = option(16.0, "a Concat whose input ranges differ more than this factor stays float",
                                 low=1.0)
    calib_samples: int = option(512, "calibration samples used at most", low=1)


@dataclasses.dataclass(frozen=True)
class QuantizeDynamicOptions(BaseOptions):
    per_channel: bool = option(True, "one weight scale per output column (MatMul/Gemm)")
    target: str = option("latency", "latency: only what is measured faster than float; size: every candidate",
                         choices=("latency", "size"))
    exclude_nodes: list[str] = option([], "node names kept float")
    exclude_ops: list[str] = option([], "op types kept float (MatMul, Gemm, LSTM)")
    latency_budget_s: float = option(60.0, "seconds spent timing candidates and the whole model", low=0.0)


@dataclasses.dataclass(frozen=True)
class BiasCorrectOptions(BaseOptions):
    samples: int = option(32, "calibration samples the per-channel means are measured on", low=1)
    waves: int = option(0, "0: one layer per capture run, in graph order (Nagel's sequential order); N: layers "
                        "corrected in N consecutive groups, one run each (cheaper, but a group over-corrects: "
                        "each layer's shift also holds its group's upstream shifts; on PP-OCRv4 rec 8 groups "
                        "took line accuracy 0.88 -> 0.12)", low=0)
    max_rel_error: float = option(0.5, "a layer whose quantized output differs from the teacher's tensor of the "
                                  "same name by more than this (mean |q-f| / mean |f|) is left alone", low=0.0)
