"""Refused progress and refused starts, as audit events: nothing else changes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .decision import AuditEvent
from .definition import SagaDefinition
from .events import ResultRejected
from .model import Saga, SagaState


def rejected_result(definition: SagaDefinition, saga: Saga, event: ResultRejected) -> AuditEvent:
    """The `saga_rejected` row of a refused result or step message; the saga stays as it was."""
    index = event.step_index
    valid_index = index is not None and 0 <= index < len(definition.steps)
    return AuditEvent(
        event_type="saga_rejected",
        state_before=saga.state,
        state_after=saga.state,
        step_name=definition.steps[index].name if valid_index and index is not None else None,
        step_index=index if valid_index else None,
        event_data={
            "task": event.task,
            "step_index": index,
            "direction": event.direction.value if event.direction else None,
            "attempt": event.attempt,
        },
        error_message=event.reason,
    )


def rejected_start(
    reason: str,
    *,
    user_id: str | None = None,
    ip_address: str | None = None,
    data: Mapping[str, Any] | None = None,
) -> AuditEvent:
    """The `saga_rejected` row of a refused start: no saga exists, so none is before it.

    Its state after is FAILED: the start failed for good (docs/contract.md, audit events);
    no checkpoint is written, so the saga_id stays free for a corrected start.
    """
    return AuditEvent(
        event_type="saga_rejected",
        state_before=None,
        state_after=SagaState.FAILED,
        event_data=dict(data or {}),
        error_message=reason,
        user_id=user_id,
        ip_address=ip_address,
    )
