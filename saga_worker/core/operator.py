"""An operator's retry: re-run a FAILED saga's failed compensations, or re-send a live
saga's pending attempt now (when it is stalled, held, or forced)."""

from __future__ import annotations

from datetime import datetime

from .builder import Builder, resend
from .decision import Decision, Limits
from .definition import SagaDefinition
from .events import RetryRequested
from .model import MAX_ATTEMPT, Attempt, Direction, Saga, SagaState


def operator_retry(
    definition: SagaDefinition, saga: Saga, event: RetryRequested, now: datetime, limits: Limits
) -> Decision:
    """An operator's retry, audited with who asked.

    FAILED -> COMPENSATING: re-run each failed compensation, highest step first, with fresh
    attempt numbers (above `Saga.attempt_seq`, the highest issued so far, so that an old
    message or result cannot pass for a new one). Refused when they would pass MAX_ATTEMPT.
    A live saga: send its pending attempt now, like a recovery.
    """
    b = Builder(definition, saga, now, limits)
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
        # Each re-run takes at most its policy's attempts, numbered from attempt_seq + 1 on.
        needed = sum(
            definition.steps[definition.step_names.index(name)]
            .policy(Direction.COMPENSATE)
            .max_attempts
            for name in retried
        )
        if saga.attempt_seq + needed > MAX_ATTEMPT:
            return Decision(
                saga,
                ignored=(
                    f"re-running {', '.join(retried)} needs {needed} attempt numbers above "
                    f"{saga.attempt_seq}, past {MAX_ATTEMPT}, the highest a step message "
                    "carries: run these compensations by hand"
                ),
            )
        b.update(state=SagaState.COMPENSATING, failed_compensations=())
        top = max(definition.step_names.index(name) for name in retried)
        first = saga.attempt_seq + 1
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
    sendable = [a for a in saga.attempts if definition.wait_of(a.step_index) is None]
    if pending is None or not sendable:
        return Decision(saga, ignored="saga has no pending attempt to re-send")
    refusals = []
    for attempt in sendable:
        refusal = _live_retry_refusal(definition, attempt, now, limits, event.force)
        if refusal is None:
            resend(b, attempt, note, user_id=event.user_id)
        else:
            refusals.append(refusal)
    if len(refusals) == len(sendable):
        return Decision(saga, ignored="; ".join(refusals))
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
