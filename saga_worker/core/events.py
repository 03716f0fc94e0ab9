"""What can happen to a saga; each event is fed to `transition`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from .model import Direction, JSONObject


@dataclass(frozen=True)
class StartRequested:
    """A producer asked to start a saga (already validated by the shell)."""

    saga_id: str
    saga_type: str
    context: JSONObject
    user_id: str | None = None
    ip_address: str | None = None


@dataclass(frozen=True)
class StepSucceeded:
    """An attempt of a step action or compensation returned `output`."""

    step_index: int
    direction: Direction
    attempt: int
    output: JSONObject
    duration_ms: float | None = None


@dataclass(frozen=True)
class StepFailed:
    """An attempt raised, timed out, or returned something unusable."""

    step_index: int
    direction: Direction
    attempt: int
    error_type: str
    message: str
    stack_trace: str | None = None
    retryable: bool = True
    timed_out: bool = False
    duration_ms: float | None = None

    @property
    def outcome_unknown(self) -> bool:
        """The attempt may have taken effect: it timed out, stalled, or its worker was lost."""
        return self.timed_out or self.error_type in UNKNOWN_OUTCOME_ERRORS


#: Error types whose attempt may have taken effect before it ended: ours (a measured or soft
#: time limit, too many stalls) and Celery's, as a remote service's saga_remote reports them.
UNKNOWN_OUTCOME_ERRORS = frozenset(
    {
        "StepTimeout",
        "StalledTooOften",
        "SoftTimeLimitExceeded",
        "TimeLimitExceeded",
        "WorkerLostError",
    }
)


@dataclass(frozen=True)
class AbortRequested:
    """Someone asked to stop the saga and roll it back."""

    reason: str
    user_id: str | None = None
    ip_address: str | None = None


@dataclass(frozen=True)
class AttemptStalled:
    """The pending attempt passed its deadline with no result recorded.

    `recoveries` is the count the recovery scan saw, so that two scans racing on the
    same stalled attempt recover it once.
    """

    step_index: int
    direction: Direction
    attempt: int
    recoveries: int = 0
    #: Who recovers it, for the audit rows (the sweep: `system:recovery`).
    user_id: str | None = None


@dataclass(frozen=True)
class AttemptDue:
    """A held attempt reached its `not_before`: send it now."""

    step_index: int
    direction: Direction
    attempt: int
    #: Who sends it, for the audit rows (the sweep: `system:recovery`).
    user_id: str | None = None


@dataclass(frozen=True)
class RetryRequested:
    """An operator asked to re-run a FAILED saga's failed compensations, or to re-send the
    pending attempt of a live one now.

    A live attempt still inside its deadline is re-sent only with `force`: it may well be
    running, and a second copy would run the step twice.
    """

    user_id: str | None = None
    reason: str = "operator retry"
    force: bool = False


@dataclass(frozen=True)
class AttemptExpired:
    """A worker discarded a copy of the attempt unstarted: it was still queued at its
    start-by time `start_by` (Celery's `expires`). When that copy is the latest one sent, no
    copy can start any more, so the attempt is re-sent now rather than at its deadline."""

    step_index: int
    direction: Direction
    attempt: int
    start_by: datetime
    user_id: str | None = None


@dataclass(frozen=True)
class ParkRequested:
    """The recovery sweep found the pending attempt overdue while no live worker has the
    saga's definition version: keep the attempt and stop re-sending it (no definition is
    needed to decide this). Carries the attempt and recoveries the sweep saw."""

    step_index: int
    direction: Direction
    attempt: int
    recoveries: int
    reason: str
    user_id: str | None = None


@dataclass(frozen=True)
class UnparkRequested:
    """A worker that has the parked saga's version resumes it: the kept attempt is sent."""

    user_id: str | None = None


@dataclass(frozen=True)
class MigrateRequested:
    """An operator moves a saga in flight to another version (core/migration.py).

    `mapping` renames old steps to new ones; a step it does not name keeps its name.
    """

    mapping: Mapping[str, str] = field(default_factory=dict)
    user_id: str | None = None
    reason: str = "operator migration"


@dataclass(frozen=True)
class SignalReceived:
    """`saga.signal` (or `saga-worker signal`) brought `signal` for the saga, from `user_id`.

    The payload merges into the context when the wait for it is in progress or begins.
    """

    signal: str
    payload: JSONObject
    user_id: str | None = None
    ip_address: str | None = None


@dataclass(frozen=True)
class VoteCast:
    """An identified operator approves or rejects the approval wait in progress (`wait`
    names it; None: the one in progress)."""

    approve: bool
    user_id: str | None
    wait: str | None = None
    reason: str = ""
    ip_address: str | None = None


Event = (
    StepSucceeded
    | StepFailed
    | AbortRequested
    | AttemptStalled
    | AttemptDue
    | RetryRequested
    | UnparkRequested
    | AttemptExpired
    | SignalReceived
    | VoteCast
)
