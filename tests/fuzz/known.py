"""Findings of the generated-graph run whose fix has not landed: each is reproduced by an xfail(strict=True)
test in ``test_found.py``. The fuzz test notes a failure matching one of these (a hypothesis event) instead of
failing, so the suite stays green until the fix lands; when a fix lands, its strict xfail turns into a failure:
then delete the xfail mark and the entry here, and the fuzz run guards the fix from then on."""

from __future__ import annotations

import re

# name (the regression test in test_found.py) -> regex over the failure message the fuzz test writes
KNOWN: dict[str, str] = {
    "test_cleanup_keeps_branch_identity_of_an_outer_value":
        r"'cleanup[^']*' rolled back: onnx checker: .*Graph output '[^']*' is not an output of any node"
        r"|'cleanup[^']*' failed: ValueError: Value .* is already an output of a different graph",
    "test_quantize_keeps_onnxruntime_alive_with_a_float_slice_into_an_if":
        r"the process died \(signal SIGABRT\) running .*'quantize.*NodeArg",
    "test_a_passthrough_output_keeps_the_input_shape":
        r"a valid model refused: (input '[^']*' has dynamic dim|reference model failed on evaluation feed 0: "
        r".*Got invalid dimensions)",
}


def known_finding(message: str) -> str | None:
    """The name of the known finding ``message`` matches, or None."""
    return next((name for name, pattern in KNOWN.items() if re.search(pattern, message)), None)
