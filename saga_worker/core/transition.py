"""The saga state machine: (definition, saga, event, now) -> Decision.

Pure: no I/O, no clock (``now`` is an argument), no randomness beyond a seeded jitter.
A result that does not match the pending attempt, or arrives after the end, is ignored
rather than raised: duplicates and late messages are expected on an at-least-once queue.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, assert_never

from .commands import Command, RunAttempt
from .decision import DEFAULT_LIMITS, AuditEvent, Decision, Limits
from .definition import SagaDefinition
from .events import (
    AbortRequested,
    AttemptDue,
    AttemptStalled,
    Event,
    ResultRejected,
    RetryRequested,
    StartRequested,
    StepFailed,
    StepSucceeded,
)
from .model import Attempt, Direction, Saga, SagaState
from .rejection import rejected_result
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
    )
    b = _Builder(definition, saga, now, limits)
    b.audit("saga_start", None, event_data={"saga_type": definition.saga_type})
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
    if isinstance(event, ResultRejected):
        return Decision(saga, (rejected_result(definition, saga, event),))
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
        return _operator_retry(definition, saga, event, now, limits)
    if saga.state.is_terminal:
        return Decision(saga, ignored=f"saga is already {saga.state.value}")
    b = _Builder(definition, saga, now, limits)
    if isinstance(event, AbortRequested):
        return _abort(b, event)
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
        return _send_held(b, pending)
    if isinstance(event, AttemptStalled) and pending.held:
        # A held attempt is not stalled, it waits for its due time (AttemptDue sends it).
        return Decision(saga, ignored="attempt is held until its not_before")
    if isinstance(event, AttemptStalled):
        if event.recoveries != pending.recoveries:
            return Decision(saga, ignored="attempt was already recovered by another scan")
        return _recover(b, pending)
    if isinstance(event, StepSucceeded):
        return _succeeded(b, event)
    if isinstance(event, StepFailed):
        return _failed(b, event)
    assert_never(event)


class _Builder:
    """Accumulates the new saga value, audit events and commands of one transition."""

    def __init__(self, definition: SagaDefinition, saga: Saga, now: datetime, limits: Limits):
        self.definition = definition
        self.saga = saga
        self.now = now
        self.limits = limits
        self.events: list[AuditEvent] = []
        self.commands: list[Command] = []

    def update(self, **changes: Any) -> None:
        self.saga = replace(self.saga, **changes)

    def audit(
        self,
        event_type: str,
        step_index: int | None,
        *,
        state_before: SagaState | None = None,
        **fields: Any,
    ) -> None:
        before = (
            state_before
            if state_before is not None
            else (None if event_type == "saga_start" else self.saga.state)
        )
        fields.setdefault("user_id", self.saga.user_id)
        fields.setdefault("ip_address", self.saga.ip_address)
        self.events.append(
            AuditEvent(
                event_type=event_type,
                state_before=before,
                state_after=self.saga.state,
                step_name=None if step_index is None else self.definition.steps[step_index].name,
                step_index=step_index,
                **fields,
            )
        )

    def run(
        self,
        step_index: int,
        direction: Direction,
        number: int,
        not_before: datetime,
        *,
        first: int = 1,
        recoveries: int = 0,
        retry_count: int | None = None,
        state_before: SagaState | None = None,
        extra: Mapping[str, Any] | None = None,
        user_id: str | None = None,
    ) -> None:
        """Make (step, direction, number) the pending attempt and send it (or hold it)."""
        timeout = self.definition.timeout(
            step_index, direction, self.limits.default_step_timeout_seconds
        )
        if (not_before - self.now).total_seconds() > self.limits.max_broker_delay_seconds:
            held = Attempt(
                step_index, direction, number, not_before, not_before, recoveries, True, first
            )
            self.update(pending=held, current_step_index=step_index)
            return
        deadline = not_before + timedelta(seconds=timeout + self.limits.stall_grace_seconds)
        attempt = Attempt(
            step_index, direction, number, not_before, deadline, recoveries, False, first
        )
        self.update(pending=attempt, current_step_index=step_index)
        kind = "step_start" if direction is Direction.FORWARD else "compensation_start"
        data: dict[str, Any] = {"attempt": number, "timeout_seconds": timeout, **(extra or {})}
        if not_before > self.now:
            data["not_before"] = not_before.isoformat()
        who = {"user_id": user_id} if user_id is not None else {}
        self.audit(
            kind,
            step_index,
            state_before=state_before,
            event_data=data,
            retry_count=retry_count,
            **who,
        )
        self.commands.append(
            RunAttempt(self.saga.saga_id, step_index, direction, number, not_before)
        )

    def decision(self) -> Decision:
        saga = replace(self.saga, updated_at=self.now)
        return Decision(saga, tuple(self.events), tuple(self.commands))


def _operator_retry(
    definition: SagaDefinition, saga: Saga, event: RetryRequested, now: datetime, limits: Limits
) -> Decision:
    """An operator's retry, audited with who asked.

    FAILED -> COMPENSATING: re-run each failed compensation, highest step first, with fresh
    attempt numbers (above any used before, so an old result cannot pass for a new one).
    A live saga: send its pending attempt now, like a recovery.
    """
    b = _Builder(definition, saga, now, limits)
    note = {"operator_retry": True, "reason": event.reason}
    pending = saga.pending
    if saga.state is SagaState.FAILED:
        retried = list(saga.failed_compensations)
        if not retried:
            return Decision(saga, ignored="FAILED with no failed compensation to retry")
        unknown = [name for name in retried if name not in definition.step_names]
        if unknown:
            # A deploy renamed or removed the step: its compensation cannot be found here.
            return Decision(
                saga,
                ignored=(
                    f"failed compensation(s) {', '.join(unknown)} are not steps of "
                    f"{definition.saga_type} as deployed; run them by hand or deploy the "
                    "definition the saga started with"
                ),
            )
        b.update(state=SagaState.COMPENSATING, failed_compensations=())
        top = max(definition.step_names.index(name) for name in retried)
        # Every attempt number so far was created at an earlier transition, so none
        # exceeds the loaded version: version + 1 is fresh.
        first = saga.version + 1
        b.run(
            top,
            Direction.COMPENSATE,
            first,
            now,
            first=first,
            state_before=SagaState.FAILED,
            extra={**note, "retrying": retried},
            user_id=event.user_id,
        )
        return b.decision()
    if saga.state.is_terminal:
        return Decision(
            saga,
            ignored=(f"saga is {saga.state.value}: only FAILED or stalled sagas can be retried"),
        )
    if pending is None:
        return Decision(saga, ignored="saga has no pending attempt to re-send")
    refusal = _live_retry_refusal(definition, pending, now, limits, event.force)
    if refusal is not None:
        return Decision(saga, ignored=refusal)
    _resend(b, pending, note, user_id=event.user_id)
    return b.decision()


def _live_retry_refusal(
    definition: SagaDefinition, pending: Attempt, now: datetime, limits: Limits, force: bool
) -> str | None:
    """Why an operator may not re-send a live saga's pending attempt now (None: they may)."""
    if pending.held:
        return None  # never sent: sending it early cannot run the step twice
    what = (
        f"attempt {pending.number} of {_step_name(definition, pending.step_index)} "
        f"({pending.direction.value})"
    )
    if not pending.stalled(now) and not force:
        wait = (pending.deadline - now).total_seconds()
        return (
            f"{what} is in flight and not stalled: its deadline is in {wait:.0f}s "
            f"({pending.deadline.isoformat()}); use --force to re-send it anyway"
        )
    if pending.recoveries_exhausted(limits.max_recoveries):
        return (
            f"{what} was already re-sent {pending.recoveries} times "
            f"(SAGA_MAX_RECOVERIES={limits.max_recoveries}); the next recovery sweep fails it"
        )
    return None


