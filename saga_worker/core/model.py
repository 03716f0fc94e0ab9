"""Values that describe a saga at one moment: its state and the attempts it waits for."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

#: The highest attempt number a step or result message may carry (worker/messages.py): the
#: limit of retry policies and of the fresh numbers an operator retry draws.
MAX_ATTEMPT = 9999


class SagaState(StrEnum):
    """Lifecycle state of a saga (docs/contract.md, States)."""

    RUNNING = "RUNNING"
    COMPENSATING = "COMPENSATING"
    COMPLETED = "COMPLETED"
    COMPENSATED = "COMPENSATED"
    ABORTED = "ABORTED"
    FAILED = "FAILED"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {SagaState.COMPLETED, SagaState.COMPENSATED, SagaState.ABORTED, SagaState.FAILED}
)


class Direction(StrEnum):
    """Whether an attempt runs a step's action or its compensation."""

    FORWARD = "forward"
    COMPENSATE = "compensate"

    @property
    def delta(self) -> int:
        """+1 walks the step list forward, -1 walks it back (one loop for both)."""
        return 1 if self is Direction.FORWARD else -1


@dataclass(frozen=True)
class Attempt:
    """An attempt a non-terminal saga waits for (one, or one per branch of a group).

    A result is accepted only when its (step_index, direction, number) equals one of them,
    which is what turns duplicated and late messages into no-ops.

    A `held` attempt waits in the database, not in a broker ETA, until `not_before`; its
    `deadline` is then the time the recovery sweep sends it. Broker ETAs past Redis'
    visibility timeout are delivered twice, so long delays must not live there.
    """

    step_index: int
    direction: Direction
    number: int
    not_before: datetime
    deadline: datetime
    recoveries: int = 0
    held: bool = False
    #: Number of the first attempt of this run: 1, or fresh numbers for an operator retry.
    first: int = 1
    #: An earlier attempt or copy of this step's run may have taken effect (it timed out, or
    #: it stalled and was re-sent): if the step fails for good, its compensation runs too.
    uncertain: bool = False
    #: Queue allowance in seconds: a sent copy must start by `start_by` (not_before + this),
    #: or the worker that receives it discards it (Celery's `expires`). Doubled on each
    #: re-send of the same attempt; 0 in a checkpoint written before it existed.
    allowance: float = 0.0

    @property
    def start_by(self) -> datetime:
        """The time by which a sent copy must start; the deadline is this + the timeout."""
        return self.not_before + timedelta(seconds=self.allowance)

    def key(self) -> tuple[int, Direction, int]:
        return (self.step_index, self.direction, self.number)

    def overdue(self, now: datetime) -> bool:
        """Past its deadline (the SQL scan's `deadline < now` is on it rounded up: codec.py)."""
        return self.deadline < now

    def stalled(self, now: datetime) -> bool:
        """Sent, and no result came before its deadline (a held attempt is due, not stalled)."""
        return not self.held and self.overdue(now)

    def recoveries_exhausted(self, max_recoveries: int) -> bool:
        """Re-sent `max_recoveries` times already: the next stall fails it instead."""
        return not self.held and self.recoveries >= max_recoveries


JSONObject = Mapping[str, Any]


@dataclass(frozen=True)
class Signal:
    """A signal kept until its wait begins (it arrived early), with who sent it."""

    name: str
    payload: JSONObject
    user_id: str | None
    at: datetime
    ip_address: str | None = None


@dataclass(frozen=True)
class Vote:
    """An operator's counted vote on an approval wait."""

    wait: str
    user_id: str
    approve: bool
    at: datetime


@dataclass(frozen=True)
class Saga:
    """A saga's checkpoint: everything needed to decide its next transition."""

    saga_id: str
    saga_type: str
    state: SagaState
    context: JSONObject
    current_step_index: int
    total_steps: int
    started_at: datetime
    updated_at: datetime
    #: The attempts in flight: one, one per running branch of a parallel group, or none
    #: (terminal). A wait in progress is a held attempt of the wait step.
    attempts: tuple[Attempt, ...]
    completed_steps: tuple[str, ...] = ()
    compensated_steps: tuple[str, ...] = ()
    failed_compensations: tuple[str, ...] = ()
    error: str | None = None
    retries: int = 0
    user_id: str | None = None
    ip_address: str | None = None
    abort_requested: bool = False
    version: int = 0
    #: The highest attempt number this saga has issued, for any step and direction. A run of
    #: something that ran before (an operator's retry of failed compensations) numbers its
    #: attempts above it, so no (step, direction, number), and no token, is issued twice.
    attempt_seq: int = 0
    #: The version of the definition the saga started with (None: started before versions
    #: were recorded; it runs under its type's default). It only ever runs under this one.
    definition_version: str | None = None
    #: `SagaDefinition.structure` of that definition: a definition registered under the
    #: same version label with other steps is not the saga's (docs/deploys.md).
    definition_structure: str | None = None
    #: Set while no live worker has `definition_version` (docs/deploys.md): the pending
    #: attempt is kept, not re-sent, until a worker with the version resumes it.
    parked_at: datetime | None = None
    #: Signals that arrived before their wait began (core/signals.py).
    inbox: tuple[Signal, ...] = ()
    #: Names of every signal recorded (delivered, kept or ignored): a second one is dropped.
    seen_signals: tuple[str, ...] = ()
    #: Counted votes of the approval in progress.
    votes: tuple[Vote, ...] = ()
    #: Steps that failed for good but may have taken effect: compensated in the rollback
    #: although they never completed (their failure and the rollback may be transitions
    #: apart when other branches of a group were still running).
    undo: tuple[str, ...] = ()
    #: What the saga waits for ("signal:<name>", "approval:<wait>", "sleep:<wait>") and
    #: since when; None when it waits for no signal, vote or timer.
    waiting_for: str | None = None
    waiting_since: datetime | None = None
    #: What people search the saga by (`SagaDefinition.business_key`): computed once, at
    #: start, and never changed (a migration to another version keeps it).
    business_key: str | None = None

    @property
    def pending(self) -> Attempt | None:
        """The attempt in flight with the earliest deadline (the only one of a linear saga)."""
        if not self.attempts:
            return None
        return min(self.attempts, key=lambda a: (a.deadline, a.step_index))

    def attempt_for(self, step_index: int, direction: Direction, number: int) -> Attempt | None:
        """The attempt in flight that is (step_index, direction, number), if any."""
        for attempt in self.attempts:
            if attempt.key() == (step_index, direction, number):
                return attempt
        return None

    def awaits(self, step_index: int, direction: Direction, attempt: int) -> bool:
        """True when (step_index, direction, attempt) is an attempt this saga waits for.

        Anything else is a duplicate, a late message or a superseded attempt: a step task
        does not run it, and `transition` ignores its result.
        """
        return self.attempt_for(step_index, direction, attempt) is not None
