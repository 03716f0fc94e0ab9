"""SagaTestHarness: saga definitions run through the real engine, in-process, no broker.

Each test asserts the exact audit sequence, so a harness (or engine) that skipped, doubled
or reordered a transition fails here.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import pytest

from saga_worker import NonRetryableStepError, registry
from saga_worker.core.decision import Limits
from saga_worker.core.definition import Remote, SagaDefinition, Step, StepInput
from saga_worker.core.events import StepFailed, StepSucceeded
from saga_worker.core.model import Direction, SagaState
from saga_worker.core.retry import RetryPolicy
from saga_worker.errors import InvalidRequest, UnknownSagaType
from saga_worker.examples import backtest_workflow
from saga_worker.testing import DEFAULT_START, HarnessError, SagaTestHarness

FWD, COMP = Direction.FORWARD, Direction.COMPENSATE
NO_JITTER = RetryPolicy(max_attempts=3, initial_delay_seconds=2, max_delay_seconds=60, jitter=0)


class Script:
    """Local step functions that fail as told and record every call they get."""

    def __init__(self, **failures: int) -> None:
        # "charge": attempts 1..n of charge's action fail; "charge_undo": of its compensation.
        self.failures = failures
        self.calls: list[StepInput] = []

    def __call__(self, call: StepInput) -> Mapping[str, Any]:
        self.calls.append(call)
        key = call.step_name + ("_undo" if call.direction is COMP else "")
        if self.failures.get(key, 0) >= call.attempt:
            raise RuntimeError(f"{key} attempt {call.attempt} failed")
        return {key: call.attempt}

    def ran(self) -> list[tuple[str, int]]:
        return [
            (c.step_name + ("_undo" if c.direction is COMP else ""), c.attempt) for c in self.calls
        ]


def order(script: Script, *, retry: RetryPolicy = NO_JITTER) -> SagaDefinition:
    return SagaDefinition(
        "order",
        [
            Step(name, script, compensate=script, retry=retry, timeout_seconds=10)
            for name in ("reserve", "charge", "ship")
        ],
    )


HAPPY = (
    ["saga_start", "step_start", "step_complete"]
    + [
        "step_start",
        "step_complete",
    ]
    * 2
    + ["saga_complete"]
)


# -- the example definition -------------------------------------------------------------


def test_backtest_example_completes() -> None:
    h = SagaTestHarness(backtest_workflow)
    h.start({"strategy_id": 7}, saga_id="bt-happy", user_id="analyst")
    runs = h.run_until_settled()
    assert [(r.attempt.step_name, r.ran) for r in runs] == [
        ("create_backtest", True),
        ("run_strategy", True),
        ("save_results", True),
    ]
    assert h.saga.state is SagaState.COMPLETED
    assert h.audit_events() == HAPPY
    assert h.saga.context["saved"] is True and h.saga.context["results"]["strategy_id"] == 7
    assert {row["user_id"] for row in h.audit_trail()} == {"analyst"}
    assert h.verify_audit() == []


def test_backtest_flaky_step_is_retried_with_backoff_then_completes() -> None:
    h = SagaTestHarness(backtest_workflow)
    h.start({"strategy_id": 3, "flaky_step": {"step": "run_strategy", "failures": 2}})
    h.run_until_settled()
    assert h.saga.state is SagaState.COMPLETED
    assert h.audit_events() == [
        "saga_start",
        "step_start",
        "step_complete",
        "step_start",
        "step_retry",
        "step_start",
        "step_retry",
        "step_start",
        "step_complete",
        "step_start",
        "step_complete",
        "saga_complete",
    ]
    retries = [r for r in h.audit_trail() if r["event_type"] == "step_retry"]
    assert [r["event_data"]["error_type"] for r in retries] == ["InjectedFailure"] * 2
    # Each retry was delivered at its not_before: the clock moved by the backoff delays.
    delays = sum(r["event_data"]["delay_seconds"] for r in retries)
    assert h.clock() - DEFAULT_START == timedelta(seconds=delays)
    assert h.saga.retries == 2


def test_backtest_failing_step_is_retried_then_compensated() -> None:
    h = SagaTestHarness(backtest_workflow)
    h.start({"strategy_id": 1, "fail_step": "save_results"})
    h.run_until_settled()
    assert h.saga.state is SagaState.COMPENSATED
    assert h.audit_events() == [
        "saga_start",
        "step_start",
        "step_complete",
        "step_start",
        "step_complete",
        "step_start",
        "step_retry",
        "step_start",
        "step_retry",
        "step_start",
        "step_failed",
        "compensation_start",
        "compensation_complete",
        "compensation_start",
        "compensation_complete",
        "saga_compensated",
    ]
    assert h.saga.compensated_steps == ("run_strategy", "create_backtest")
    assert h.verify_audit() == []


def test_backtest_failing_compensation_ends_failed() -> None:
    h = SagaTestHarness(backtest_workflow)
    h.start({"strategy_id": 1, "fail_step": "run_strategy", "fail_compensation": "create_backtest"})
    h.run_until_settled()
    assert h.saga.state is SagaState.FAILED
    assert h.saga.failed_compensations == ("create_backtest",)
    assert h.audit_events()[-8:] == [
        "step_failed",
        "compensation_start",
        "compensation_retry",
        "compensation_start",
        "compensation_retry",
        "compensation_start",
        "compensation_failed",
        "saga_failed",
    ]
    assert h.queued == [] and h.verify_audit() == []


# -- small definitions ----------------------------------------------------------------


def test_steps_get_what_a_worker_gives_them_and_outputs_merge_into_the_context() -> None:
    script = Script()
    h = SagaTestHarness(order(script))
    h.start({"amount": 5}, saga_id="o-1")
    h.run_until_settled()
    first = script.calls[0]
    assert (first.saga_id, first.saga_type, first.step_name, first.direction) == (
        "o-1",
        "order",
        "reserve",
        FWD,
    )
    assert (first.attempt, first.idempotency_key, first.context) == (
        1,
        "o-1:reserve",
        {"amount": 5},
    )
    assert script.calls[2].context == {"amount": 5, "reserve": 1, "charge": 1}
    assert h.saga.context == {"amount": 5, "reserve": 1, "charge": 1, "ship": 1}
    assert h.audit_events() == HAPPY
    assert [(s.step_name, s.command.attempt, s.saga.version) for s in h.sent] == [
        ("reserve", 1, 1),
        ("charge", 1, 2),
        ("ship", 1, 3),
    ]


def test_retries_then_compensation_in_reverse_order() -> None:
    script = Script(ship=3)
    h = SagaTestHarness(order(script))
    h.start({})
    runs = h.run_until_settled()
    assert script.ran() == [
        ("reserve", 1),
        ("charge", 1),
        ("ship", 1),
        ("ship", 2),
        ("ship", 3),
        ("charge_undo", 1),
        ("reserve_undo", 1),
    ]
    assert [type(r.event).__name__ for r in runs].count("StepFailed") == 3
    assert isinstance(runs[2].error, RuntimeError)
    assert h.audit_events() == [
        "saga_start",
        "step_start",
        "step_complete",
        "step_start",
        "step_complete",
        "step_start",
        "step_retry",
        "step_start",
        "step_retry",
        "step_start",
        "step_failed",
        "compensation_start",
        "compensation_complete",
        "compensation_start",
        "compensation_complete",
        "saga_compensated",
    ]
    assert h.saga.error == "step 'ship' failed: ship attempt 3 failed"
    # Backoff 2 s then 4 s (no jitter): the clock moved to each retry's not_before.
    assert h.clock() - DEFAULT_START == timedelta(seconds=6)


def test_non_retryable_error_fails_the_step_at_once() -> None:
    def refuse(call: StepInput) -> Mapping[str, Any]:
        raise NonRetryableStepError("amount must be positive")

    script = Script()
    definition = SagaDefinition(
        "order", [Step("reserve", script, compensate=script), Step("charge", refuse)]
    )
    h = SagaTestHarness(definition)
    h.start({})
    h.run_until_settled()
    assert h.audit_events() == [
        "saga_start",
        "step_start",
        "step_complete",
        "step_start",
        "step_failed",
        "compensation_start",
        "compensation_complete",
        "saga_compensated",
    ]
    failed = h.audit_trail()[4]
    assert failed["event_data"]["retryable"] is False
    assert failed["error_message"] == "amount must be positive"
    assert "NonRetryableStepError" in failed["error_stack_trace"]


def test_compensation_failure_ends_failed_and_an_operator_retry_finishes_the_rollback() -> None:
    script = Script(ship=3, reserve_undo=3)
    h = SagaTestHarness(order(script, retry=RetryPolicy(max_attempts=1)))
    h.start({})
    h.run_until_settled()
    assert h.saga.state is SagaState.FAILED
    assert h.saga.failed_compensations == ("reserve",)
    assert h.audit_events()[6:] == [
        "step_failed",
        "compensation_start",
        "compensation_complete",
        "compensation_start",
        "compensation_failed",
        "saga_failed",
    ]
    script.failures.clear()  # the operator fixed what the compensation needed
    decision = h.retry("ledger fixed", user_id="ops")
    assert decision.ignored is None
    fresh = h.saga.pending
    # Fresh: above every number the saga issued (issue 14), not derived from its version.
    assert fresh is not None and fresh.number == fresh.first == h.saga.attempt_seq
    assert fresh.number > 1
    h.run_until_settled()
    settled = h.saga  # read again: the steps above moved it on
    assert settled.state is SagaState.COMPENSATED
    assert h.audit_events()[-3:] == [
        "compensation_start",
        "compensation_complete",
        "saga_compensated",
    ]
    retried = h.audit_trail()[-3]
    assert retried["user_id"] == "ops" and retried["event_data"]["operator_retry"] is True
    assert h.verify_audit() == []


def test_abort_mid_flight_waits_for_the_running_step_then_rolls_back() -> None:
    script = Script()
    h = SagaTestHarness(order(script))
    h.start({})
    h.run_next()  # reserve done, charge sent
    decision = h.abort("client cancel", user_id="u9")
    assert decision.commands == () and h.saga.abort_requested
    assert h.saga.state is SagaState.RUNNING  # charge is in flight and cannot be recalled
    h.run_until_settled()
    assert script.ran() == [("reserve", 1), ("charge", 1), ("charge_undo", 1), ("reserve_undo", 1)]
    settled = h.saga  # read again: the steps above moved it on
    assert settled.state is SagaState.ABORTED
    assert h.audit_events() == [
        "saga_start",
        "step_start",
        "step_complete",
        "step_start",
        "abort_requested",
        "step_complete",
        "compensation_start",
        "compensation_complete",
        "compensation_start",
        "compensation_complete",
        "saga_aborted",
    ]
    assert h.abort("again").ignored == "saga is already ABORTED"


def test_held_retry_waits_in_the_store_until_the_clock_passes_and_recover_sends_it() -> None:
    script = Script(charge=1)
    slow = RetryPolicy(max_attempts=2, initial_delay_seconds=60, max_delay_seconds=60, jitter=0)
    h = SagaTestHarness(order(script, retry=slow), limits=Limits(max_broker_delay_seconds=5))
    h.start({})
    h.run_until_settled()
    pending = h.saga.pending
    assert pending is not None and pending.held and pending.number == 2
    assert h.audit_events()[-1] == "step_retry" and h.queued == []
    with pytest.raises(HarnessError, match="held until"):
        h.succeed("charge")
    assert h.recover().examined == 0  # not due yet
    h.advance_clock(59)
    assert h.recover().due == 0
    h.advance_clock(2)
    assert h.recover().due == 1
    assert h.audit_events()[-2:] == ["step_retry", "step_start"]
    h.run_until_settled()
    assert h.saga.state is SagaState.COMPLETED
    assert script.ran()[1:3] == [("charge", 1), ("charge", 2)]


def test_abort_cancels_a_held_retry_and_rolls_back_at_once() -> None:
    script = Script(charge=1)
    slow = RetryPolicy(max_attempts=2, initial_delay_seconds=60, max_delay_seconds=60, jitter=0)
    h = SagaTestHarness(order(script, retry=slow))
    h.start({})
    h.run_until_settled()
    h.abort("stop")
    assert h.audit_events()[-2:] == ["abort_requested", "compensation_start"]
    h.run_until_settled()
    assert h.saga.state is SagaState.ABORTED
    assert ("charge", 2) not in script.ran()


def test_duplicate_start_is_ignored() -> None:
    script = Script()
    h = SagaTestHarness(order(script))
    assert h.start({"n": 1}, saga_id="dup").created
    again = h.start({"n": 2}, saga_id="dup")
    assert not again.created and again.decision is None
    assert len(h.sent) == 1
    assert h.audit_events() == ["saga_start", "step_start"]
    h.run_until_settled()
    assert h.saga.context["n"] == 1


def test_a_failed_send_leaves_a_stalled_saga_that_recover_re_sends() -> None:
    script = Script()
    h = SagaTestHarness(order(script), limits=Limits(stall_grace_seconds=5))
    h.dispatcher.fail_next()
    assert h.start({}).created
    assert h.sent == [] and [f.step_name for f in h.dispatcher.failed] == ["reserve"]
    assert h.audit_events() == ["saga_start", "step_start"]  # committed before the send
    with pytest.raises(HarnessError, match="no message"):
        h.run_next()
    with pytest.raises(HarnessError, match="never sent"):
        h.succeed("reserve")
    h.advance_clock(15)  # the deadline: timeout 10 + grace 5, not passed yet
    assert h.recover().examined == 0
    h.advance_clock(1)
    assert h.recover().recovered == 1
    assert h.audit_events() == ["saga_start", "step_start", "saga_recovered", "step_start"]
    assert h.saga.pending is not None and h.saga.pending.recoveries == 1
    h.run_until_settled()
    assert h.saga.state is SagaState.COMPLETED
    assert script.ran() == [("reserve", 1), ("charge", 1), ("ship", 1)]
    assert h.verify_audit() == []


def test_an_attempt_that_keeps_stalling_is_given_up_after_max_recoveries() -> None:
    script = Script()
    h = SagaTestHarness(order(script), limits=Limits(stall_grace_seconds=5, max_recoveries=1))
    h.dispatcher.fail_next(2)
    h.start({})  # reserve's send is lost
    h.advance_clock(16)
    assert h.recover().recovered == 1  # and the re-send is lost too
    assert h.queued == []
    h.advance_clock(16)  # the re-send has twice the queue allowance: not stalled yet
    assert h.recover().gave_up == 0
    h.advance_clock(5)
    assert h.recover().gave_up == 1
    h.run_until_settled()
    assert h.saga.state is SagaState.COMPENSATED
    assert h.audit_events() == [
        "saga_start",
        "step_start",
        "saga_recovered",
        "step_start",
        "step_failed",
        "compensation_start",
        "compensation_complete",
        "saga_compensated",
    ]
    failed = h.audit_trail()[4]
    assert failed["event_data"]["error_type"] == "StalledTooOften"
    assert failed["event_data"]["timed_out"] is True
    # Its outcome is unknown (a lost copy may have run): reserve's own compensation runs.
    assert script.ran() == [("reserve_undo", 1)]


def test_a_superseded_message_is_skipped_without_running_the_step() -> None:
    script = Script()
    h = SagaTestHarness(order(script), limits=Limits(stall_grace_seconds=5))
    h.start({})
    h.retry(force=True)  # a second copy of reserve's attempt, both inside their start-by
    assert [s.key for s in h.queued] == [(0, FWD, 1), (0, FWD, 1)]
    first, second = h.run_next(), h.run_next()
    assert first.ran and not second.ran and second.event is None and not second.expired
    assert script.ran() == [("reserve", 1)]


def test_a_message_past_its_start_by_is_discarded_and_the_re_sent_copy_runs() -> None:
    """A worker discards a step message received after its `expires` (the start-by time);
    the harness does too, so the stale first copy does not run 11 s after it expired."""
    script = Script()
    h = SagaTestHarness(order(script), limits=Limits(stall_grace_seconds=5))
    h.start({})  # start-by = send + 5 s, deadline + 10 s
    h.advance_clock(16)  # reserve's message sat in the queue past its start-by and deadline
    assert h.recover().recovered == 1
    stale, fresh = h.run_next(), h.run_next()
    start_by = stale.attempt.command.start_by
    assert start_by is not None and h.clock() > start_by
    assert stale.expired and not stale.ran and stale.event is None
    assert fresh.ran and not fresh.expired and fresh.attempt.command.start_by is not None
    assert fresh.attempt.command.start_by > start_by
    assert script.ran() == [("reserve", 1)]
    assert h.audit_events()[:4] == ["saga_start", "step_start", "saga_recovered", "step_start"]


def test_remote_steps_wait_for_a_result_the_test_delivers() -> None:
    script = Script()
    definition = SagaDefinition(
        "place_order",
        [
            Step("reserve", script, compensate=script),
            Step(
                "book",
                Remote("trading.book", "trading"),
                compensate=Remote("trading.cancel", "trading"),
            ),
        ],
    )
    h = SagaTestHarness(definition)
    h.start({})
    assert len(h.run_until_settled()) == 1  # stops at the remote step
    assert [(s.task_name, s.remote) for s in h.queued] == [("trading.book", True)]
    with pytest.raises(HarnessError, match=r"remote task 'trading\.book'"):
        h.run_next()
    with pytest.raises(HarnessError, match="waits for book"):
        h.succeed("reserve")
    decision = h.fail("book", "NonRetryableStepError", "market closed")
    assert [e.event_type for e in decision.audit] == ["step_failed", "compensation_start"]
    h.run_until_settled()
    assert h.saga.state is SagaState.COMPENSATED

    h.start({})
    h.run_until_settled()
    h.succeed("book", {"trade_id": 42})
    settled = h.saga  # read again: the steps above moved it on
    assert settled.state is SagaState.COMPLETED and settled.context["trade_id"] == 42


def test_a_remote_result_for_a_message_past_its_start_by_is_refused() -> None:
    """The remote service's Celery discards the expired message too: no result comes."""
    definition = SagaDefinition(
        "remote_only", [Step("book", Remote("trading.book", "trading"), timeout_seconds=10)]
    )
    h = SagaTestHarness(definition, limits=Limits(stall_grace_seconds=5))
    h.start({})
    h.advance_clock(6)
    with pytest.raises(HarnessError, match="expired unstarted"):
        h.succeed("book")
    h.advance_clock(10)  # past the deadline: start-by + the timeout
    assert h.recover().recovered == 1
    h.succeed("book", {"trade_id": 7})
    assert h.saga.state is SagaState.COMPLETED


