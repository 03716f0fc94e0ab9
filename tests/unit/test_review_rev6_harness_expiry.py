"""Review of issue 14, item 6: the testing harness and message expiry."""

from __future__ import annotations

from typing import Any

from saga_worker.core.definition import SagaDefinition, Step
from saga_worker.testing import SagaTestHarness

# -- 1. the testing harness runs a copy a worker would discard ------------------------------


def _noted(call: Any) -> dict[str, Any]:
    return {"ran_at_attempt": call.attempt}


ONE_STEP = SagaDefinition("review_expiry", [Step("only", _noted, timeout_seconds=10)])


def test_harness_does_not_run_a_copy_past_its_start_by() -> None:
    """docs/testing.md: "A local step runs in your test process as a worker's step task runs
    it". A worker discards a step message received after its `expires` (the start-by time);
    the harness delivers the stale first copy (earliest not_before first) and runs the step
    with it 11 s after the copy expired (and after its deadline), while the re-sent copy is
    then skipped."""
    h = SagaTestHarness(ONE_STEP)  # grace 30 s: start-by = send + 30 s, deadline + 10 s
    h.start({})
    h.advance_clock(41)  # the first copy sat in the queue past its start-by and deadline
    assert h.recover().recovered == 1
    run = h.run_next()
    start_by = run.attempt.command.start_by
    assert start_by is not None
    late = h.clock() > start_by
    assert not (run.ran and late), (
        f"the harness ran a copy {(h.clock() - start_by).total_seconds():.0f}s past its "
        "start-by; a worker discards it (Celery expires) and runs the re-sent copy instead"
    )
