"""The saga state machine: (definition, saga, event, now) -> Decision.

Pure: no I/O, no clock (``now`` is an argument), no randomness beyond a seeded jitter.
A result that does not match the pending attempt, or arrives after the end, is ignored
rather than raised: duplicates and late messages are expected on an at-least-once queue.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, assert_never

from .builder import Builder, resend, send_now
from .business_key import business_key_of
from .decision import DEFAULT_LIMITS, Decision, Limits
from .definition import SagaDefinition
from .events import (
    AbortRequested,
    AttemptDue,
    AttemptExpired,
    AttemptStalled,
    Event,
    RetryRequested,
    SignalReceived,
    StartRequested,
    StepFailed,
    StepSucceeded,
    UnparkRequested,
    VoteCast,
)
from .failing import failed
from .migration import outline_event_data
from .model import Attempt, Direction, Saga, SagaState
from .operator import operator_retry
from .progress import begin_stage, succeeded
from .rollback import begin_rollback, cancel_held
from .waits import cast_vote, receive_signal, wait_due


def start(
    definition: SagaDefinition,
    event: StartRequested,
    now: datetime,
    limits: Limits = DEFAULT_LIMITS,
) -> Decision:
    """Create a saga from a validated start request and schedule its first step.

    The saga's business key is computed here, once: no later transition changes it."""
    saga = Saga(
        saga_id=event.saga_id,
        saga_type=definition.saga_type,
        state=SagaState.RUNNING,
        context=dict(event.context),
        current_step_index=0,
        total_steps=len(definition.steps),
        started_at=now,
        updated_at=now,
        attempts=(),
        user_id=event.user_id,
        ip_address=event.ip_address,
        definition_version=definition.version,
        definition_structure=definition.structure,
        business_key=business_key_of(definition.business_key, event.context),
    )
    b = Builder(definition, saga, now, limits)
    started: dict[str, Any] = {
        "saga_type": definition.saga_type,
        "definition_version": definition.version,
        "steps": outline_event_data(definition),
    }
    if saga.business_key is not None:
        # An audit export holds no checkpoint: its saga_start row names the key.
        started["business_key"] = saga.business_key
    b.audit("saga_start", None, event_data=started)
    begin_stage(b, 0)
    return b.decision()


def transition(
    definition: SagaDefinition,
    saga: Saga,
    event: Event,
    now: datetime,
    limits: Limits = DEFAULT_LIMITS,
) -> Decision:
    """Apply one event to a saga and say what to persist and what to send next."""
    stray = [a for a in saga.attempts if not 0 <= a.step_index < len(definition.steps)]
    if stray:
        return Decision(
            saga,
            ignored=(
                f"the pending attempt is of step {stray[0].step_index}, which "
                f"{definition.saga_type} as deployed does not have; deploy the definition "
                "the saga started with"
            ),
        )
    if isinstance(event, RetryRequested):
        return operator_retry(definition, saga, event, now, limits)
    if isinstance(event, SignalReceived):
        return receive_signal(definition, saga, event, now, limits)
    if saga.state.is_terminal:
        return Decision(saga, ignored=f"saga is already {saga.state.value}")
    b = Builder(definition, saga, now, limits)
    if isinstance(event, AbortRequested):
        return _abort(b, event)
    if isinstance(event, UnparkRequested):
        return _unpark(b, event)
    if isinstance(event, VoteCast):
        return cast_vote(b, event)
    pending = saga.attempt_for(event.step_index, event.direction, event.attempt)
    if pending is None:
        return Decision(
            saga,
            ignored=(
                f"result for step {event.step_index} {event.direction.value} attempt "
                f"{event.attempt} does not match the pending attempt "
                f"{_keys(saga)}: duplicate or late"
            ),
        )
    wait = definition.wait_of(pending.step_index)
    if isinstance(event, AttemptDue):
        if not pending.held:
            return Decision(saga, ignored="attempt was already sent")
        if saga.abort_requested and pending.direction is Direction.FORWARD:
            # An abort recorded without the definition (core/parking.py record_abort) left
            # this wait or retry held: it must not start anything now; roll back instead.
            return _roll_back_held(b)
        if wait is not None:
            return wait_due(b, pending, event.user_id)
        return _send_held(b, pending, event.user_id)
    if isinstance(event, AttemptStalled) and pending.held:
        # A held attempt is not stalled, it waits for its due time (AttemptDue sends it).
        return Decision(saga, ignored="attempt is held until its not_before")
    if wait is not None:
        # Nothing is ever sent for a wait, so no result, stall or expiry can be its own.
        return Decision(saga, ignored=f"{definition.steps[pending.step_index].name} is a wait")
    if isinstance(event, AttemptStalled):
        if event.recoveries != pending.recoveries:
            return Decision(saga, ignored="attempt was already recovered by another scan")
        return _recover(b, pending, event.user_id)
    if isinstance(event, AttemptExpired):
        return _expired(b, pending, event)
    if isinstance(event, StepSucceeded):
        return succeeded(b, event)
    if isinstance(event, StepFailed):
        return failed(b, event)
    assert_never(event)


def _keys(saga: Saga) -> object:
    if len(saga.attempts) > 1:
        return [a.key() for a in saga.attempts]
    return saga.pending.key() if saga.pending else None


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
    # A forward attempt in flight cannot be recalled from the queue: its result decides
    # whether that step needs compensating, so rollback begins when it reports.
    return _roll_back_held(b)


def _roll_back_held(b: Builder) -> Decision:
    """Cancel the held forward attempts of an aborted saga; roll back when none runs."""
    cancelled = cancel_held(b)
    if cancelled is not None and not b.forward_in_flight():
        # Nothing of the stage is running (a retry waiting in the database, or a wait, was
        # never sent): roll back now.
        b.update(state=SagaState.COMPENSATING)
        begin_rollback(b, cancelled, completed=False)
    return b.decision()


def _recover(
    b: Builder,
    pending: Attempt,
    user_id: str | None,
    note: Mapping[str, Any] | None = None,
    uncertain: bool | None = None,
) -> Decision:
    """Re-send a stalled attempt unchanged, or fail it after too many recoveries."""
    if pending.recoveries_exhausted(b.limits.max_recoveries):
        return failed(
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


def _unpark(b: Builder, event: UnparkRequested) -> Decision:
    """Send the attempt a parked saga kept, now that a worker has its version."""
    saga = b.saga
    if saga.parked_at is None or not saga.attempts:
        return Decision(saga, ignored="saga is not parked")
    note = {"reason": "unparked", "parked_at": saga.parked_at.isoformat()}
    for pending in saga.attempts:
        if b.definition.wait_of(pending.step_index) is not None:
            # Nothing to send: the sweep fires a wait at its due time (it scans the saga
            # again once unparked). The resumption is audited all the same: every accepted
            # transition writes a row.
            who: dict[str, Any] = {"user_id": event.user_id} if event.user_id is not None else {}
            b.audit(
                "saga_recovered",
                pending.step_index,
                event_data={
                    **note,
                    "attempt": pending.number,
                    "direction": pending.direction.value,
                    "recoveries": pending.recoveries,
                    "held": True,
                    "deadline": pending.deadline.isoformat(),
                },
                **who,
            )
            continue
        if not pending.overdue(b.now):
            # Its copy may still start (or run), or a held retry is not due yet: the sweep
            # re-sends it if it stalls, as for any saga (at most one copy may start).
            continue
        resend(b, pending, note, user_id=event.user_id, counted=False)
    return b.decision()