def test_succeed_refuses_an_output_that_is_not_a_json_object() -> None:
    h = SagaTestHarness(order(Script()))
    h.start({})
    decision = h.succeed("reserve", {"when": object()})
    assert [e.event_type for e in decision.audit] == ["step_retry", "step_start"]
    assert decision.audit[0].event_data["error_type"] == "StepOutputError"


def test_a_step_returning_a_non_json_value_fails_its_attempt() -> None:
    def bad(call: StepInput) -> Any:
        return ["not", "an", "object"]

    h = SagaTestHarness(SagaDefinition("bad", [Step("only", bad, retry=RetryPolicy(1))]))
    h.start({})
    run = h.run_next()
    assert isinstance(run.event, StepFailed) and run.event.error_type == "StepOutputError"
    assert h.saga.state is SagaState.COMPENSATED


def test_fail_fast_raises_the_step_exception_after_recording_it() -> None:
    def broken(call: StepInput) -> Mapping[str, Any]:
        return {"total": call.context["missing"]}

    h = SagaTestHarness(SagaDefinition("broken", [Step("only", broken)]))
    h.start({})
    with pytest.raises(KeyError, match="missing"):
        h.run_until_settled(fail_fast=True)
    assert h.audit_events()[-2:] == ["step_retry", "step_start"]