def _step_name(definition: SagaDefinition, index: int) -> str:
    if 0 <= index < len(definition.steps):
        return definition.steps[index].name
    return f"step {index}"


def _retry_ordinal(attempt: Attempt) -> int:
    """0 for the first attempt of a run, 1 for its first retry, and so on."""
    return attempt.number - attempt.first


def _send_held(b: _Builder, pending: Attempt) -> Decision:
    b.run(
        pending.step_index,
        pending.direction,
        pending.number,
        b.now,
        first=pending.first,
        recoveries=pending.recoveries,
        retry_count=_retry_ordinal(pending) or None,
    )
    return b.decision()


def _abort(b: _Builder, event: AbortRequested) -> Decision:
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
        b.update(pending=None, state=SagaState.COMPENSATING)
        _rollback_from(b, pending.step_index - 1)
        return b.decision()
    # A forward attempt in flight cannot be recalled from the queue: its result decides
    # whether that step needs compensating, so rollback begins when it reports.
    return b.decision()


def _succeeded(b: _Builder, event: StepSucceeded) -> Decision:
    saga = b.saga
    index = event.step_index
    name = b.definition.steps[index].name
    assert saga.pending is not None  # transition() matched the event against it
    retries_taken = _retry_ordinal(saga.pending) or None
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
    _rollback_from(b, index - 1)
    return b.decision()


