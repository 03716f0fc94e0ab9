"""`SagaTestHarness`: run a saga definition through the real engine, in-process, no broker.

The harness owns an `InMemoryStore`, a `RecordingDispatcher` (its "broker": sent attempts
wait there until run) and a `FakeClock`, and builds the one `SagaEngine` around them. Local
steps run as `saga_worker/worker/tasks.py` runs them; results of remote steps (or results a
test wants to force) are delivered with `succeed` / `fail`, as `saga.advance` delivers them.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import registry
from ..attempt import output_problem, run_attempt
from ..audit.redaction import Redactor
from ..audit.verify import ChainProblem
from ..config import Settings
from ..core.decision import Decision, Limits
from ..core.definition import SagaDefinition
from ..core.events import Event, RetryRequested, StepFailed, StepSucceeded
from ..core.failure import (
    reported_failure,
)
from ..core.model import Saga
from ..engine import SagaEngine, StartResult
from ..recovery import SweepResult, sweep
from ..requests import parse_abort, parse_signal, parse_start, parse_vote
from .memory import FakeClock, InMemoryStore, RecordingDispatcher, SentAttempt

if TYPE_CHECKING:
    from ..store.port import Loaded

# The limits a worker applies to contexts and step outputs (SAGA_MAX_CONTEXT_*), at their
# defaults; the URLs are never used.
_SETTINGS = Settings(database_url="memory://", broker_url="memory://", home=Path("."))


class HarnessError(AssertionError):
    """The test asked for something the saga cannot do now (an AssertionError for pytest)."""


@dataclass(frozen=True)
class StepRun:
    """One delivered message: whether its step ran, what it reported and what followed.

    `ran` is False when the attempt was no longer pending (a duplicate or superseded
    message, skipped as a worker skips it) or when `expired`: the message was delivered after
    its start-by time, which it carries as Celery's `expires`, and a worker discards it
    unrun. `error` is the exception the step raised.
    """

    attempt: SentAttempt
    ran: bool
    event: StepSucceeded | StepFailed | None = None
    decision: Decision | None = None
    error: Exception | None = None
    expired: bool = False


class SagaTestHarness:
    """Unit-test a saga definition through the real engine: start, run steps, inspect.

    `limits` are the engine's settings (stall grace, max recoveries, the longest broker
    delay); `clock` starts at `memory.DEFAULT_START` unless given. Methods act on the saga
    started last (`saga_id`).
    """

    def __init__(
        self,
        definition: SagaDefinition,
        *,
        limits: Limits | None = None,
        clock: FakeClock | None = None,
        redactor: Redactor | None = None,
    ) -> None:
        self.definition = definition
        self.limits = limits if limits is not None else Limits()
        # What a worker with these limits checks contexts and step outputs against.
        self._settings = replace(
            _SETTINGS, default_step_timeout_seconds=self.limits.default_step_timeout_seconds
        )
        self.clock = clock if clock is not None else FakeClock()
        self.store = InMemoryStore(redactor)
        self.dispatcher = RecordingDispatcher()
        self.engine = SagaEngine(
            self.store,
            self.dispatcher,
            self.limits,
            clock=self.clock,
            definitions=self._definition,
        )
        self.saga_id: str | None = None
        self._delivered: set[int] = set()  # indexes into dispatcher.sent already consumed

    # -- driving ---------------------------------------------------------------------------

    def start(
        self,
        context: Mapping[str, Any] | None = None,
        *,
        saga_id: str | None = None,
        user_id: str | None = None,
        ip_address: str | None = None,
    ) -> StartResult:
        """Start a saga as a producer's saga.start would (validated the same way).

        Without `saga_id` a fresh one is made, as a start message's task id would be.
        A known saga_id is a duplicate: `created` is False and nothing is sent.
        """
        kwargs: dict[str, Any] = {
            "saga_type": self.definition.saga_type,
            "context": {} if context is None else context,
        }
        for key, value in (("saga_id", saga_id), ("user_id", user_id), ("ip_address", ip_address)):
            if value is not None:
                kwargs[key] = value
        request = parse_start(
            (), kwargs, self._settings, f"{self.definition.saga_type}-{uuid.uuid4()}"
        )
        result = self.engine.start(request)
        self.saga_id = result.saga_id
        return result

    def run_next(self) -> StepRun:
        """Deliver the next sent message (earliest `not_before` first) and run its local step.

        The clock moves to the message's `not_before` when that is later (a retry's backoff).
        A message delivered after its start-by is discarded unrun (`StepRun.expired`).
        """
        index, sent = self._next()
        if sent.remote:
            raise HarnessError(
                f"the next message is remote task {sent.task_name!r} (step {sent.step_name}): "
                "deliver its result with succeed() or fail()"
            )
        self._deliver(index)
        return self._run_local(sent)

    def run_until_settled(self, max_steps: int = 100, *, fail_fast: bool = False) -> list[StepRun]:
        """Run local steps until no message is left or the next one is a remote step's.

        With `fail_fast`, an exception a step raises is re-raised after its failure was
        recorded (to see a bug's traceback instead of a compensated saga).
        """
        runs: list[StepRun] = []
        while (upcoming := self._upcoming()) and not upcoming[0][1].remote:
            if len(runs) >= max_steps:
                raise HarnessError(
                    f"not settled after {max_steps} steps; saga {self.saga_id} is "
                    f"{self.saga.state.value} (raise max_steps if that is expected)"
                )
            run = self.run_next()
            runs.append(run)
            if fail_fast and run.error is not None:
                raise run.error
        return runs

    def succeed(self, step_name: str, output: Mapping[str, Any] | None = None) -> Decision:
        """Deliver success of the pending attempt of `step_name` (its action or compensation)."""
        sent = self._take(step_name)
        command = sent.command
        problem = output_problem(output, self._settings)
        event: StepSucceeded | StepFailed = (
            StepSucceeded(
                command.step_index, command.direction, command.attempt, dict(output or {})
            )
            if problem is None
            else StepFailed(
                command.step_index, command.direction, command.attempt, "StepOutputError", problem
            )
        )
        return self._handle(command.saga_id, event)

    def fail(
        self,
        step_name: str,
        error_type: str = "StepError",
        message: str = "failed by the test",
        *,
        retryable: bool = True,
    ) -> Decision:
        """Deliver failure of the pending attempt of `step_name`, as a failure report would.

        An `error_type` named NonRetryableStepError fails the step without retries too.
        """
        command = self._take(step_name).command
        report = {"error_type": error_type, "message": message, "retryable": retryable}
        return self._handle(
            command.saga_id,
            reported_failure(command.step_index, command.direction, command.attempt, report),
        )

    def abort(self, reason: str = "abort requested", *, user_id: str | None = None) -> Decision:
        """Request rollback, as saga.abort does."""
        saga_id, event = parse_abort(
            (), {"saga_id": self._current(), "reason": reason, "user_id": user_id}
        )
        return self._handle(saga_id, event)

    def signal(
        self, name: str, payload: Mapping[str, Any] | None = None, *, user_id: str | None = None
    ) -> Decision:
        """Send signal `name`, as saga.signal does (validated the same way)."""
        saga_id, event = parse_signal(
            (),
            {
                "saga_id": self._current(),
                "signal": name,
                "payload": payload or {},
                "user_id": user_id,
            },
            self._settings,
        )
        return self._handle(saga_id, event)

    def vote(
        self, user_id: str, *, approve: bool = True, wait: str | None = None, reason: str = ""
    ) -> Decision:
        """An operator's vote on the approval in progress, as `saga-worker approve|reject`."""
        return self._handle(self._current(), parse_vote(user_id, approve, wait, reason))

    def retry(
        self, reason: str = "operator retry", *, user_id: str = "operator", force: bool = False
    ) -> Decision:
        """An operator's retry through the engine, as `saga-worker retry [--force]`.

        A FAILED saga re-runs its failed compensations; a live one has its pending attempt
        re-sent now when it has stalled, is held, or `force` is given. A retry the engine
        refuses raises HarnessError with its reason, as the CLI refuses it.
        """
        event = RetryRequested(user_id=user_id, reason=reason, force=force)
        decision = self._handle(self._current(), event)
        if decision.ignored is not None:
            raise HarnessError(f"retry of saga {self._current()} refused: {decision.ignored}")
        return decision

    def advance_clock(self, seconds: float) -> datetime:
        """Let time pass (for held retries and stall deadlines); returns the new time."""
        return self.clock.advance(seconds)

    def recover(self) -> SweepResult:
        """Run the beat's recovery sweep now: re-send stalled attempts, send due held retries."""
        here = registry.version_keys() | {(self.definition.saga_type, self.definition.version)}
        return sweep(self.store, self.engine, self.clock(), local=here)

    # -- inspection ------------------------------------------------------------------------

    @property
    def saga(self) -> Saga:
        """The current saga as last committed."""
        saga = self.store.load(self._current())
        if saga is None:
            raise HarnessError(f"saga {self.saga_id} does not exist")
        return saga

    def audit_trail(self) -> list[dict[str, Any]]:
        """The current saga's audit rows, as `saga-worker audit show` reads them."""
        return self.store.audit_trail(self._current())

    def audit_events(self) -> list[str]:
        """The event types of the current saga's audit trail, in order."""
        return [row["event_type"] for row in self.audit_trail()]

    @property
    def sent(self) -> list[SentAttempt]:
        """Every attempt sent so far (failed sends are in `dispatcher.failed`)."""
        return list(self.dispatcher.sent)

    @property
    def queued(self) -> list[SentAttempt]:
        """Sent attempts not delivered yet, in delivery order."""
        return [sent for _, sent in self._upcoming()]

    def verify_audit(self) -> list[ChainProblem]:
        """Problems the real chain verifier finds in the store's audit rows; [] when sound."""
        return self.store.verify_audit()

    # -- internals -------------------------------------------------------------------------

    def _current(self) -> str:
        if self.saga_id is None:
            raise HarnessError("no saga started yet: call start() first")
        return self.saga_id

    def _handle(self, saga_id: str, event: Event, loaded: Loaded | None = None) -> Decision:
        return self.engine.handle(saga_id, event, loaded=loaded).decision

    def _definition(self, saga_type: str, version: str | None) -> SagaDefinition:
        # The harness's own definition, not the registry's: tests often build several
        # variants of one saga type without registering them.
        if saga_type == self.definition.saga_type:
            return self.definition
        return registry.get_version(saga_type, version)

    def _upcoming(self) -> list[tuple[int, SentAttempt]]:
        pending = [
            (i, sent) for i, sent in enumerate(self.dispatcher.sent) if i not in self._delivered
        ]
        return sorted(pending, key=lambda item: (item[1].command.not_before, item[0]))

    def _next(self) -> tuple[int, SentAttempt]:
        upcoming = self._upcoming()
        if not upcoming:
            state = self.saga.state.value if self.saga_id is not None else "not started"
            raise HarnessError(
                f"no message to deliver (saga {self.saga_id} is {state}); a held retry or a "
                "failed send waits for advance_clock() and recover()"
            )
        return upcoming[0]

    def _expired(self, sent: SentAttempt) -> bool:
        start_by = sent.command.start_by
        return start_by is not None and self.clock() > start_by

    def _deliver(self, index: int) -> None:
        self._delivered.add(index)
        self.clock.advance_to(self.dispatcher.sent[index].command.not_before)

    def _take(self, step_name: str) -> SentAttempt:
        """Consume the message of the pending attempt, which must be of `step_name`."""
        saga = self.saga
        if not saga.attempts:
            raise HarnessError(f"saga {saga.saga_id} is {saga.state.value}: no attempt pending")
        names = self.definition.step_names
        pending = next((a for a in saga.attempts if names[a.step_index] == step_name), None)
        if pending is None:
            waits_for = ", ".join(
                f"{names[a.step_index]} ({a.direction.value}) attempt {a.number}"
                for a in saga.attempts
            )
            raise HarnessError(f"saga {saga.saga_id} waits for {waits_for}, not for {step_name}")
        where = f"{step_name} ({pending.direction.value}) attempt {pending.number}"
        if self.definition.wait_of(pending.step_index) is not None:
            raise HarnessError(
                f"{step_name} is a wait: signal() or vote() it, or advance_clock() past its "
                "timeout and recover()"
            )
        if pending.held:
            raise HarnessError(
                f"{where} is held until {pending.not_before.isoformat()}: "
                "advance_clock() past it and recover() to send it"
            )
        expired = False
        for index, sent in self._upcoming():
            if sent.command.saga_id == saga.saga_id and sent.key == pending.key():
                self._deliver(index)
                if not self._expired(sent):
                    return sent
                expired = True  # discarded unrun, as the receiving service's Celery does
        why = "expired unstarted (past its start-by)" if expired else "was never sent"
        raise HarnessError(
            f"{where} {why}: advance_clock() past its deadline "
            f"{pending.deadline.isoformat()} and recover() to re-send it"
        )

    def _run_local(self, sent: SentAttempt) -> StepRun:
        """What a worker's step task does with a message (saga_worker/worker/tasks.py)."""
        command = sent.command
        saga_id = command.saga_id
        if self._expired(sent):
            # Celery discards a message received after its `expires` before any task code
            # runs; the sweep re-sends the attempt after its deadline.
            return StepRun(sent, ran=False, expired=True)
        loaded = self.store.load_for_step(saga_id)
        if loaded is None or not loaded.saga.awaits(*sent.key):
            # A redelivered or superseded attempt: a worker skips it without running it.
            return StepRun(sent, ran=False)
        run = run_attempt(
            self.definition,
            saga_id,
            command.step_index,
            command.direction,
            command.attempt,
            # The context travels as JSON in the message: the step gets its own copy.
            json.loads(json.dumps(dict(sent.saga.context))),
            self._settings,
        )
        decision = self._handle(saga_id, run.event, loaded=loaded)
        return StepRun(sent, True, run.event, decision, run.error)
