"""The saga state machine: (definition, saga, event, now) -> Decision.

Pure: no I/O, no clock (``now`` is an argument), no randomness beyond a seeded jitter.
A result that does not match the pending attempt, or arrives after the end, is ignored
rather than raised: duplicates and late messages are expected on an at-least-once queue.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, assert_never

from .builder import Builder, resend, retry_ordinal, send_now
from .decision import DEFAULT_LIMITS, Decision, Limits
from .definition import SagaDefinition, Step
from .events import (
    AbortRequested,
    AttemptDue,
    AttemptExpired,
    AttemptStalled,
    Event,
    RetryRequested,
    StartRequested,
    StepFailed,
    StepSucceeded,
    UnparkRequested,
)
from .migration import outline_event_data
from .model import Attempt, Direction, Saga, SagaState
from .operator import operator_retry
from .retry import backoff_seconds


def start(
    definition: SagaDefinition,
    event: StartRequested,
    now: datetime,
    limits: Limits = DEFAULT_LIMITS,
) -> Decision:
    """Create a saga from a validated start request and schedule its first step."""
    saga = Saga(
        saga_id=event.saga_id,
        saga_type=definition.saga_type,
        state=SagaState.RUNNING,
        context=dict(event.context),
        current_step_index=0,
        total_steps=len(definition.steps),
        started_at=now,
        updated_at=now,
        pending=None,
        user_id=event.user_id,
        ip_address=event.ip_address,
        definition_version=definition.version,
        definition_structure=definition.structure,
    )
    b = Builder(definition, saga, now, limits)
    b.audit(
        "saga_start",
        None,
        event_data={
            "saga_type": definition.saga_type,
            "definition_version": definition.version,
            "steps": outline_event_data(definition),
        },
    )
    b.run(0, Direction.FORWARD, 1, now)
    return b.decision()


def transition(
    definition: SagaDefinition,
    saga: Saga,
    event: Event,
    now: datetime,
    limits: Limits = DEFAULT_LIMITS,
) -> Decision:
    """Apply one event to a saga and say what to persist and what to send next."""
    pending = saga.pending
    if pending is not None and not 0 <= pending.step_index < len(definition.steps):
        return Decision(
            saga,
            ignored=(
                f"the pending attempt is of step {pending.step_index}, which "
                f"{definition.saga_type} as deployed does not have; deploy the definition "
                "the saga started with"
            ),
        )
    if isinstance(event, RetryRequested):
        return operator_retry(definition, saga, event, now, limits)
    if saga.state.is_terminal:
        return Decision(saga, ignored=f"saga is already {saga.state.value}")
    b = Builder(definition, saga, now, limits)
    if isinstance(event, AbortRequested):
        return _abort(b, event)
    if isinstance(event, UnparkRequested):
        return _unpark(b, event)
    if pending is None or not saga.awaits(event.step_index, event.direction, event.attempt):
        return Decision(
            saga,
            ignored=(
                f"result for step {event.step_index} {event.direction.value} attempt "
                f"{event.attempt} does not match the pending attempt "
                f"{pending.key() if pending else None}: duplicate or late"
            ),
        )
    if isinstance(event, AttemptDue):
        if not pending.held:
            return Decision(saga, ignored="attempt was already sent")
        return _send_held(b, pending, event.user_id)
    if isinstance(event, AttemptStalled) and pending.held:
        # A held attempt is not stalled, it waits for its due time (AttemptDue sends it).
        return Decision(saga, ignored="attempt is held until its not_before")
    if isinstance(event, AttemptStalled):
        if event.recoveries != pending.recoveries:
            return Decision(saga, ignored="attempt was already recovered by another scan")
        return _recover(b, pending, event.user_id)
    if isinstance(event, AttemptExpired):
        return _expired(b, pending, event)
    if isinstance(event, StepSucceeded):
        return _succeeded(b, event)
    if isinstance(event, StepFailed):
        return _failed(b, event)
    assert_never(event)


def _send_held(b: Builder, pending: Attempt, user_id: str | None) -> Decision:
    send_now(b, pending, recoveries=pending.recoveries, user_id=user_id)
    return b.decision()


def _abort(b: Builder, event: AbortRequested) -> Decision:
    if b.saga.abort_requested:
        return Decision(b.saga, ignored="abort was already requested")
    if b.saga.state is SagaState.COMPENSATING:
        return Decision(b.saga, ignored="saga is already rolling back")
    b.update(abort_requested=True, error=f"abort requested: {event.reason}")
    b.audit(
        "abort_requested",
        b.saga.pending.step_index if b.saga.pending else None,
        event_data={"reason": event.reason},
        user_id=event.user_id,
        ip_address=event.ip_address,
    )
    pending = b.saga.pending
    if pending is not None and pending.held and pending.direction is Direction.FORWARD:
        # A retry still waiting in the database was never sent: cancel it and roll back now.
        # The attempts before it failed; if one may have taken effect, undo the step too.
        b.update(pending=None, state=SagaState.COMPENSATING)
        step = b.definition.steps[pending.step_index]
        if _compensates_itself(step, pending.uncertain):
            _rollback_from(b, pending.step_index, also=step.name)
        else:
            _rollback_from(b, pending.step_index - 1)
        return b.decision()
    # A forward attempt in flight cannot be recalled from the queue: its result decides
    # whether that step needs compensating, so rollback begins when it reports.
    return b.decision()


def _succeeded(b: Builder, event: StepSucceeded) -> Decision:
    saga = b.saga
    index = event.step_index
    name = b.definition.steps[index].name
    assert saga.pending is not None  # transition() matched the event against it
    retries_taken = retry_ordinal(saga.pending) or None
    b.update(context={**saga.context, **event.output}, pending=None)
    if event.direction is Direction.FORWARD:
        b.update(completed_steps=(*saga.completed_steps, name))
        if saga.abort_requested:
            # The abort waited for this step; rollback starts with this very transition.
            b.update(state=SagaState.COMPENSATING)
        b.audit(
            "step_complete",
            index,
            state_before=saga.state,
            event_data={"attempt": event.attempt, "output_keys": sorted(event.output)},
            duration_ms=event.duration_ms,
            retry_count=retries_taken,
        )
        if saga.abort_requested:
            _rollback_from(b, index)
        elif index + 1 < len(b.definition.steps):
            b.run(index + 1, Direction.FORWARD, 1, b.now)
        else:
            _finish(b, SagaState.COMPLETED, "saga_complete", index)
        return b.decision()
    b.update(compensated_steps=(*saga.compensated_steps, name))
    b.audit(
        "compensation_complete",
        index,
        event_data={"attempt": event.attempt},
        duration_ms=event.duration_ms,
        retry_count=retries_taken,
    )
    _rollback_from(b, index - 1, rerun=_is_rerun(saga.pending))
    return b.decision()


def _failed(b: Builder, event: StepFailed) -> Decision:
    saga = b.saga
    index = event.step_index
    step = b.definition.steps[index]
    forward = event.direction is Direction.FORWARD
    policy = step.policy(event.direction)
    assert saga.pending is not None  # transition() matched the event against it
    first = saga.pending.first
    ordinal = event.attempt - first + 1  # 1 for the first attempt of this run
    error_data = {
        "attempt": event.attempt,
        "error_type": event.error_type,
        "timed_out": event.timed_out,
        "retryable": event.retryable,
    }
    can_retry = (
        event.retryable and ordinal < policy.max_attempts and not (forward and saga.abort_requested)
    )
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
        )
        b.run(
            index,
            event.direction,
            event.attempt + 1,
            not_before,
            first=first,
            retry_count=ordinal,
            uncertain=saga.pending.uncertain or (forward and event.outcome_unknown),
        )
        return b.decision()
    b.update(pending=None)
    if forward:
        unknown = event.outcome_unknown or saga.pending.uncertain
        own = _compensates_itself(step, unknown)
        if unknown:
            error_data["outcome_unknown"] = True
        if own:
            error_data["own_compensation"] = True
        b.update(error=f"step {step.name!r} failed: {event.message}", state=SagaState.COMPENSATING)
        b.audit(
            "step_failed",
            index,
            state_before=saga.state,
            event_data=error_data,
            error_message=event.message,
            error_stack_trace=event.stack_trace,
            duration_ms=event.duration_ms,
            retry_count=ordinal - 1,
        )
        if own:
            _rollback_from(b, index, also=step.name)
        else:
            _rollback_from(b, index - 1)
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
    _rollback_from(b, index - 1, rerun=_is_rerun(saga.pending))
    return b.decision()


def _compensates_itself(step: Step, outcome_unknown: bool) -> bool:
    """Whether a step that failed for good is compensated too, before the completed ones.

    It may have taken effect when its outcome is unknown (an attempt timed out, stalled or
    lost its worker), or, when the step says so, after any failure. Its compensation must
    then be safe to run when the action never took effect (docs/recovery.md).
    """
    return step.compensate is not None and (outcome_unknown or step.compensate_on_failure)


def _is_rerun(attempt: Attempt) -> bool:
    """Whether `attempt` belongs to a run of something that ran before (an operator's
    retry): only such runs number their attempts above 1."""
    return attempt.first > 1


def _rollback_from(b: Builder, index: int, *, rerun: bool = False, also: str | None = None) -> None:
    """Compensate completed steps from `index` down to 0, or finish when none is left.

    `also` names the step that failed for good and is compensated although it never
    completed (`_compensates_itself`).

    In a `rerun` (an operator's retry of failed compensations, which re-runs only
    compensations that ran before) each one gets fresh attempt numbers: attempt 1 of it
    was issued already, and its token would be valid again.
    """
    if b.saga.state is SagaState.RUNNING:
        b.update(state=SagaState.COMPENSATING)
    completed = set(b.saga.completed_steps)
    done = set(b.saga.compensated_steps) | set(b.saga.failed_compensations)
    for candidate in range(index, -1, -1):
        step = b.definition.steps[candidate]
        eligible = step.name in completed or step.name == also
        if eligible and step.name not in done and step.compensate is not None:
            number = b.saga.attempt_seq + 1 if rerun else 1
            b.run(candidate, Direction.COMPENSATE, number, b.now, first=number)
            return
    _fail_lost_compensations(b, done)
    last = max(index, 0)
    if b.saga.failed_compensations:
        failed = ", ".join(b.saga.failed_compensations)
        b.update(error=_join(b.saga.error, f"compensation failed for: {failed}"))
        _finish(b, SagaState.FAILED, "saga_failed", last)
    elif b.saga.abort_requested:
        _finish(b, SagaState.ABORTED, "saga_aborted", last)
    else:
        _finish(b, SagaState.COMPENSATED, "saga_compensated", last)


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


def _finish(b: Builder, state: SagaState, event_type: str, step_index: int) -> None:
    before = b.saga.state
    b.update(state=state, pending=None, current_step_index=step_index)
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


def _recover(
    b: Builder,
    pending: Attempt,
    user_id: str | None,
    note: Mapping[str, Any] | None = None,
    uncertain: bool | None = None,
) -> Decision:
    """Re-send a stalled attempt unchanged, or fail it after too many recoveries."""
    if pending.recoveries_exhausted(b.limits.max_recoveries):
        return _failed(
            b,
            StepFailed(
                pending.step_index,
                pending.direction,
                pending.number,
                error_type="StalledTooOften",
                message=(
                    f"attempt {pending.number} stalled {pending.recoveries + 1} times "
                    f"(max_recoveries={b.limits.max_recoveries}); giving up on it"
                ),
                retryable=False,
                timed_out=True,
            ),
        )
    resend(b, pending, note or {}, user_id=user_id, uncertain=uncertain)
    return b.decision()


def _expired(b: Builder, pending: Attempt, event: AttemptExpired) -> Decision:
    """Re-send at once when the latest copy sent expired unstarted: none can start now."""
    if pending.held:
        return Decision(b.saga, ignored="attempt is held until its not_before")
    if pending.start_by != event.start_by:
        return Decision(b.saga, ignored="an older copy expired; the latest one may still start")
    if b.now < pending.start_by:
        return Decision(b.saga, ignored="the copy is not past its start-by time here yet")
    # That copy never ran: whether the step may have taken effect is as it was.
    return _recover(b, pending, event.user_id, {"reason": "expired"}, pending.uncertain)


def _join(first: str | None, second: str) -> str:
    return second if not first else f"{first}; {second}"


def _unpark(b: Builder, event: UnparkRequested) -> Decision:
    """Send the attempt a parked saga kept, now that a worker has its version."""
    saga, pending = b.saga, b.saga.pending
    if saga.parked_at is None or pending is None:
        return Decision(saga, ignored="saga is not parked")
    resend(
        b,
        pending,
        {"reason": "unparked", "parked_at": saga.parked_at.isoformat()},
        user_id=event.user_id,
        counted=False,
    )
    return b.decision()
