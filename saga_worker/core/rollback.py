"""How a saga rolls back: which completed steps are compensated, in which order, and how
it ends (COMPENSATED, ABORTED or FAILED). Shared by every transition that turns a saga back."""

from __future__ import annotations

from typing import Any

from .builder import Builder
from .definition import Step
from .model import Attempt, Direction, SagaState


def cancel_held(b: Builder) -> int | None:
    """Drop the forward attempts that wait in the database (retries not yet sent, waits):
    they must not start once the saga rolls back. Each that may have taken effect (an
    earlier attempt of its run did) is compensated too. Returns one cancelled leaf."""
    cancelled: int | None = None
    for attempt in b.saga.attempts:
        if attempt.held and attempt.direction is Direction.FORWARD:
            b.settle(attempt.step_index)
            step = b.definition.steps[attempt.step_index]
            if compensates_itself(step, attempt.uncertain):
                b.update(undo=(*b.saga.undo, step.name))
            cancelled = attempt.step_index
    return cancelled


def begin_rollback(b: Builder, index: int, *, completed: bool) -> None:
    """Roll back once the forward stage of leaf `index` has nothing left in flight.

    A group's rollback starts at its last branch (each completed one is compensated, in
    reverse listed order); a step's at itself when it completed or must undo itself.
    """
    if b.definition.stage_of(index).kind == "parallel":
        rollback_from(b, b.definition.stage_of(index).leaves[-1])
    elif completed or b.definition.steps[index].name in b.saga.undo:
        rollback_from(b, index)
    else:
        rollback_from(b, index - 1)


def compensates_itself(step: Step, outcome_unknown: bool) -> bool:
    """Whether a step that failed for good is compensated too, before the completed ones.

    It may have taken effect when its outcome is unknown (an attempt timed out, stalled or
    lost its worker), or, when the step says so, after any failure. Its compensation must
    then be safe to run when the action never took effect (docs/recovery.md).
    """
    return step.compensate is not None and (outcome_unknown or step.compensate_on_failure)


def is_rerun(attempt: Attempt) -> bool:
    """Whether `attempt` belongs to a run of something that ran before (an operator's
    retry): only such runs number their attempts above 1."""
    return attempt.first > 1


def rollback_from(b: Builder, index: int, *, rerun: bool = False) -> None:
    """Compensate completed steps from `index` down to 0, or finish when none is left.

    Steps in `Saga.undo` failed for good and are compensated although they never completed
    (`compensates_itself`).

    In a `rerun` (an operator's retry of failed compensations, which re-runs only
    compensations that ran before) each one gets fresh attempt numbers: attempt 1 of it
    was issued already, and its token would be valid again.
    """
    if b.saga.state is SagaState.RUNNING:
        b.update(state=SagaState.COMPENSATING)
    completed = set(b.saga.completed_steps) | set(b.saga.undo)
    done = set(b.saga.compensated_steps) | set(b.saga.failed_compensations)
    for candidate in range(index, -1, -1):
        step = b.definition.steps[candidate]
        if step.name in completed and step.name not in done and step.compensate is not None:
            number = b.saga.attempt_seq + 1 if rerun else 1
            b.run(candidate, Direction.COMPENSATE, number, b.now, first=number)
            return
    _fail_lost_compensations(b, done)
    last = max(index, 0)
    if b.saga.failed_compensations:
        failed = ", ".join(b.saga.failed_compensations)
        b.update(error=join_errors(b.saga.error, f"compensation failed for: {failed}"))
        finish(b, SagaState.FAILED, "saga_failed", last)
    elif b.saga.abort_requested:
        finish(b, SagaState.ABORTED, "saga_aborted", last)
    else:
        finish(b, SagaState.COMPENSATED, "saga_compensated", last)


def _fail_lost_compensations(b: Builder, done: set[str]) -> None:
    """Completed steps the deployed definition no longer has cannot be compensated here.

    A deploy renamed or removed them while the saga ran. Each is recorded as a failed
    compensation, so the rollback ends FAILED (an operator must act) instead of claiming
    COMPENSATED with a completed step never undone.
    """
    lost = [
        name
        for name in b.saga.completed_steps
        if name not in b.definition.step_names and name not in done
    ]
    for name in lost:
        b.update(failed_compensations=(*b.saga.failed_compensations, name))
        b.audit(
            "compensation_failed",
            None,
            step_name=name,
            event_data={"not_in_definition": True},
            error_message=(
                f"step {name!r} completed, but {b.definition.saga_type} as deployed has no "
                f"step {name!r}: its compensation cannot run; compensate it by hand, or deploy "
                "the definition the saga started with and retry"
            ),
        )


def finish(b: Builder, state: SagaState, event_type: str, step_index: int) -> None:
    before = b.saga.state
    b.update(state=state, attempts=(), current_step_index=step_index)
    duration_ms = (b.now - b.saga.started_at).total_seconds() * 1000
    data: dict[str, Any] = {
        "completed_steps": list(b.saga.completed_steps),
        "compensated_steps": list(b.saga.compensated_steps),
    }
    if b.saga.failed_compensations:
        data["failed_compensations"] = list(b.saga.failed_compensations)
    b.audit(
        event_type,
        None,
        state_before=before,
        event_data=data,
        error_message=b.saga.error if state is not SagaState.COMPLETED else None,
        duration_ms=duration_ms,
    )


def join_errors(first: str | None, second: str) -> str:
    return second if not first else f"{first}; {second}"
