"""Fixtures shared by several test files (plain helper functions live in tests/helpers.py)."""

from __future__ import annotations

from typing import Callable

import pytest

from graphopt import recipe
from graphopt.passbase import GraphoptPass
from graphopt.passes import REGISTRY


@pytest.fixture
def register_passes(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """``register_passes(*classes)``: the recipe grammar (API and CLI) also knows these passes, by their ``name``,
    for this test only."""
    def register(*classes: type[GraphoptPass]) -> None:
        fake = {**REGISTRY, **{cls.name: cls for cls in classes}}
        monkeypatch.setattr(recipe, "registry", lambda: fake)
    return register
