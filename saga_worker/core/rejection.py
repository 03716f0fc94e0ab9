"""Refused starts, as audit events: nothing else changes.

A refused result or step message (an invalid token, an attempt no longer pending) has no
event here: it writes nothing (docs/security.md), the worker logs and counts it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .decision import AuditEvent
from .model import SagaState


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
