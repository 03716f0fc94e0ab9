"""Builds one transition's decision: the new saga value, its audit events and its commands.

Shared by the transitions of `transition.py` and the operator's of `operator.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from .commands import Command, RunAttempt, attempt_task_id
from .decision import AuditEvent, Decision, Limits
from .definition import SagaDefinition
from .model import Attempt, Direction, Saga, SagaState

#: The most a re-send doubles a queue allowance to (never below the stall grace): without a
#: cap, a few dozen re-sends (an operator's `retry --force` loop) push start-by past
#: datetime.max, and even SAGA_MAX_RECOVERIES=20 would make a lost message wait a year.
MAX_QUEUE_ALLOWANCE_SECONDS = 3600.0


def next_allowance(allowance: float, grace: float) -> float:
    """A re-sent copy's queue allowance: twice the last, up to the cap (or the grace, if more)."""
    return min(2 * allowance, max(MAX_QUEUE_ALLOWANCE_SECONDS, grace))


class Builder:
    """Accumulates the new saga value, audit events and commands of one transition."""

    def __init__(self, definition: SagaDefinition, saga: Saga, now: datetime, limits: Limits):
        self.definition = definition
        self.saga = saga
        self.now = now
        self.limits = limits
        self.events: list[AuditEvent] = []
        self.commands: list[Command] = []

    def update(self, **changes: Any) -> None:
        self.saga = replace(self.saga, **changes)

    def audit(
        self,
        event_type: str,
        step_index: int | None,
        *,
        state_before: SagaState | None = None,
        **fields: Any,
    ) -> None:
        before = (
            state_before
            if state_before is not None
            else (None if event_type == "saga_start" else self.saga.state)
        )
        fields.setdefault("user_id", self.saga.user_id)
        fields.setdefault("ip_address", self.saga.ip_address)
        if "step_name" not in fields:
            fields["step_name"] = (
                None if step_index is None else self.definition.steps[step_index].name
            )
        self.events.append(
            AuditEvent(
                event_type=event_type,
                state_before=before,
                state_after=self.saga.state,
                step_index=step_index,
                **fields,
            )
        )

    def run(
        self,
        step_index: int,
        direction: Direction,
        number: int,
        not_before: datetime,
        *,
        first: int = 1,
        recoveries: int = 0,
        retry_count: int | None = None,
        state_before: SagaState | None = None,
        extra: Mapping[str, Any] | None = None,
        user_id: str | None = None,
        uncertain: bool = False,
        allowance: float | None = None,
        unparked: datetime | None = None,
    ) -> None:
        """Make (step, direction, number) the pending attempt and send it (or hold it).

        `allowance` is its queue allowance (default: the stall grace, a first send's).
        `unparked` is when the saga this send resumes was parked (`attempt_task_id`).
        """
        timeout = self.timeout(step_index, direction)
        allowance = allowance or self.limits.stall_grace_seconds
        self.update(attempt_seq=max(self.saga.attempt_seq, number))
        if (not_before - self.now).total_seconds() > self.limits.max_broker_delay_seconds:
            held = Attempt(
                step_index,
                direction,
                number,
                not_before,
                not_before,
                recoveries,
                True,
                first,
                uncertain=uncertain,
                allowance=allowance,
            )
            self.put(held)
            return
        start_by = not_before + timedelta(seconds=allowance)
        # A copy starts by start_by or never (it expires): after start_by + timeout it has
        # either reported or stalled, and only then may recovery send another copy.
        deadline = start_by + timedelta(seconds=timeout)
        attempt = Attempt(
            step_index,
            direction,
            number,
            not_before,
            deadline,
            recoveries,
            False,
            first,
            uncertain=uncertain,
            allowance=allowance,
        )
        self.put(attempt)
        kind = "step_start" if direction is Direction.FORWARD else "compensation_start"
        task_id = attempt_task_id(
            self.saga.saga_id, step_index, direction, number, recoveries, unparked
        )
        data: dict[str, Any] = {
            "attempt": number,
            "timeout_seconds": timeout,
            # The Celery task id the message is sent with: the console links it to Flower.
            "task_id": task_id,
            **(extra or {}),
        }
        if not_before > self.now:
            data["not_before"] = not_before.isoformat()
        if allowance != self.limits.stall_grace_seconds:
            data["queue_allowance_seconds"] = allowance
        who = {"user_id": user_id} if user_id is not None else {}
        self.audit(
            kind,
            step_index,
            state_before=state_before,
            event_data=data,
            retry_count=retry_count,
            **who,
        )
        self.commands.append(
            RunAttempt(
                self.saga.saga_id,
                step_index,
                direction,
                number,
                not_before,
                start_by,
                task_id=task_id,
            )
        )

    def timeout(self, step_index: int, direction: Direction) -> float:
        return self.definition.timeout(
            step_index, direction, self.limits.default_step_timeout_seconds
        )

    def put(self, attempt: Attempt) -> None:
        """Make `attempt` the one in flight for its step (replacing that step's last one)."""
        others = [a for a in self.saga.attempts if a.step_index != attempt.step_index]
        self.update(
            attempts=tuple(sorted([*others, attempt], key=lambda a: a.step_index)),
            current_step_index=self.definition.stage_of(attempt.step_index).leaves[0],
        )

    def settle(self, step_index: int) -> None:
        """The attempt of `step_index` reported for good: it is no longer in flight."""
        self.update(attempts=tuple(a for a in self.saga.attempts if a.step_index != step_index))

    def forward_in_flight(self) -> bool:
        return any(a.direction is Direction.FORWARD for a in self.saga.attempts)

    def wait(self, step_index: int) -> None:
        """Begin a wait: a held attempt whose due time is its timeout (the sweep fires it;
        nothing is sent), audited as `step_start`."""
        wait = self.definition.wait_of(step_index)
        assert wait is not None
        timeout = self.timeout(step_index, Direction.FORWARD)
        due = self.now + timedelta(seconds=timeout)
        self.update(attempt_seq=max(self.saga.attempt_seq, 1))
        self.put(Attempt(step_index, Direction.FORWARD, 1, due, due, held=True))
        data: dict[str, Any] = {"attempt": 1, "timeout_seconds": timeout, "wait": wait.kind}
        if wait.signal is not None:
            data["signal"] = wait.signal
        if wait.kind == "approval":
            data["approvers"] = wait.approvers
            data["exclude_starter"] = wait.exclude_starter
        data["due"] = due.isoformat()
        self.audit("step_start", step_index, event_data=data)

    def decision(self) -> Decision:
        # Any transition a worker with the saga's definition made resumes a parked saga. A
        # saga started before versions were recorded adopts the definition it is first
        # decided under, and keeps it from then on.
        waiting_for = self._waiting_for()
        saga = replace(
            self.saga,
            waiting_for=waiting_for,
            waiting_since=(
                self.saga.waiting_since
                if waiting_for is not None and waiting_for == self.saga.waiting_for
                else (self.now if waiting_for is not None else None)
            ),
            votes=self.saga.votes if waiting_for is not None else (),
            updated_at=self.now,
            parked_at=None,
            definition_version=self.saga.definition_version or self.definition.version,
            definition_structure=self.saga.definition_structure or self.definition.structure,
        )
        return Decision(saga, tuple(self.events), tuple(self.commands))

    def _waiting_for(self) -> str | None:
        for attempt in self.saga.attempts:
            if 0 <= attempt.step_index < len(self.definition.steps):
                wait = self.definition.wait_of(attempt.step_index)
                if wait is not None:
                    name = self.definition.steps[attempt.step_index].name
                    return (
                        f"signal:{wait.signal}" if wait.kind == "signal" else f"{wait.kind}:{name}"
                    )
        return None


