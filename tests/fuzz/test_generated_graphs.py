"""Generated graphs through every pass (issue 15): a valid random model (strategies.py) and a pass with
generated options (sometimes after another pass) go through ``graphopt.optimize`` from a file, with random
calibration data or none; runner.py states and checks the invariants, in a worker process (isolation.py).

A broken invariant fails the test with its FINDING, unless it is a known finding awaiting its fix (known.py,
reproduced in test_found.py): that is only counted (``--hypothesis-show-statistics`` lists the events).

The default run takes a few derandomized examples; ``pytest -m fuzz`` takes GRAPHOPT_FUZZ_EXAMPLES (500)."""

from __future__ import annotations

import os
from typing import Any, Iterator

import onnx
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from graphopt.recipe import resolve_recipe
from tests.fuzz.isolation import Worker
from tests.fuzz.known import known_finding
from tests.fuzz.runner import Case
from tests.fuzz.strategies import models, pass_steps

DEFAULT_EXAMPLES = 60  # the default suite: about 30 s on a 2-core machine
LONG_EXAMPLES = int(os.environ.get("GRAPHOPT_FUZZ_EXAMPLES", "500"))


class Finding(AssertionError):
    """An invariant broken by graphopt (not by the strategy)."""


@st.composite
def cases(draw: Any) -> Case:
    model, steps = draw(models()), draw(pass_steps())
    needs = any(s.pass_cls.needs_data(s.options) for s in resolve_recipe([{n: o} for n, o in steps])[0])
    return Case(model, steps, needs or draw(st.booleans()), draw(st.integers(0, 2**16)))


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    w = Worker()
    yield w
    w.close()


def check(worker: Worker, case: Case) -> None:
    """Run the case in the worker; fail on a new finding, count a known one."""
    note(case.model.describe())
    note(onnx.printer.to_text(case.model.proto))
    note(f"passes {case.recipe}, {'with data' if case.with_data else 'synthetic inputs'}")
    outcome = worker.run(case)
    for name in outcome.events:
        event(name)
    for text in outcome.notes:
        note(text)
    if outcome.finding is None:
        return
    known = known_finding(outcome.finding)
    if known is None:
        raise Finding(f"FINDING: {outcome.finding}")
    event(f"known finding: {known}")


COMMON = dict(deadline=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])


@settings(max_examples=DEFAULT_EXAMPLES, derandomize=True, **COMMON)
@given(case=cases())
def test_generated_graphs(worker: Worker, case: Case) -> None:
    check(worker, case)


@pytest.mark.fuzz
@settings(max_examples=LONG_EXAMPLES, **COMMON)
@given(case=cases())
def test_generated_graphs_long(worker: Worker, case: Case) -> None:
    check(worker, case)


def test_every_registered_pass_is_generated():
    """A new pass joins the generated runs: it needs an entry (its options) in strategies.OPTIONS."""
    from graphopt.passes import REGISTRY
    from tests.fuzz.strategies import OPTIONS

    assert set(REGISTRY) <= set(OPTIONS), sorted(set(REGISTRY) - set(OPTIONS))
