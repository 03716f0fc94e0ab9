"""What is decided about a saga without its definition (docs/deploys.md): parking it, and
recording an abort.

The recovery sweep parks an overdue saga instead of re-sending its attempt when no live
worker registered the saga's version: a re-send would wait in a queue nobody reads, expire,
and count towards StalledTooOften. An abort that reaches a worker without the saga's version
is recorded there, so it holds whichever worker, version or migration continues the saga.
Resuming needs the definition, and is a `transition` (UnparkRequested).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from .decision import AuditEvent, Decision
from .events import AbortRequested, ParkRequested
from .model import Saga, SagaState


def park(saga: Saga, event: ParkRequested, now: datetime) -> Decision:
    """Keep the pending attempt and stop re-sending it; audited once as `saga_parked`."""
    pending = saga.attempt_for(event.step_index, event.direction, event.attempt)
    if saga.state.is_terminal:
        return Decision(saga, ignored=f"saga is already {saga.state.value}")
    if saga.parked_at is not None:
        return Decision(saga, ignored="saga is already parked")
    if pending is None or pending.recoveries != event.recoveries:
        return Decision(saga, ignored="the pending attempt changed since the sweep saw it")
    if not pending.overdue(now):
        return Decision(saga, ignored="the pending attempt is not overdue")
    parked = replace(saga, parked_at=now, updated_at=now)
    audit = AuditEvent(
        event_type="saga_parked",
        state_before=saga.state,
        state_after=saga.state,
        step_index=pending.step_index,
        event_data={
            "definition_version": saga.definition_version,
            "reason": event.reason,
            "attempt": pending.number,
            "direction": pending.direction.value,
        },
        user_id=event.user_id,
    )
    return Decision(parked, (audit,))


def record_abort(saga: Saga, event: AbortRequested, now: datetime) -> Decision:
    """Flag the abort and audit it; rollback begins where the definition is, when the pending
    attempt reports (as `transition` does for an attempt in flight)."""
    if saga.state.is_terminal:
        return Decision(saga, ignored=f"saga is already {saga.state.value}")
    if saga.abort_requested:
        return Decision(saga, ignored="abort was already requested")
    if saga.state is SagaState.COMPENSATING:
        return Decision(saga, ignored="saga is already rolling back")
    flagged = replace(
        saga, abort_requested=True, error=f"abort requested: {event.reason}", updated_at=now
    )
    audit = AuditEvent(
        event_type="abort_requested",
        state_before=saga.state,
        state_after=saga.state,
        step_index=saga.pending.step_index if saga.pending else None,
        event_data={"reason": event.reason, "definition_version": saga.definition_version},
        user_id=event.user_id,
        ip_address=event.ip_address,
    )
    return Decision(flagged, (audit,))