def retry_ordinal(attempt: Attempt) -> int:
    """0 for the first attempt of a run, 1 for its first retry, and so on."""
    return attempt.number - attempt.first


def resend(
    b: Builder,
    pending: Attempt,
    note: Mapping[str, Any],
    *,
    user_id: str | None = None,
    counted: bool = True,
    uncertain: bool | None = None,
) -> None:
    """Audit `saga_recovered` and send the pending attempt again, unchanged but its deadline.

    `counted`: the re-send counts towards max_recoveries (not when resuming a parked saga,
    whose attempt stalled for want of a worker, not of its own doing)."""
    recoveries = pending.recoveries + 1 if counted else pending.recoveries
    who: dict[str, Any] = {"user_id": user_id} if user_id is not None else {}
    b.audit(
        "saga_recovered",
        pending.step_index,
        event_data={
            **note,
            "attempt": pending.number,
            "direction": pending.direction.value,
            "recoveries": recoveries,
            "held": pending.held,
            "deadline": pending.deadline.isoformat(),
        },
        **who,
    )
    # A copy that was sent may have run (and taken effect) without reporting: from now on
    # the step's outcome is unknown until it reports (a held attempt was never sent).
    if uncertain is None:
        uncertain = pending.uncertain or not pending.held
    # A copy that was sent may still be queued behind a backlog: give the new one twice the
    # queue allowance (up to MAX_QUEUE_ALLOWANCE_SECONDS), so a backlog drains instead of
    # being re-sent until StalledTooOften.
    # (The old copy expired at its start-by time, before this deadline: it cannot start.)
    grace = b.limits.stall_grace_seconds
    base = pending.allowance or grace
    send_now(
        b,
        pending,
        recoveries=recoveries,
        user_id=user_id,
        uncertain=uncertain,
        # (A parked saga's copy waited for want of a worker with its version, not behind a
        # backlog: resumed with the same allowance.)
        allowance=base if pending.held or not counted else next_allowance(base, grace),
        # Same recoveries count as the copy that was parked: the id must differ all the same.
        unparked=None if counted else b.saga.parked_at,
    )


def send_now(
    b: Builder,
    pending: Attempt,
    *,
    recoveries: int,
    user_id: str | None = None,
    uncertain: bool | None = None,
    allowance: float | None = None,
    unparked: datetime | None = None,
) -> None:
    """Send the pending attempt (same number, same run) now, with a fresh deadline."""
    b.run(
        pending.step_index,
        pending.direction,
        pending.number,
        b.now,
        first=pending.first,
        recoveries=recoveries,
        retry_count=retry_ordinal(pending) or None,
        user_id=user_id,
        uncertain=pending.uncertain if uncertain is None else uncertain,
        allowance=pending.allowance if allowance is None else allowance,
        unparked=unparked,
    )
