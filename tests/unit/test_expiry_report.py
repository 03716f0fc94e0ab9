"""Expired copies of a step (issue 14, item 6 review): a copy a worker discarded unstarted
at its start-by time is reported, and when it was the latest copy sent the attempt is
re-sent at once instead of at its deadline."""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace
from typing import Any

from saga_worker.core.decision import Limits
from saga_worker.core.definition import SagaDefinition, Step, StepInput
from saga_worker.core.events import AttemptExpired, StartRequested
from saga_worker.core.model import Attempt, Direction, Saga
from saga_worker.core.retry import RetryPolicy
from saga_worker.core.transition import start, transition
from saga_worker.testing import FakeClock
from saga_worker.worker.expiry import expiry_report

LIMITS = Limits(stall_grace_seconds=30, max_recoveries=2)


def noop(call: StepInput) -> dict[str, Any]:
    return {}


ONE = SagaDefinition(
    "exp", [Step("a", noop, retry=RetryPolicy(max_attempts=1), timeout_seconds=60)]
)


def pending_of(saga: Saga) -> Attempt:
    assert saga.pending is not None
    return saga.pending


def started() -> tuple[FakeClock, Saga]:
    clock = FakeClock()
    decision = start(ONE, StartRequested("s", "exp", {}), clock(), LIMITS)
    return clock, decision.saga


def test_the_latest_copy_expired_is_sent_again_at_once_with_a_doubled_allowance() -> None:
    clock, saga = started()
    pending = pending_of(saga)
    event = AttemptExpired(0, Direction.FORWARD, 1, pending.start_by, "system:recovery")
    later = clock.advance(31)  # past start-by, long before the deadline (start-by + 60 s)
    assert later < pending.deadline
    decision = transition(ONE, saga, event, later, LIMITS)
    assert decision.ignored is None
    resent = decision.saga.pending
    assert resent is not None
    assert (resent.number, resent.recoveries, resent.allowance) == (1, 1, 60.0)
    assert resent.uncertain is False  # the discarded copy never ran
    assert resent.not_before == later and len(decision.commands) == 1
    (row,) = [e for e in decision.audit if e.event_type == "saga_recovered"]
    assert row.event_data["reason"] == "expired"
    # The same report again (or one for that older copy) changes nothing.
    again = transition(ONE, decision.saga, event, later, LIMITS)
    assert again.ignored is not None and again.commands == ()


def test_an_expiry_that_cannot_mean_no_copy_can_start_is_ignored() -> None:
    clock, saga = started()
    pending = pending_of(saga)
    early = AttemptExpired(0, Direction.FORWARD, 1, pending.start_by)
    # This host's clock is not past the start-by yet (skew): the sweep handles it later.
    assert transition(ONE, saga, early, clock(), LIMITS).ignored is not None
    # A copy with another start-by is not the latest one sent.
    older = AttemptExpired(0, Direction.FORWARD, 1, pending.start_by - timedelta(seconds=5))
    assert transition(ONE, saga, older, clock.advance(40), LIMITS).ignored is not None
    # Another attempt's copy.
    other = AttemptExpired(0, Direction.FORWARD, 2, pending.start_by)
    assert transition(ONE, saga, other, clock(), LIMITS).ignored is not None


def test_an_attempt_whose_copies_keep_expiring_fails_as_stalled_too_often() -> None:
    clock, saga = started()
    for _ in range(LIMITS.max_recoveries):
        p = pending_of(saga)
        clock.advance_to(p.start_by + timedelta(seconds=1))
        saga = transition(
            ONE, saga, AttemptExpired(0, Direction.FORWARD, 1, p.start_by), clock(), LIMITS
        ).saga
    p = pending_of(saga)
    clock.advance_to(p.start_by + timedelta(seconds=1))
    final = transition(
        ONE, saga, AttemptExpired(0, Direction.FORWARD, 1, p.start_by), clock(), LIMITS
    )
    assert final.saga.state.is_terminal or final.saga.state.value == "COMPENSATING"
    assert "stalled 3 times" in (final.saga.error or "")
    failed = [e for e in final.audit if e.event_type == "step_failed"]
    assert failed and failed[0].event_data["error_type"] == "StalledTooOften"


def request(**fields: Any) -> Any:
    base: dict[str, Any] = {
        "delivery_info": {"redelivered": False, "routing_key": "saga.exp.v1"},
        "kwargs": {
            "saga_id": "s",
            "step_index": 0,
            "direction": "forward",
            "attempt": 1,
            "token": "t" * 64,
            "saga_type": "exp",
            "context": {"secret": "x"},
        },
        "expires": "2026-01-15T12:00:30+00:00",
    }
    return SimpleNamespace(**{**base, **fields})


def test_a_discarded_first_delivery_is_reported_to_its_own_queue_without_its_context() -> None:
    found = expiry_report(request())
    assert found is not None
    report, queue = found
    assert queue == "saga.exp.v1"
    assert report == {
        "saga_id": "s",
        "step_index": 0,
        "direction": "forward",
        "attempt": 1,
        "token": "t" * 64,
        "outcome": "expired",
        "start_by": "2026-01-15T12:00:30+00:00",
    }


def test_a_redelivered_or_malformed_copy_is_not_reported() -> None:
    # An earlier delivery of a redelivered message may have started: only the sweep may act.
    assert expiry_report(request(delivery_info={"redelivered": True, "routing_key": "q"})) is None
    assert expiry_report(request(kwargs={"saga_id": "s"})) is None
    assert expiry_report(request(kwargs=["not", "a", "dict"])) is None
    assert expiry_report(request(expires=None)) is None
    assert expiry_report(request(delivery_info={})) is None
