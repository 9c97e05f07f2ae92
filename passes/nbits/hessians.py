"""The inputs' second moments H = XᵀX that GPTQ weighs errors by, one per distinct layer input.

Layers reading the same activation (an attention block's Q, K and V projections) share one H. Rows are the
input's leading dimensions flattened (batch × sequence), accumulated in float64 one calibration feed at a time
(:func:`graphopt.capture.stream`), so memory stays at one K×K matrix per input.
"""

from __future__ import annotations

import numpy as np

from graphopt import capture
from graphopt.errors import DataError
from graphopt.passbase import PassContext


def input_hessians(context: PassContext, model, inputs: dict[str, int], max_samples: int,
                   pass_name: str) -> dict[str, tuple[np.ndarray, int]]:
    """Input value name → (XᵀX [K, K], rows seen), for main-graph values of width ``inputs[name]``."""
    data = context.require_calib(pass_name)
    sums = {name: np.zeros((k, k)) for name, k in inputs.items()}
    rows = dict.fromkeys(inputs, 0)
    for acts in capture.stream(model, list(inputs), data, context.threads, max_samples, context.progress):
        for name, k in inputs.items():
            x = np.asarray(acts[name])
            if x.shape[-1:] != (k,):
                raise DataError(f"layer input {name!r} has shape {x.shape}, expected a last axis of {k}")
            x = x.reshape(-1, k).astype(np.float64)
            sums[name] += x.T @ x
            rows[name] += x.shape[0]
    return {name: (sums[name], rows[name]) for name in inputs}