def test_run_until_settled_stops_a_runaway_saga() -> None:
    script = Script(reserve=1000)
    forever = RetryPolicy(max_attempts=1000, initial_delay_seconds=0, jitter=0)
    h = SagaTestHarness(order(script, retry=forever))
    h.start({})
    with pytest.raises(HarnessError, match="not settled after 5 steps"):
        h.run_until_settled(max_steps=5)


def test_start_validates_like_saga_start() -> None:
    h = SagaTestHarness(order(Script()))
    with pytest.raises(InvalidRequest, match="context"):
        h.start({"x": float("nan")})
    with pytest.raises(InvalidRequest, match="saga_id"):
        h.start({}, saga_id="has spaces")
    with pytest.raises(HarnessError, match="start"):
        _ = h.saga


def test_secrets_are_redacted_in_the_in_memory_audit_trail() -> None:
    h = SagaTestHarness(order(Script()))
    h.start({"password": "hunter2", "card": "4111 1111 1111 1111"})
    snapshot = h.audit_trail()[0]["context_snapshot"]
    assert snapshot == {"password": "***REDACTED***", "card": "************1111"}
    assert h.saga.context["password"] == "hunter2"  # the saga itself keeps it


def test_variants_of_one_saga_type_run_side_by_side_and_leave_the_registry_as_found() -> None:
    fast, slow = Script(), Script(reserve=1)
    a, b = SagaTestHarness(order(fast)), SagaTestHarness(order(slow))
    a.start({})
    b.start({})
    a.run_until_settled()
    b.run_until_settled()
    assert a.audit_events() == HAPPY and "step_retry" in b.audit_events()
    with pytest.raises(UnknownSagaType):
        registry.get("order")
    # A registered definition of the type is put back after each engine call.
    h = SagaTestHarness(backtest_workflow)
    h.start({"strategy_id": 2})
    assert registry.get("backtest_workflow") is backtest_workflow
    assert isinstance(h.run_next().event, StepSucceeded)
