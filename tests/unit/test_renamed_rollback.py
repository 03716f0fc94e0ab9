"""Review of issue 13: "a defined answer for every state x event, including renamed steps".

The core now refuses a pending attempt of a step the deployed definition lacks, and an
operator retry of a failed compensation it lacks ("deploy the definition the saga started
with"). Rollback does neither: `_rollback_from` walks the deployed steps and compensates
those whose name is in `completed_steps`, so a completed step renamed by a deploy is passed
over and the saga ends COMPENSATED with that step's effect still in place and no audit row
or error saying so (the same before this change).
"""

from __future__ import annotations

from datetime import UTC, datetime

from saga_worker.core.definition import Remote, SagaDefinition, Step
from saga_worker.core.events import StartRequested, StepFailed, StepSucceeded
from saga_worker.core.model import Direction, SagaState
from saga_worker.core.transition import start, transition

NOW = datetime(2026, 1, 1, tzinfo=UTC)
FWD, COMP = Direction.FORWARD, Direction.COMPENSATE


def _order(*names: str) -> SagaDefinition:
    return SagaDefinition(
        "order",
        [
            Step(n, Remote(f"svc.{n}", "svc"), compensate=Remote(f"svc.{n}.undo", "svc"))
            for n in names
        ],
    )


def test_a_completed_step_renamed_by_a_deploy_is_not_silently_left_uncompensated() -> None:
    started_with = _order("charge", "reserve", "ship")
    deployed = _order("charge_card", "reserve", "ship")  # "charge" renamed in a deploy
    saga = start(started_with, StartRequested("o-1", "order", {}), NOW).saga
    saga = transition(started_with, saga, StepSucceeded(0, FWD, 1, {}), NOW).saga
    saga = transition(started_with, saga, StepSucceeded(1, FWD, 1, {}), NOW).saga
    # The deploy happens; "ship" then fails for good and the rollback runs on `deployed`.
    failed = StepFailed(2, FWD, 1, "Boom", "no truck", retryable=False)
    saga = transition(deployed, saga, failed, NOW).saga
    decision = transition(deployed, saga, StepSucceeded(1, COMP, 1, {}), NOW)
    saga = decision.saga
    assert "charge" in saga.completed_steps
    # The charge was never refunded: the saga must not claim a complete rollback.
    assert not (saga.state is SagaState.COMPENSATED and "charge" not in saga.compensated_steps), (
        saga.state,
        saga.compensated_steps,
        [e.event_type for e in decision.audit],
    )
