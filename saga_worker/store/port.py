"""What the engine needs from a store, without SQLAlchemy: the SQL store and the in-memory
one of `saga_worker.testing` both provide it."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple, Protocol, TypeVar

from ..core.decision import AuditEvent, Decision
from ..core.model import Saga

T = TypeVar("T")


@dataclass(frozen=True)
class Loaded:
    """A checkpoint read before a step runs, reused by the transition that follows.

    `carried` says it came with the step's message (worker/snapshot.py), not from a read.
    """

    saga: Saga
    audit_head: str
    carried: bool = False


class Applied(NamedTuple):
    """A decided transition: the saga before, the decision, and the checkpoint as committed.

    `committed` (the new saga with its new version and audit head) is None when the
    decision changed nothing.
    """

    before: Saga
    decision: Decision
    committed: Loaded | None


class StalledRow(NamedTuple):
    """One checkpoint the recovery scan found past its deadline."""

    saga_id: str
    pending: dict[str, Any] | None
    deadline: datetime
    saga_type: str
    definition_version: str | None


#: (saga_type, definition version) of a definition a worker has.
VersionKey = tuple[str, str]

#: How often a worker refreshes its heartbeat row (store/workers.py), and how old a row may
#: be and still count as live (a worker that was killed, not stopped, leaves its row).
HEARTBEAT_SECONDS = 5.0
LIVE_WINDOW = timedelta(seconds=4 * HEARTBEAT_SECONDS)


class SkippedLocked(Exception):
    """The row is locked by another transaction (another recovery sweep claimed it)."""


class Store(Protocol):
    """Checkpoints and audit rows, each write one transaction (see store/repository.py)."""

    def create(self, decision: Decision, now: datetime) -> Loaded | None:
        """Insert a new saga and its audit rows; None when the saga_id exists."""

    def apply(
        self,
        saga_id: str,
        decide: Callable[[Saga], Decision],
        now: datetime,
        *,
        skip_locked: bool = False,
        loaded: Loaded | None = None,
    ) -> Applied | None:
        """Load, decide, commit; ConcurrencyConflict when the version moved, None if unknown."""

    def record_rejection(
        self,
        saga_id: str,
        events: tuple[AuditEvent, ...],
        context: Mapping[str, Any],
        now: datetime,
    ) -> bool:
        """Audit rows of a refused start; False (nothing written) when the saga exists."""

    def load_for_step(self, saga_id: str) -> Loaded | None:
        """The checkpoint and its audit head."""

    def stalled(
        self, now: datetime, limit: int, after: tuple[datetime, str] | None = None
    ) -> list[StalledRow]:
        """Up to `limit` checkpoints past their deadline, earliest first."""

    def parked(self, versions: Collection[VersionKey], limit: int) -> list[str]:
        """Up to `limit` ids of parked sagas of these (saga_type, version)s."""

    def live_versions(self, window: timedelta, now: datetime) -> set[VersionKey]:
        """The versions of the workers whose last heartbeat is at most `window` old, by the
        database's clock where heartbeats are written with it (PostgreSQL), else by `now`."""

    def retrying(self, operation: Callable[[], T], what: str) -> T:
        """Run `operation`, retrying the store's transient errors (a database restart)."""
