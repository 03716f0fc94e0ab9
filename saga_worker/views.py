"""What the client returns: values with `as_dict()` for `--json`, and who the operator is."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .audit.chain import iso_utc
from .core.model import Saga


@dataclass(frozen=True)
class SagaStatus:
    """What `saga-worker status` shows: the checkpoint, made readable and redacted."""

    saga: Saga
    context: dict[str, Any]
    error: str | None
    steps: tuple[str, ...] | None
    pending: dict[str, Any] | None
    stalled: bool
    #: Every attempt in flight (several while a parallel group runs).
    attempts: tuple[dict[str, Any], ...] = ()

    @property
    def current_step(self) -> str | None:
        index = self.saga.current_step_index
        if self.steps is not None and 0 <= index < len(self.steps):
            return self.steps[index]
        return None

    def as_dict(self) -> dict[str, Any]:
        s = self.saga
        return {
            "saga_id": s.saga_id,
            "saga_type": s.saga_type,
            "business_key": s.business_key,
            "state": s.state.value,
            "current_step_index": s.current_step_index,
            "current_step": self.current_step,
            "total_steps": s.total_steps,
            "steps": list(self.steps) if self.steps is not None else None,
            "pending": self.pending,
            "deadline": self.pending["deadline"] if self.pending else None,
            "stalled": self.stalled,
            "completed_steps": list(s.completed_steps),
            "compensated_steps": list(s.compensated_steps),
            "failed_compensations": list(s.failed_compensations),
            "retries": s.retries,
            "abort_requested": s.abort_requested,
            "error": self.error,
            "user_id": s.user_id,
            "ip_address": s.ip_address,
            "started_at": iso_utc(s.started_at),
            "updated_at": iso_utc(s.updated_at),
            "version": s.version,
            "definition_version": s.definition_version,
            "parked_at": iso_utc(s.parked_at) if s.parked_at else None,
            "attempts": list(self.attempts),
            "waiting_for": s.waiting_for,
            "waiting_since": iso_utc(s.waiting_since) if s.waiting_since else None,
            "context": self.context,
        }


@dataclass(frozen=True)
class SagaSummary:
    """One line of `saga-worker list`."""

    saga_id: str
    saga_type: str
    state: str
    current_step_index: int
    total_steps: int
    user_id: str | None
    started_at: datetime
    updated_at: datetime
    error: str | None
    definition_version: str | None = None
    parked_at: datetime | None = None
    waiting_for: str | None = None
    waiting_since: datetime | None = None
    business_key: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "saga_id": self.saga_id,
            "saga_type": self.saga_type,
            "business_key": self.business_key,
            "state": self.state,
            "current_step_index": self.current_step_index,
            "total_steps": self.total_steps,
            "user_id": self.user_id,
            "started_at": iso_utc(self.started_at),
            "updated_at": iso_utc(self.updated_at),
            "error": self.error,
            "definition_version": self.definition_version,
            "parked_at": iso_utc(self.parked_at) if self.parked_at else None,
            "waiting_for": self.waiting_for,
            "waiting_since": iso_utc(self.waiting_since) if self.waiting_since else None,
        }


@dataclass(frozen=True)
class SagaPage:
    """One page of `list`, newest first, with the counts per state of the whole filter."""

    items: list[SagaSummary]
    page: int
    page_size: int
    total: int
    counts: dict[str, int]
    #: A count stopped at `list_sagas`'s count_limit: `total` and `pages` are lower bounds.
    total_at_least: bool = False

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.page_size))

    def as_dict(self) -> dict[str, Any]:
        return {
            "items": [i.as_dict() for i in self.items],
            "page": self.page,
            "page_size": self.page_size,
            "pages": self.pages,
            "total": self.total,
            "total_at_least": self.total_at_least,
            "counts": self.counts,
        }


@dataclass(frozen=True)
class OperatorResult:
    """What a retry or abort did: state before and after, audit rows written, tasks sent."""

    saga_id: str
    action: str
    state_before: str
    state_after: str
    audit_events: tuple[str, ...]
    sent: tuple[str, ...]
    send_errors: tuple[str, ...] = ()
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "saga_id": self.saga_id,
            "action": self.action,
            "state_before": self.state_before,
            "state_after": self.state_after,
            "audit_events": list(self.audit_events),
            "sent": list(self.sent),
            "send_errors": list(self.send_errors),
            "note": self.note,
        }


def os_user() -> str:
    """Who runs this process, for the audit of operator actions."""
    for name in ("SAGA_OPERATOR", "USER", "LOGNAME", "USERNAME"):
        value = os.environ.get(name)
        if value:
            return value
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return f"uid-{os.getuid()}"


@dataclass(frozen=True)
class VersionLine:
    """One (saga_type, version) of `saga-worker versions`: its sagas not yet ended and the
    live workers that have it."""

    saga_type: str
    version: str | None
    running: int
    parked: int
    failed: int
    oldest: datetime | None
    workers: tuple[str, ...]

    @property
    def in_flight(self) -> int:
        return self.running + self.parked + self.failed

    def as_dict(self) -> dict[str, Any]:
        return {
            "saga_type": self.saga_type,
            "version": self.version,
            "running": self.running,
            "parked": self.parked,
            "failed": self.failed,
            "in_flight": self.in_flight,
            "oldest_started_at": iso_utc(self.oldest) if self.oldest else None,
            "workers": list(self.workers),
        }


@dataclass(frozen=True)
class VersionsReport:
    """What `saga-worker versions` shows: per version, what is in flight and who serves it."""

    lines: tuple[VersionLine, ...]
    #: The live workers: node name, instance id, queue, versions, first and last heartbeat.
    workers: tuple[dict[str, Any], ...]

    def line(self, saga_type: str, version: str) -> VersionLine | None:
        return next(
            (x for x in self.lines if (x.saga_type, x.version) == (saga_type, version)), None
        )

    def as_dict(self) -> dict[str, Any]:
        return {"versions": [x.as_dict() for x in self.lines], "workers": list(self.workers)}


@dataclass(frozen=True)
class MigrationResult:
    """What `saga-worker migrate` did (or, with --dry-run, would do) to one saga."""

    saga_id: str
    state: str
    from_version: str | None
    to_version: str
    dry_run: bool
    #: Why the saga was not moved (None: it was, or would be).
    refused: str | None = None
    resume_step: str | None = None
    direction: str | None = None
    attempt: int | None = None
    completed_steps: tuple[str, ...] = ()
    compensated_steps: tuple[str, ...] = ()
    sent: tuple[str, ...] = ()
    send_errors: tuple[str, ...] = ()

    @property
    def migrated(self) -> bool:
        return self.refused is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "saga_id": self.saga_id,
            "state": self.state,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "dry_run": self.dry_run,
            "migrated": self.migrated,
            "refused": self.refused,
            "resume_step": self.resume_step,
            "direction": self.direction,
            "attempt": self.attempt,
            "completed_steps": list(self.completed_steps),
            "compensated_steps": list(self.compensated_steps),
            "sent": list(self.sent),
            "send_errors": list(self.send_errors),
        }
