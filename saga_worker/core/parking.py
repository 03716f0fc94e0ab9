"""Parking: a saga whose definition version no live worker has (docs/deploys.md).

The recovery sweep parks an overdue saga instead of re-sending its attempt when no live
worker registered the saga's version: a re-send would wait in a queue nobody reads, expire,
and count towards StalledTooOften. Parking needs no definition (the worker deciding it may
not have the saga's); resuming does, and is a `transition` (UnparkRequested).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from .decision import AuditEvent, Decision
from .events import ParkRequested
from .model import Saga


def park(saga: Saga, event: ParkRequested, now: datetime) -> Decision:
    """Keep the pending attempt and stop re-sending it; audited once as `saga_parked`."""
    pending = saga.pending
    if saga.state.is_terminal:
        return Decision(saga, ignored=f"saga is already {saga.state.value}")
    if saga.parked_at is not None:
        return Decision(saga, ignored="saga is already parked")
    seen = (event.step_index, event.direction, event.attempt)
    if pending is None or pending.key() != seen or pending.recoveries != event.recoveries:
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
