"""Example-based tests of the pure state machine: `start` and `transition`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from saga_worker.core.commands import RunAttempt, attempt_task_id
from saga_worker.core.decision import AuditEvent, Decision, Limits, next_attempt
from saga_worker.core.definition import SagaDefinition, Step
from saga_worker.core.events import (
    AbortRequested,
    AttemptDue,
    AttemptStalled,
    RetryRequested,
    StartRequested,
    StepFailed,
    StepSucceeded,
)
from saga_worker.core.model import Direction, Saga, SagaState
from saga_worker.core.retry import RetryPolicy
from saga_worker.core.transition import start, transition

NOW = datetime(2026, 1, 15, 12, 0, 0, tzinfo=UTC)
FWD = Direction.FORWARD
COMP = Direction.COMPENSATE
R = SagaState.RUNNING
C = SagaState.COMPENSATING

# Step bodies are never called by the core: it only needs them to exist.
NOOP: Any = lambda call: {}  # noqa: E731

NO_JITTER = RetryPolicy(
    max_attempts=3,
    initial_delay_seconds=5.0,
    backoff_factor=2.0,
    max_delay_seconds=60.0,
    jitter=0.0,
)


def make_definition(
    *,
    compensations: tuple[bool, bool, bool] = (True, True, True),
    retry: RetryPolicy = NO_JITTER,
    compensation_retry: RetryPolicy | None = None,
    timeout: float = 10.0,
) -> SagaDefinition:
    return SagaDefinition(
        "order",
        [
            Step(
                name,
                NOOP,
                NOOP if has_comp else None,
                retry=retry,
                timeout_seconds=timeout,
                compensation_retry=compensation_retry,
            )
            for name, has_comp in zip(("reserve", "charge", "ship"), compensations, strict=True)
        ],
    )


DEF = make_definition()
# Broker countdowns for every delay here; held (database) retries have their own tests.
LIMITS = Limits(stall_grace_seconds=30.0, max_recoveries=2, max_broker_delay_seconds=3600)


class Run:
    """Drives one saga through a definition, keeping every decision for inspection."""

    def __init__(
        self,
        definition: SagaDefinition = DEF,
        context: dict[str, Any] | None = None,
        limits: Limits = LIMITS,
    ) -> None:
        self.definition = definition
        self.limits = limits
        self.now = NOW
        first = start(
            definition,
            StartRequested("saga-1", "order", context or {}, user_id="u1", ip_address="10.0.0.1"),
            NOW,
            limits,
        )
        self.decisions: list[Decision] = [first]
        self.saga: Saga = first.saga

    @property
    def last(self) -> Decision:
        return self.decisions[-1]

    def apply(self, event: Any, *, advance: float = 1.0) -> Decision:
        self.now = self.now + timedelta(seconds=advance)
        decision = transition(self.definition, self.saga, event, self.now, self.limits)
        self.decisions.append(decision)
        self.saga = decision.saga
        return decision

    def ok(self, output: dict[str, Any] | None = None) -> Decision:
        p = self.saga.pending
        assert p is not None
        return self.apply(StepSucceeded(p.step_index, p.direction, p.number, output or {}))

    def fail(self, *, retryable: bool = True, message: str = "boom") -> Decision:
        p = self.saga.pending
        assert p is not None
        return self.apply(
            StepFailed(
                p.step_index, p.direction, p.number, "RuntimeError", message, retryable=retryable
            )
        )

    def fail_until_given_up(self) -> None:
        """Fail the pending action/compensation on every attempt it has."""
        p = self.saga.pending
        assert p is not None
        key = (p.step_index, p.direction)
        while (
            self.saga.pending is not None
            and (self.saga.pending.step_index, self.saga.pending.direction) == key
        ):
            self.fail()

    def audit(self) -> list[AuditEvent]:
        return [e for d in self.decisions for e in d.audit]


def types(events: Iterable[AuditEvent]) -> list[str]:
    return [e.event_type for e in events]


def steps_of(events: Iterable[AuditEvent]) -> list[tuple[str, str | None]]:
    return [(e.event_type, e.step_name) for e in events]


def sent(
    step_index: int, direction: Direction, attempt: int, at: datetime, recoveries: int = 0
) -> RunAttempt:
    """The command of an attempt sent at `at` with the first queue allowance (the grace)."""
    start_by = at + timedelta(seconds=LIMITS.stall_grace_seconds)
    task_id = attempt_task_id("saga-1", step_index, direction, attempt, recoveries)
    return RunAttempt("saga-1", step_index, direction, attempt, at, start_by, task_id=task_id)


def only_command(decision: Decision) -> RunAttempt:
    assert len(decision.commands) == 1, decision.commands
    return decision.commands[0]


# --------------------------------------------------------------- happy path ---


def test_start_creates_running_saga_and_sends_first_attempt() -> None:
    run = Run(context={"order_id": 7})
    d = run.last
    saga = d.saga
    assert d.ignored is None
    assert saga.state is R
    assert saga.saga_type == "order"
    assert saga.context == {"order_id": 7}
    assert saga.total_steps == 3
    assert saga.current_step_index == 0
    assert saga.started_at == saga.updated_at == NOW
    assert (saga.user_id, saga.ip_address) == ("u1", "10.0.0.1")
    assert saga.pending is not None
    assert saga.pending.key() == (0, FWD, 1)
    assert saga.pending.not_before == NOW
    # deadline = dispatch time + step timeout + stall grace (docs/recovery.md)
    assert saga.pending.deadline == NOW + timedelta(seconds=10 + 30)
    assert d.commands == (sent(0, FWD, 1, NOW),)
    assert types(d.audit) == ["saga_start", "step_start"]
    saga_start, step_start = d.audit
    assert (saga_start.state_before, saga_start.state_after) == (None, R)
    assert saga_start.step_name is None
    assert (step_start.state_before, step_start.state_after) == (R, R)
    assert (step_start.step_name, step_start.step_index) == ("reserve", 0)
    assert step_start.event_data["attempt"] == 1
    assert all((e.user_id, e.ip_address) == ("u1", "10.0.0.1") for e in d.audit)


def test_happy_path_audit_sequence_and_commands() -> None:
    run = Run()
    for expected_next in (1, 2):
        d = run.ok()
        assert steps_of(d.audit) == [
            ("step_complete", DEF.steps[expected_next - 1].name),
            ("step_start", DEF.steps[expected_next].name),
        ]
        assert only_command(d) == sent(expected_next, FWD, 1, run.now)
        assert all((e.state_before, e.state_after) == (R, R) for e in d.audit)
    d = run.ok()
    assert types(d.audit) == ["step_complete", "saga_complete"]
    assert d.commands == ()
    complete = d.audit[-1]
    assert (complete.state_before, complete.state_after) == (R, SagaState.COMPLETED)
    assert complete.error_message is None
    assert complete.duration_ms == pytest.approx(3000.0)

    assert types(run.audit()) == [
        "saga_start",
        "step_start",
        "step_complete",
        "step_start",
        "step_complete",
        "step_start",
        "step_complete",
        "saga_complete",
    ]
    saga = run.saga
    assert saga.state is SagaState.COMPLETED
    assert saga.pending is None
    assert saga.completed_steps == ("reserve", "charge", "ship")
    assert saga.compensated_steps == ()
    assert saga.retries == 0
    assert saga.error is None
    assert saga.updated_at == run.now


def test_context_merges_outputs_in_order() -> None:
    run = Run(context={"x": 1, "keep": True})
    run.ok({"x": 2, "reserved": "r-1"})
    assert run.saga.context == {"x": 2, "keep": True, "reserved": "r-1"}
    run.ok({"charge_id": "c-1", "nested": {"a": [1, 2]}})
    run.ok({"x": 3})
    assert run.saga.context == {
        "x": 3,
        "keep": True,
        "reserved": "r-1",
        "charge_id": "c-1",
        "nested": {"a": [1, 2]},
    }
    assert run.decisions[1].audit[0].event_data["output_keys"] == ["reserved", "x"]


def test_compensation_output_is_merged_too() -> None:
    run = Run(context={"x": 1})
    run.ok({"reserved": True})
    run.fail_until_given_up()  # charge fails for good: compensate reserve
    run.ok({"reserved": False, "released_at": "t"})
    assert run.saga.state is SagaState.COMPENSATED
    assert run.saga.context == {"x": 1, "reserved": False, "released_at": "t"}


# ---------------------------------------------------------- failure + retry ---


def test_failure_with_retries_then_reverse_compensation_of_completed_steps() -> None:
    run = Run()
    run.ok()
    run.ok()
    # "ship" (index 2) fails on attempts 1 and 2: each time a retry is scheduled.
    for retry_number in (1, 2):
        d = run.fail()
        assert types(d.audit) == ["step_retry", "step_start"]
        retry, restart = d.audit
        assert retry.retry_count == retry_number
        assert retry.step_name == "ship"
        assert retry.error_message == "boom"
        assert retry.event_data["attempt"] == retry_number
        assert (retry.state_before, retry.state_after) == (R, R)
        assert restart.event_data["attempt"] == retry_number + 1
        assert restart.retry_count == retry_number
        cmd = only_command(d)
        assert (cmd.step_index, cmd.direction, cmd.attempt) == (2, FWD, retry_number + 1)
        assert run.saga.retries == retry_number
    # Last attempt fails: step_failed once, then compensations in reverse order.
    d = run.fail()
    assert steps_of(d.audit) == [("step_failed", "ship"), ("compensation_start", "charge")]
    failed = d.audit[0]
    assert (failed.state_before, failed.state_after) == (R, C)
    assert failed.retry_count == 2
    assert failed.event_data["attempt"] == 3
    assert only_command(d) == sent(1, COMP, 1, run.now)
    assert run.saga.state is C
    assert run.saga.error is not None and "ship" in run.saga.error

    d = run.ok()
    assert steps_of(d.audit) == [
        ("compensation_complete", "charge"),
        ("compensation_start", "reserve"),
    ]
    assert only_command(d) == sent(0, COMP, 1, run.now)
    d = run.ok()
    assert steps_of(d.audit) == [("compensation_complete", "reserve"), ("saga_compensated", None)]
    assert d.commands == ()
    end = d.audit[-1]
    assert (end.state_before, end.state_after) == (C, SagaState.COMPENSATED)
    assert end.error_message is not None and "ship" in end.error_message

    saga = run.saga
    assert saga.state is SagaState.COMPENSATED
    assert saga.pending is None
    assert saga.completed_steps == ("reserve", "charge")  # "ship" never completed
    assert saga.compensated_steps == ("charge", "reserve")
    assert saga.failed_compensations == ()
    assert saga.retries == 2
    # The step that failed is never compensated.
    assert ("compensation_start", "ship") not in steps_of(run.audit())
    assert types(run.audit()).count("step_failed") == 1
    assert types(run.audit()).count("step_start") == 2 + 3


def test_first_step_failing_ends_compensated_without_any_compensation() -> None:
    run = Run()
    run.fail_until_given_up()
    assert run.saga.state is SagaState.COMPENSATED
    assert run.last.commands == ()
    assert types(run.last.audit) == ["step_failed", "saga_compensated"]
    assert run.saga.compensated_steps == ()


def test_retry_backoff_puts_not_before_in_the_future() -> None:
    run = Run()
    d = run.fail()
    failed_at = run.now
    cmd = only_command(d)
    # initial 5 s, factor 2, no jitter
    assert cmd.not_before == failed_at + timedelta(seconds=5)
    assert run.saga.pending is not None
    assert run.saga.pending.not_before == cmd.not_before
    # the stall deadline counts from when the attempt may start
    assert run.saga.pending.deadline == cmd.not_before + timedelta(seconds=10 + 30)
    assert d.audit[0].event_data["delay_seconds"] == 5.0
    assert d.audit[1].event_data["not_before"] == cmd.not_before.isoformat()

    d = run.fail()
    assert only_command(d).not_before == run.now + timedelta(seconds=10)


def test_retry_backoff_with_jitter_stays_in_bounds_and_is_deterministic() -> None:
    policy = RetryPolicy(max_attempts=2, initial_delay_seconds=10.0, jitter=0.2)
    definition = make_definition(retry=policy)
    delays = []
    for _ in range(2):
        run = Run(definition)
        cmd = only_command(run.fail())
        delays.append((cmd.not_before - run.now).total_seconds())
    assert delays[0] == delays[1]
    assert 8.0 <= delays[0] <= 12.0


def test_non_retryable_failure_skips_remaining_attempts() -> None:
    run = Run()
    run.ok()
    d = run.fail(retryable=False)
    assert steps_of(d.audit) == [("step_failed", "charge"), ("compensation_start", "reserve")]
    assert d.audit[0].retry_count == 0
    assert d.audit[0].event_data["retryable"] is False
    assert run.saga.retries == 0
    assert "step_retry" not in types(run.audit())


def test_compensation_failure_continues_rollback_and_ends_failed() -> None:
    comp_policy = RetryPolicy(max_attempts=3, initial_delay_seconds=1.0, jitter=0.0)
    run = Run(make_definition(compensation_retry=comp_policy))
    run.ok()
    run.ok()
    run.fail(retryable=False)  # "ship" fails: compensate "charge" then "reserve"
    assert run.saga.pending is not None
    assert run.saga.pending.key() == (1, COMP, 1)
    for retry_number in (1, 2):
        d = run.fail(message="refund refused")
        assert steps_of(d.audit) == [
            ("compensation_retry", "charge"),
            ("compensation_start", "charge"),
        ]
        assert d.audit[0].retry_count == retry_number
        assert only_command(d).attempt == retry_number + 1
        assert only_command(d).not_before > run.now
    d = run.fail(message="refund refused")
    assert steps_of(d.audit) == [
        ("compensation_failed", "charge"),
        ("compensation_start", "reserve"),
    ]
    assert d.audit[0].retry_count == 2
    assert d.audit[0].error_message == "refund refused"
    assert run.saga.state is C
    assert run.saga.failed_compensations == ("charge",)

    d = run.ok()
    assert steps_of(d.audit) == [("compensation_complete", "reserve"), ("saga_failed", None)]
    end = d.audit[-1]
    assert (end.state_before, end.state_after) == (C, SagaState.FAILED)
    assert end.event_data["failed_compensations"] == ["charge"]
    assert end.error_message is not None and "charge" in end.error_message
    saga = run.saga
    assert saga.state is SagaState.FAILED
    assert saga.pending is None
    assert saga.failed_compensations == ("charge",)
    assert saga.compensated_steps == ("reserve",)
    assert saga.error is not None and "compensation failed for: charge" in saga.error
    assert types(run.audit()).count("compensation_failed") == 1


def test_step_without_compensation_is_skipped_in_rollback() -> None:
    run = Run(make_definition(compensations=(True, False, True)))
    run.ok()
    run.ok()
    d = run.fail(retryable=False)
    assert steps_of(d.audit) == [("step_failed", "ship"), ("compensation_start", "reserve")]
    run.ok()
    assert run.saga.state is SagaState.COMPENSATED
    assert run.saga.compensated_steps == ("reserve",)
    assert run.saga.completed_steps == ("reserve", "charge")


def test_no_compensation_left_ends_compensated_at_once() -> None:
    run = Run(make_definition(compensations=(False, False, True)))
    run.ok()
    run.ok()
    d = run.fail(retryable=False)
    assert types(d.audit) == ["step_failed", "saga_compensated"]
    assert d.commands == ()
    assert run.saga.state is SagaState.COMPENSATED


# -------------------------------------------------------------------- abort ---


def test_abort_while_step_in_flight_waits_then_compensates_it_and_ends_aborted() -> None:
    run = Run()
    run.ok()  # "reserve" done, "charge" in flight
    pending_before = run.saga.pending
    d = run.apply(AbortRequested("customer cancelled", user_id="ops", ip_address="::1"))
    assert d.ignored is None
    assert types(d.audit) == ["abort_requested"]
    ev = d.audit[0]
    assert (ev.state_before, ev.state_after) == (R, R)
    assert (ev.step_name, ev.user_id, ev.ip_address) == ("charge", "ops", "::1")
    assert ev.event_data["reason"] == "customer cancelled"
    assert d.commands == ()  # nothing to send: the in-flight attempt decides
    assert run.saga.abort_requested is True
    assert run.saga.state is R
    assert run.saga.pending == pending_before

    d = run.ok()  # the in-flight "charge" completes: it must be compensated too
    assert steps_of(d.audit) == [("step_complete", "charge"), ("compensation_start", "charge")]
    assert only_command(d) == sent(1, COMP, 1, run.now)
    assert run.saga.state is C
    assert run.saga.completed_steps == ("reserve", "charge")

    run.ok()
    d = run.ok()
    assert steps_of(d.audit) == [("compensation_complete", "reserve"), ("saga_aborted", None)]
    assert d.audit[-1].state_after is SagaState.ABORTED
    saga = run.saga
    assert saga.state is SagaState.ABORTED
    assert saga.compensated_steps == ("charge", "reserve")
    assert saga.pending is None
    assert "step_start" not in types(run.audit()[-6:])  # "ship" never started
    assert ("step_start", "ship") not in steps_of(run.audit())


def test_abort_then_in_flight_step_fails_ends_aborted_without_compensating_it() -> None:
    run = Run()
    run.ok()
    run.apply(AbortRequested("stop"))
    # A retryable failure with attempts left: no retry once abort was requested.
    d = run.fail(retryable=True)
    assert steps_of(d.audit) == [("step_failed", "charge"), ("compensation_start", "reserve")]
    assert only_command(d) == sent(0, COMP, 1, run.now)
    d = run.ok()
    assert types(d.audit) == ["compensation_complete", "saga_aborted"]
    assert run.saga.state is SagaState.ABORTED
    assert run.saga.compensated_steps == ("reserve",)
    assert "step_retry" not in types(run.audit())


def test_abort_of_first_step_that_then_fails_ends_aborted_with_nothing_to_undo() -> None:
    run = Run()
    run.apply(AbortRequested("stop"))
    d = run.fail()
    assert types(d.audit) == ["step_failed", "saga_aborted"]
    assert run.saga.state is SagaState.ABORTED
    assert run.saga.compensated_steps == ()


def test_abort_twice_is_ignored() -> None:
    run = Run()
    run.apply(AbortRequested("first"))
    saga = run.saga
    d = run.apply(AbortRequested("second"))
    assert d.ignored
    assert d.saga == saga
    assert d.audit == () and d.commands == ()


def test_abort_during_compensation_is_ignored() -> None:
    run = Run()
    run.ok()
    run.fail(retryable=False)
    assert run.saga.state is C
    saga = run.saga
    d = run.apply(AbortRequested("too late"))
    assert d.ignored
    assert d.saga == saga and d.audit == () and d.commands == ()
    run.ok()
    assert run.saga.state is SagaState.COMPENSATED  # not ABORTED


@pytest.mark.parametrize("outcome", ["complete", "compensate"])
def test_abort_on_terminal_saga_is_ignored(outcome: str) -> None:
    run = Run()
    if outcome == "complete":
        for _ in range(3):
            run.ok()
    else:
        run.fail(retryable=False)
    assert run.saga.state.is_terminal
    saga = run.saga
    d = run.apply(AbortRequested("late"))
    assert d.ignored is not None
    assert d.saga is saga
    assert d.audit == () and d.commands == ()


# ------------------------------------------------------ duplicates and late ---


def test_duplicate_result_is_ignored() -> None:
    run = Run()
    p = run.saga.pending
    assert p is not None
    result = StepSucceeded(p.step_index, p.direction, p.number, {"a": 1})
    run.apply(result)
    saga = run.saga
    d = run.apply(result)
    assert d.ignored is not None
    assert not d.changed
    assert d.saga is saga
    assert d.audit == () and d.commands == ()
    assert run.saga.completed_steps == ("reserve",)


def test_late_result_of_an_earlier_attempt_is_ignored() -> None:
    run = Run()
    run.fail()  # attempt 1 failed, attempt 2 pending
    saga = run.saga
    assert saga.pending is not None and saga.pending.number == 2
    for late in (
        StepSucceeded(0, FWD, 1, {"late": True}),
        StepFailed(0, FWD, 1, "RuntimeError", "late failure"),
    ):
        d = run.apply(late)
        assert d.ignored is not None
        assert d.saga is saga
        assert d.audit == () and d.commands == ()
    run.ok()
    assert "late" not in run.saga.context


def test_result_for_wrong_direction_or_future_attempt_is_ignored() -> None:
    run = Run()
    saga = run.saga
    for wrong in (
        StepSucceeded(0, COMP, 1, {}),
        StepSucceeded(0, FWD, 2, {}),
        StepSucceeded(1, FWD, 1, {}),
        StepFailed(0, FWD, 3, "E", "x"),
    ):
        d = run.apply(wrong)
        assert d.ignored is not None
        assert d.saga is saga
        assert d.audit == () and d.commands == ()


def test_results_after_terminal_state_are_ignored() -> None:
    run = Run()
    for _ in range(3):
        run.ok()
    saga = run.saga
    for late in (
        StepSucceeded(2, FWD, 1, {}),
        StepFailed(2, FWD, 1, "E", "x"),
        AttemptStalled(2, FWD, 1, 0),
    ):
        d = run.apply(late)
        assert d.ignored is not None and d.saga is saga
        assert d.audit == () and d.commands == ()


# ------------------------------------------------------------------ recovery ---


def test_attempt_stalled_resends_the_same_attempt() -> None:
    run = Run()
    run.ok()
    run.fail()  # "charge" attempt 2 pending
    before = run.saga
    p = before.pending
    assert p is not None and p.key() == (1, FWD, 2) and p.recoveries == 0
    d = run.apply(AttemptStalled(1, FWD, 2, recoveries=0), advance=100.0)
    assert d.ignored is None
    assert steps_of(d.audit) == [("saga_recovered", "charge"), ("step_start", "charge")]
    recovered = d.audit[0]
    assert recovered.event_data["attempt"] == 2
    assert recovered.event_data["recoveries"] == 1
    assert (recovered.state_before, recovered.state_after) == (R, R)
    assert d.audit[1].event_data["attempt"] == 2
    # A re-send: twice the queue allowance (the first copy may still wait in a backlog).
    assert only_command(d) == replace(
        sent(1, FWD, 2, run.now, recoveries=1), start_by=run.now + timedelta(seconds=60)
    )
    after = run.saga
    assert after.pending is not None
    assert after.pending.key() == (1, FWD, 2)  # same attempt: no attempt used up
    assert after.pending.recoveries == 1
    assert after.pending.deadline == run.now + timedelta(seconds=2 * 30 + 10)
    assert after.retries == before.retries

    # A second scan that saw the stale recoveries count is ignored.
    d = run.apply(AttemptStalled(1, FWD, 2, recoveries=0))
    assert d.ignored is not None
    assert d.saga is after
    assert d.audit == () and d.commands == ()

    # The re-sent attempt's result is accepted as usual.
    d = run.ok()
    assert types(d.audit) == ["step_complete", "step_start"]


def test_attempt_stalled_for_another_attempt_is_ignored() -> None:
    run = Run()
    run.fail()  # attempt 2 pending
    saga = run.saga
    d = run.apply(AttemptStalled(0, FWD, 1, 0))
    assert d.ignored is not None and d.saga is saga and d.audit == () and d.commands == ()


def test_stalled_compensation_is_recovered_with_compensation_start() -> None:
    run = Run()
    run.ok()
    run.fail(retryable=False)
    d = run.apply(AttemptStalled(0, COMP, 1, 0))
    assert types(d.audit) == ["saga_recovered", "compensation_start"]
    assert only_command(d) == replace(
        sent(0, COMP, 1, run.now, recoveries=1), start_by=run.now + timedelta(seconds=60)
    )
    assert run.saga.state is C


def test_beyond_max_recoveries_the_step_fails_for_good_and_saga_compensates() -> None:
    run = Run(limits=LIMITS)
    run.ok()  # "charge" attempt 1 pending, 3 attempts allowed
    for n in (0, 1):
        d = run.apply(AttemptStalled(1, FWD, 1, recoveries=n))
        assert types(d.audit) == ["saga_recovered", "step_start"]
    d = run.apply(AttemptStalled(1, FWD, 1, recoveries=2))
    # Its outcome is unknown (a copy may have run): charge's own compensation comes first.
    assert steps_of(d.audit) == [("step_failed", "charge"), ("compensation_start", "charge")]
    failed = d.audit[0]
    assert failed.event_data["error_type"] == "StalledTooOften"
    assert failed.event_data["timed_out"] is True
    assert failed.event_data["retryable"] is False
    assert "step_retry" not in types(run.audit())  # attempts left, but no retry
    assert run.saga.state is C
    run.ok()
    run.ok()
    assert run.saga.state is SagaState.COMPENSATED
    assert run.saga.compensated_steps == ("charge", "reserve")


def test_max_recoveries_zero_fails_on_first_stall() -> None:
    run = Run(limits=replace(LIMITS, max_recoveries=0))
    d = run.apply(AttemptStalled(0, FWD, 1, 0))
    assert steps_of(d.audit) == [("step_failed", "reserve"), ("compensation_start", "reserve")]


# ---------------------------------------------------------- audit coherence ---


def _assert_state_chain(run: Run) -> None:
    """Inside each transition, each audit row starts in the state the previous one left."""
    previous: SagaState | None = None
    for decision in run.decisions:
        for event in decision.audit:
            assert event.state_before == previous, (event.event_type, event.step_name)
            previous = event.state_after
        assert previous == decision.saga.state


def test_audit_state_chain_is_continuous_on_failure_paths() -> None:
    run = Run(make_definition(compensation_retry=replace(NO_JITTER, max_attempts=1)))
    run.ok()
    run.ok()
    run.fail_until_given_up()
    run.fail()  # compensation of "charge" fails
    run.ok()
    assert run.saga.state is SagaState.FAILED
    _assert_state_chain(run)


def test_audit_state_chain_is_continuous_after_abort() -> None:
    run = Run()
    run.ok()
    run.apply(AbortRequested("stop"))
    run.ok()
    run.ok()
    run.ok()
    assert run.saga.state is SagaState.ABORTED
    _assert_state_chain(run)


# --------------------------------------------------- retries held in the database ---

HELD_LIMITS = Limits(stall_grace_seconds=30.0, max_broker_delay_seconds=5.0)


def test_long_retry_delay_is_held_in_the_database_not_sent_as_an_eta() -> None:
    run = Run(limits=HELD_LIMITS)  # NO_JITTER: first retry waits 5 s, second 10 s
    run.ok()
    first = run.fail()
    assert types(first.audit) == ["step_retry", "step_start"]  # 5 s: a broker countdown
    second = run.fail()
    assert types(second.audit) == ["step_retry"]
    assert second.commands == ()
    held = run.saga.pending
    assert held is not None and held.held and held.number == 3
    assert held.deadline == held.not_before == run.now + timedelta(seconds=10)
    assert second.audit[0].event_data["delay_seconds"] == 10.0


def test_due_held_attempt_is_sent_with_its_step_start() -> None:
    run = Run(limits=HELD_LIMITS)
    run.fail()
    run.fail()
    held = run.saga.pending
    assert held is not None and held.held
    due = run.apply(AttemptDue(held.step_index, held.direction, held.number), advance=11)
    assert types(due.audit) == ["step_start"]
    assert due.audit[0].retry_count == 2
    (cmd,) = due.commands
    assert (cmd.step_index, cmd.attempt, cmd.not_before) == (0, 3, run.now)
    sent = run.saga.pending
    assert sent is not None and not sent.held
    assert sent.deadline == run.now + timedelta(seconds=10 + 30)
    # the sweep's second look at the same attempt changes nothing
    assert run.apply(AttemptDue(0, FWD, 3)).ignored


def test_abort_cancels_a_held_retry_and_rolls_back_at_once() -> None:
    run = Run(limits=HELD_LIMITS)
    run.ok()
    run.fail()
    run.fail()
    assert run.saga.pending is not None and run.saga.pending.held
    d = run.apply(AbortRequested(reason="stop", user_id="op"))
    assert types(d.audit) == ["abort_requested", "compensation_start"]
    assert run.saga.state is C
    (cmd,) = d.commands
    assert (cmd.step_index, cmd.direction) == (0, COMP)
    run.ok()
    assert run.saga.state is SagaState.ABORTED


# ------------------------------------------------------- operator retry of FAILED ---


def _failed_saga() -> Run:
    """reserve and charge completed, ship fails; both compensations fail for good."""
    run = Run()
    run.ok()
    run.ok()
    run.fail_until_given_up()  # ship
    run.fail_until_given_up()  # charge's compensation
    run.fail_until_given_up()  # reserve's compensation
    assert run.saga.state is SagaState.FAILED
    assert run.saga.failed_compensations == ("charge", "reserve")
    return run


def test_operator_retry_reruns_failed_compensations_highest_step_first() -> None:
    run = _failed_saga()
    d = run.apply(RetryRequested(user_id="oncall"))
    assert types(d.audit) == ["compensation_start"]
    first = d.audit[0]
    assert (first.state_before, first.state_after) == (SagaState.FAILED, C)
    assert first.user_id == "oncall"
    assert first.event_data["operator_retry"] is True
    assert first.event_data["retrying"] == ["charge", "reserve"]
    (cmd,) = d.commands
    # Fresh: above attempt 3, the highest the saga issued (ship's and each compensation's).
    assert (cmd.step_index, cmd.direction, cmd.attempt) == (1, COMP, 4)
    assert run.saga.failed_compensations == ()
    run.ok()
    assert run.saga.pending is not None and run.saga.pending.step_index == 0
    run.ok()
    assert run.saga.state is SagaState.COMPENSATED
    assert run.saga.compensated_steps == ("charge", "reserve")


def test_operator_retry_that_fails_again_ends_failed_with_only_what_still_fails() -> None:
    run = _failed_saga()
    run.apply(RetryRequested(user_id="oncall"))
    run.ok()  # charge's compensation works now
    run.fail_until_given_up()  # reserve's still fails
    assert run.saga.state is SagaState.FAILED
    assert run.saga.failed_compensations == ("reserve",)
    assert run.saga.compensated_steps == ("charge",)


def test_operator_retry_of_a_live_saga_resends_its_pending_attempt_now() -> None:
    run = Run()
    run.ok()
    pending = run.saga.pending
    assert pending is not None
    d = run.apply(RetryRequested(user_id="oncall", reason="stuck", force=True))
    assert types(d.audit) == ["saga_recovered", "step_start"]
    assert {e.user_id for e in d.audit} == {"oncall"}
    assert d.audit[0].event_data["operator_retry"] is True
    (cmd,) = d.commands
    assert (cmd.step_index, cmd.attempt) == (pending.step_index, pending.number)
    assert run.saga.pending is not None and run.saga.pending.recoveries == 1
    # a stall signal computed before the operator's retry is now stale
    stale = AttemptStalled(pending.step_index, pending.direction, pending.number, 0)
    assert run.apply(stale).ignored


def test_operator_retry_of_an_attempt_in_flight_needs_force() -> None:
    run = Run()
    run.ok()
    pending = run.saga.pending
    assert pending is not None
    d = run.apply(RetryRequested(user_id="oncall"))
    assert d.ignored is not None
    assert "in flight and not stalled" in d.ignored and "--force" in d.ignored
    assert "attempt 1 of charge (forward)" in d.ignored
    # Past its deadline it is stalled: no force needed.
    seconds = (pending.deadline - run.now).total_seconds() + 1
    assert run.apply(RetryRequested(user_id="oncall"), advance=seconds).ignored is None


def test_operator_retry_stops_at_max_recoveries_like_the_sweep() -> None:
    run = Run()
    run.ok()
    for _ in range(LIMITS.max_recoveries):
        assert run.apply(RetryRequested(user_id="op", force=True)).ignored is None
    d = run.apply(RetryRequested(user_id="op", force=True))
    assert d.ignored is not None and "SAGA_MAX_RECOVERIES=" in d.ignored


def test_operator_retry_of_a_held_attempt_sends_it_without_force() -> None:
    run = Run(limits=HELD_LIMITS)
    run.fail()
    run.fail()
    held = run.saga.pending
    assert held is not None and held.held and held.deadline > run.now
    d = run.apply(RetryRequested(user_id="op"), advance=0)
    assert types(d.audit) == ["saga_recovered", "step_start"]
    assert run.saga.pending is not None and not run.saga.pending.held


def test_operator_retry_of_a_finished_saga_is_ignored() -> None:
    run = Run()
    run.ok()
    run.ok()
    run.ok()
    assert run.saga.state is SagaState.COMPLETED
    assert run.apply(RetryRequested(user_id="x")).ignored


def test_operator_retry_uses_fresh_attempt_numbers_so_old_results_cannot_pass() -> None:
    run = _failed_saga()
    run.saga = replace(run.saga, version=17)  # what the store loaded: not where numbers come from
    d = run.apply(RetryRequested(user_id="oncall"))
    (cmd,) = d.commands
    assert cmd.attempt == 4  # above attempt_seq (3), the highest number the saga issued
    # the original first attempt's result arriving late is not the new attempt
    assert run.apply(StepSucceeded(1, COMP, 1, {})).ignored
    run.fail()
    retry = run.last.audit[0]
    assert (retry.event_type, retry.retry_count) == ("compensation_retry", 1)
    assert run.saga.pending is not None and run.saga.pending.number == 5


def test_engine_default_timeout_applies_when_step_and_saga_set_none() -> None:
    bare = SagaDefinition("bare", [Step("only", NOOP)])
    limits = replace(LIMITS, default_step_timeout_seconds=7.0, stall_grace_seconds=1.0)
    d = start(bare, StartRequested("s-bare", "bare", {}), NOW, limits)
    assert d.audit[-1].event_data["timeout_seconds"] == 7.0
    assert d.saga.pending is not None
    assert d.saga.pending.deadline == NOW + timedelta(seconds=8)
    # a saga-level default wins over the engine's
    own = SagaDefinition("own", [Step("only", NOOP)], default_timeout_seconds=3.0)
    assert start(own, StartRequested("s-own", "own", {}), NOW, limits).saga.pending.deadline == (  # type: ignore[union-attr]
        NOW + timedelta(seconds=4)
    )


def test_next_attempt_tells_a_retried_attempt_from_a_final_failure() -> None:
    """What a step task reports to Celery: RETRY only while the same step gets another try."""
    run = Run()
    run.ok()
    p = run.saga.pending
    assert p is not None
    first = StepFailed(p.step_index, p.direction, p.number, "RuntimeError", "boom")
    retried = run.apply(first)
    following = next_attempt(retried, first)
    assert following is not None and (following.step_index, following.number) == (1, 2)
    assert following.not_before == run.now + timedelta(seconds=5)
    # The same result again is ignored by the engine: nothing follows from it.
    assert next_attempt(run.apply(first), first) is None
    run.fail()
    p = run.saga.pending
    assert p is not None and p.number == 3
    last = StepFailed(p.step_index, p.direction, p.number, "RuntimeError", "boom")
    given_up = run.apply(last)
    # The compensation of step 0 is pending now, which is not another attempt of step 1.
    assert given_up.saga.pending is not None and given_up.saga.pending.direction is COMP
    assert next_attempt(given_up, last) is None
    fatal = Run()
    p = fatal.saga.pending
    assert p is not None
    event = StepFailed(p.step_index, p.direction, p.number, "Bad", "no", retryable=False)
    assert next_attempt(fatal.apply(event), event) is None


def test_operator_retry_of_a_failed_saga_with_nothing_failed_is_ignored_not_raised() -> None:
    run = _failed_saga()
    run.saga = replace(run.saga, failed_compensations=())
    d = run.apply(RetryRequested(user_id="oncall"))
    assert d.ignored and "no failed compensation" in d.ignored
    assert d.commands == () and d.audit == ()


def test_operator_retry_naming_a_step_the_definition_no_longer_has_is_ignored() -> None:
    run = _failed_saga()
    run.saga = replace(run.saga, failed_compensations=("charge", "renamed_step"))
    d = run.apply(RetryRequested(user_id="oncall"))
    assert d.ignored and "renamed_step" in d.ignored
    assert d.commands == ()


@given(
    failed=st.lists(
        st.sampled_from(["reserve", "charge", "ship", "gone", ""]), max_size=4, unique=True
    ),
    state=st.sampled_from(list(SagaState)),
)
def test_operator_retry_is_total_over_state_and_failed_compensations(
    failed: list[str], state: SagaState
) -> None:
    run = _failed_saga()
    run.saga = replace(run.saga, state=state, failed_compensations=tuple(failed))
    d = transition(run.definition, run.saga, RetryRequested(user_id="oncall"), run.now)
    assert d.ignored is not None or d.commands
