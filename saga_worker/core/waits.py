"""Waits (DESIGN section 10): signals, approvals and durable timers.

A wait in progress is a held attempt of its wait step whose due time is its timeout: the
recovery sweep's due scan fires it (`wait_due`), so timers live in the database, never in a
broker ETA. A signal is delivered to its wait, kept until its wait begins, or recorded once
and ignored; an approval counts distinct identified operators' votes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .builder import Builder
from .decision import Decision, Limits
from .definition import SagaDefinition
from .events import SignalReceived, StepFailed, VoteCast
from .failing import failed
from .model import Attempt, Direction, Saga, SagaState, Signal, Vote
from .progress import complete_leaf, deliver

#: Unexpected signal names (no wait takes them) a saga records at most; past it, one is
#: dropped without a write (the table must not grow by whoever can send `saga.signal`).
#: Every signal the definition awaits is recorded on top of these, once.
MAX_SEEN_SIGNALS = 32


def wait_due(b: Builder, attempt: Attempt, user_id: str | None) -> Decision:
    """A wait reached its timeout: a sleep completes; a signal or an approval wait fails
    (one attempt, so the saga compensates). Audited as `user_id`'s (the sweep's)."""
    leaf = attempt.step_index
    wait = b.definition.wait_of(leaf)
    assert wait is not None
    step = b.definition.steps[leaf]
    timeout = b.timeout(leaf, Direction.FORWARD)
    if wait.kind == "sleep":
        b.settle(leaf)
        b.update(completed_steps=(*b.saga.completed_steps, step.name))
        b.audit(
            "step_complete",
            leaf,
            event_data={"attempt": 1, "slept_seconds": timeout},
            user_id=b.saga.user_id if user_id is None else user_id,
        )
        complete_leaf(b, leaf)
        return b.decision()
    what = f"signal {wait.signal!r}" if wait.kind == "signal" else "approval"
    return failed(
        b,
        StepFailed(
            leaf,
            Direction.FORWARD,
            attempt.number,
            error_type="WaitTimedOut",
            message=f"{step.name}: no {what} within {timeout:g}s",
            retryable=False,
        ),
        user_id=user_id,
    )


def receive_signal(
    definition: SagaDefinition, saga: Saga, event: SignalReceived, now: datetime, limits: Limits
) -> Decision:
    """Deliver a signal to its wait, keep it for a wait not begun yet, or record it once and
    ignore it (a duplicate, a name no wait takes, a saga past that wait)."""
    name = event.signal
    if name in saga.seen_signals:
        return Decision(saga, ignored=f"signal {name!r} was already received")
    leaf = definition.signal_wait(name)
    # Names the definition awaits are bounded by it and always taken; only unexpected
    # names are capped, so that they cannot crowd out the signal a wait needs.
    unexpected = sum(1 for seen in saga.seen_signals if definition.signal_wait(seen) is None)
    if leaf is None and unexpected >= MAX_SEEN_SIGNALS:
        return Decision(saga, ignored=f"saga has recorded {MAX_SEEN_SIGNALS} signals already")
    b = Builder(definition, saga, now, limits)
    b.update(seen_signals=(*saga.seen_signals, name))
    signal = Signal(name, dict(event.payload), event.user_id, now, event.ip_address)
    reason = _ignore_reason(definition, saga, name, leaf)
    if reason is not None or leaf is None:
        _audit_signal(b, leaf, event, ignored=reason or "no wait takes it")
        return b.decision()
    if any(a.step_index == leaf for a in saga.attempts):
        deliver(b, leaf, signal)
    else:
        b.update(inbox=(*saga.inbox, signal))
        _audit_signal(b, leaf, event, kept=True)
    return b.decision()


def _ignore_reason(
    definition: SagaDefinition, saga: Saga, name: str, leaf: int | None
) -> str | None:
    if leaf is None:
        if any(
            (wait := definition.wait_of(i)) is not None
            and wait.kind == "approval"
            and step.name == name
            for i, step in enumerate(definition.steps)
        ):
            return "approvals take votes of identified operators (saga-worker approve), not signals"
        return f"{definition.saga_type} has no wait for signal {name!r}"
    if saga.state.is_terminal:
        return f"saga is already {saga.state.value}"
    if saga.state is SagaState.COMPENSATING or saga.abort_requested:
        return "saga is rolling back"
    if definition.steps[leaf].name in saga.completed_steps or leaf < saga.current_step_index:
        return f"the wait {definition.steps[leaf].name!r} is over"
    return None


def _audit_signal(
    b: Builder,
    leaf: int | None,
    event: SignalReceived,
    *,
    kept: bool = False,
    ignored: str | None = None,
) -> None:
    data: dict[str, Any] = {"signal": event.signal, "payload_keys": sorted(event.payload)}
    if kept:
        data["kept"] = True
    if ignored is not None:
        data["ignored"] = ignored
    b.audit(
        "signal_received",
        leaf if kept else None,
        event_data=data,
        user_id=event.user_id,
        ip_address=event.ip_address,
    )


def cast_vote(b: Builder, event: VoteCast) -> Decision:
    """Count an identified operator's vote on the approval in progress: N distinct approvals
    complete it, one rejection fails it. A vote that may not count is refused, audited."""
    saga = b.saga
    leaf = _approval_in_progress(b.definition, saga, event.wait)
    if leaf is None:
        what = f"approval {event.wait!r}" if event.wait else "an approval"
        return Decision(saga, ignored=f"saga {saga.saga_id} is not waiting for {what}")
    if not event.user_id:
        return Decision(saga, ignored="a vote needs the operator's identity (user_id)")
    wait = b.definition.wait_of(leaf)
    assert wait is not None
    name = b.definition.steps[leaf].name
    votes = [v for v in saga.votes if v.wait == name]
    refusal = None
    voter = _person(event.user_id)
    if wait.exclude_starter and saga.user_id is not None and voter == _person(saga.user_id):
        refusal = f"{event.user_id} started the saga and may not approve it"
    elif any(_person(v.user_id) == voter for v in votes):
        refusal = f"{event.user_id} has voted on {name} already"
    data: dict[str, Any] = {
        "approval": name,
        "vote": "approve" if event.approve else "reject",
        "required": wait.approvers,
    }
    if event.reason:
        data["reason"] = event.reason
    if refusal is not None:
        data["refused"] = refusal
        b.audit(
            "signal_received",
            leaf,
            event_data=data,
            user_id=event.user_id,
            ip_address=event.ip_address,
        )
        return b.decision()
    vote = Vote(name, event.user_id, event.approve, b.now)
    b.update(votes=(*saga.votes, vote))
    approvers = [v.user_id for v in (*votes, vote) if v.approve]
    data["approvals"] = len(approvers)
    b.audit(
        "signal_received", leaf, event_data=data, user_id=event.user_id, ip_address=event.ip_address
    )
    if not event.approve:
        return failed(
            b,
            StepFailed(
                leaf,
                Direction.FORWARD,
                1,
                error_type="ApprovalRejected",
                message=f"{name} rejected by {event.user_id}"
                + (f": {event.reason}" if event.reason else ""),
                retryable=False,
            ),
        )
    if len(approvers) >= wait.approvers:
        b.settle(leaf)
        b.update(completed_steps=(*b.saga.completed_steps, name))
        b.audit("step_complete", leaf, event_data={"attempt": 1, "approvers": approvers})
        complete_leaf(b, leaf)
    return b.decision()


def _person(user_id: str) -> str:
    """Who a user id names, for counting votes: case and surrounding blanks do not count."""
    return user_id.strip().casefold()


def _approval_in_progress(definition: SagaDefinition, saga: Saga, name: str | None) -> int | None:
    if saga.state is not SagaState.RUNNING or saga.abort_requested:
        return None
    for attempt in saga.attempts:
        wait = definition.wait_of(attempt.step_index)
        step = definition.steps[attempt.step_index]
        if wait is not None and wait.kind == "approval" and name in (None, step.name):
            return attempt.step_index
    return None
