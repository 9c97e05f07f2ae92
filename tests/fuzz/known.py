"""Findings of the generated-graph run whose fix has not landed: each is reproduced by an xfail(strict=True)
test in ``test_found.py``. The fuzz test notes a failure matching one of these (a hypothesis event) instead of
failing, so the suite stays green until the fix lands; when a fix lands, its strict xfail turns into a failure:
then delete the xfail mark and the entry here, and the fuzz run guards the fix from then on."""

from __future__ import annotations

import re

# name (the regression test in test_found.py) -> regex over the failure message the fuzz test writes
KNOWN: dict[str, str] = {
}


def known_finding(message: str) -> str | None:
    """The name of the known finding ``message`` matches, or None."""
    return next((name for name, pattern in KNOWN.items() if re.search(pattern, message)), None)
