"""Review of issue 13: what the recovery sweep reports for a saga it cannot recover.

A deploy removed (or renamed away) the step a live saga's pending attempt is of. The core
now ignores every event for it (`transition`: "deploy the definition the saga started
with"), and `core/recovery.recovery_outcome` turns any unchanged decision into SKIPPED,
which the sweep documents as "another sweep held or had just recovered" it. The saga is
examined by every sweep, forever, counted as skipped, and nothing above INFO says so.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest

from saga_worker.core.decision import Limits
from saga_worker.core.definition import Remote, SagaDefinition, Step
from saga_worker.core.events import StartRequested, StepSucceeded
from saga_worker.core.model import Direction
from saga_worker.engine import SagaEngine
from saga_worker.recovery import sweep
from saga_worker.testing import FakeClock, InMemoryStore, RecordingDispatcher

TWO = SagaDefinition(
    "shrunk", [Step("one", Remote("r.one", "q")), Step("two", Remote("r.two", "q"))]
)
ONE = SagaDefinition("shrunk", [Step("one", Remote("r.one", "q"))])


def test_a_saga_whose_pending_step_was_removed_is_not_reported_as_skipped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    deployed = {"shrunk": TWO}
    clock = FakeClock()
    store = InMemoryStore()
    engine = SagaEngine(
        store,
        RecordingDispatcher(),
        Limits(),
        clock=clock,
        definitions=lambda saga_type, _version: deployed[saga_type],
    )
    engine.start(StartRequested("s-1", "shrunk", {}))
    engine.handle("s-1", StepSucceeded(0, Direction.FORWARD, 1, {}))
    # The new deploy has no step 1, yet answers for the saga's version (an explicit version=
    # label kept across a change of shape).
    deployed["shrunk"] = ONE
    here = {("shrunk", TWO.version)}
    clock.advance(3600)  # far past the pending attempt's deadline

    with caplog.at_level(logging.INFO):
        first = sweep(store, engine, clock(), local=here)
        second = sweep(store, engine, clock() + timedelta(hours=1), local=here)
    # Not run under the other steps, not reported as a lost race: parked, once, and said so.
    assert (first.examined, first.parked, first.skipped) == (1, 1, 0), first
    assert second.examined == 0  # parked sagas leave the stalled scan
    saga = store.load("s-1")
    assert saga is not None and saga.parked_at is not None
    assert "other steps" in store.audit_trail("s-1")[-1]["event_data"]["reason"]
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING and "s-1" in r.getMessage()]
    assert loud, [r.getMessage() for r in caplog.records]
