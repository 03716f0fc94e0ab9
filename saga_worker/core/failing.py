"""A failed attempt: retried per its step's policy, or the step fails for good and the
saga rolls back (once no branch of its group is still running)."""

from __future__ import annotations

from datetime import timedelta

from .builder import Builder
from .decision import Decision
from .events import StepFailed
from .model import Direction, SagaState
from .retry import backoff_seconds
from .rollback import (
    begin_rollback,
    cancel_held,
    compensates_itself,
    is_rerun,
    join_errors,
    rollback_from,
)


def failed(b: Builder, event: StepFailed, *, user_id: str | None = None) -> Decision:
    """A failed attempt: retried per the step's policy, or the step fails for good.

    `user_id` names who reported it in its audit row (the sweep for a wait's timeout);
    by default the row carries the saga's user."""
    who = b.saga.user_id if user_id is None else user_id
    saga = b.saga
    index = event.step_index
    step = b.definition.steps[index]
    forward = event.direction is Direction.FORWARD
    policy = step.policy(event.direction)
    pending = saga.attempt_for(index, event.direction, event.attempt)
    assert pending is not None  # transition() matched the event against it
    rolling_back = saga.abort_requested or saga.state is SagaState.COMPENSATING
    first = pending.first
    ordinal = event.attempt - first + 1  # 1 for the first attempt of this run
    error_data = {
        "attempt": event.attempt,
        "error_type": event.error_type,
        "timed_out": event.timed_out,
        "retryable": event.retryable,
    }
    can_retry = event.retryable and ordinal < policy.max_attempts and not (forward and rolling_back)
    if can_retry:
        delay = backoff_seconds(
            policy, ordinal, f"{saga.saga_id}:{step.name}:{event.direction.value}:{first}"
        )
        not_before = b.now + timedelta(seconds=delay)
        b.update(retries=saga.retries + 1)
        b.audit(
            "step_retry" if forward else "compensation_retry",
            index,
            event_data={**error_data, "delay_seconds": round(delay, 6)},
            error_message=event.message,
            error_stack_trace=event.stack_trace,
            duration_ms=event.duration_ms,
            retry_count=ordinal,
            user_id=who,
        )
        b.run(
            index,
            event.direction,
            event.attempt + 1,
            not_before,
            first=first,
            retry_count=ordinal,
            uncertain=pending.uncertain or (forward and event.outcome_unknown),
        )
        return b.decision()
    b.settle(index)
    if forward:
        unknown = event.outcome_unknown or pending.uncertain
        own = compensates_itself(step, unknown)
        if unknown:
            error_data["outcome_unknown"] = True
        if own:
            error_data["own_compensation"] = True
            b.update(undo=(*saga.undo, step.name))
        message = f"step {step.name!r} failed: {event.message}"
        # The first failure of a group stays the saga's error; later ones are added to it.
        error = (
            join_errors(saga.error, message) if saga.state is SagaState.COMPENSATING else message
        )
        b.update(error=error, state=SagaState.COMPENSATING)
        b.audit(
            "step_failed",
            index,
            state_before=saga.state,
            event_data=error_data,
            error_message=event.message,
            error_stack_trace=event.stack_trace,
            duration_ms=event.duration_ms,
            retry_count=ordinal - 1,
            user_id=who,
        )
        # A branch's retry waiting in the database is not sent any more; branches that run
        # report first (a running task cannot be recalled), then the rollback begins.
        cancel_held(b)
        if not b.forward_in_flight():
            begin_rollback(b, index, completed=False)
        return b.decision()
    b.update(failed_compensations=(*saga.failed_compensations, step.name))
    b.audit(
        "compensation_failed",
        index,
        event_data=error_data,
        error_message=event.message,
        error_stack_trace=event.stack_trace,
        duration_ms=event.duration_ms,
        retry_count=ordinal - 1,
    )
    # A failed compensation is recorded and the rollback goes on with the rest.
    rollback_from(b, index - 1, rerun=is_rerun(pending))
    return b.decision()