def _failed(b: _Builder, event: StepFailed) -> Decision:
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
            index, event.direction, event.attempt + 1, not_before, first=first, retry_count=ordinal
        )
        return b.decision()
    b.update(pending=None)
    if forward:
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
    _rollback_from(b, index - 1)
    return b.decision()


def _rollback_from(b: _Builder, index: int) -> None:
    """Compensate completed steps from `index` down to 0, or finish when none is left."""
    if b.saga.state is SagaState.RUNNING:
        b.update(state=SagaState.COMPENSATING)
    completed = set(b.saga.completed_steps)
    done = set(b.saga.compensated_steps) | set(b.saga.failed_compensations)
    for candidate in range(index, -1, -1):
        step = b.definition.steps[candidate]
        if step.name in completed and step.name not in done and step.compensate is not None:
            b.run(candidate, Direction.COMPENSATE, 1, b.now)
            return
    last = max(index, 0)
    if b.saga.failed_compensations:
        failed = ", ".join(b.saga.failed_compensations)
        b.update(error=_join(b.saga.error, f"compensation failed for: {failed}"))
        _finish(b, SagaState.FAILED, "saga_failed", last)
    elif b.saga.abort_requested:
        _finish(b, SagaState.ABORTED, "saga_aborted", last)
    else:
        _finish(b, SagaState.COMPENSATED, "saga_compensated", last)


def _finish(b: _Builder, state: SagaState, event_type: str, step_index: int) -> None:
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


def _recover(b: _Builder, pending: Attempt) -> Decision:
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
    _resend(b, pending, {})
    return b.decision()


def _resend(
    b: _Builder, pending: Attempt, note: Mapping[str, Any], *, user_id: str | None = None
) -> None:
    """Audit `saga_recovered` and send the pending attempt again, unchanged but its deadline."""
    who: dict[str, Any] = {"user_id": user_id} if user_id is not None else {}
    b.audit(
        "saga_recovered",
        pending.step_index,
        event_data={
            **note,
            "attempt": pending.number,
            "direction": pending.direction.value,
            "recoveries": pending.recoveries + 1,
            "held": pending.held,
            "deadline": pending.deadline.isoformat(),
        },
        **who,
    )
    b.run(
        pending.step_index,
        pending.direction,
        pending.number,
        b.now,
        first=pending.first,
        recoveries=pending.recoveries + 1,
        retry_count=_retry_ordinal(pending) or None,
        user_id=user_id,
    )


def _join(first: str | None, second: str) -> str:
    return second if not first else f"{first}; {second}"
