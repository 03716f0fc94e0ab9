"""Waits in the pure core (issue 16, DESIGN section 10): WaitFor and its signals, Sleep,
Approval and its votes. A wait in progress is a held attempt whose due time is its timeout;
nothing is ever sent for it."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from saga_worker.core.definition import SagaDefinition, Step
from saga_worker.core.events import (
    AbortRequested,
    AttemptDue,
    AttemptExpired,
    AttemptStalled,
    ParkRequested,
    RetryRequested,
    SignalReceived,
    StepFailed,
    StepSucceeded,
    UnparkRequested,
    VoteCast,
)
from saga_worker.core.model import Direction, SagaState
from saga_worker.core.parking import park, record_abort
from saga_worker.core.stages import Approval, Parallel, Sleep, WaitFor
from saga_worker.core.waits import MAX_SEEN_SIGNALS
from tests.unit.test_groups import attempt_of, compensate_all, ignored_without_effect, ok_at
from tests.unit.test_transition import (
    FWD,
    NO_JITTER,
    NOOP,
    C,
    R,
    Run,
    only_command,
    sent,
    steps_of,
    types,
)


def around(*waits: Any) -> SagaDefinition:
    """reserve (leaf 0), then `waits`, then ship."""
    return SagaDefinition(
        "waits",
        [
            Step("reserve", NOOP, NOOP, retry=NO_JITTER, timeout_seconds=10),
            *waits,
            Step("ship", NOOP, NOOP, retry=NO_JITTER, timeout_seconds=10),
        ],
    )


PAYMENT = around(WaitFor("await_payment", signal="payment", timeout_seconds=600))
NAP = around(Sleep("cool_off", 300))
SIGN_OFF = around(Approval("sign_off", approvers=2, timeout_seconds=3600))
STARTER = "u1"  # the user Run starts its saga as


def waiting(definition: SagaDefinition) -> Run:
    """A run whose first step completed: the wait at leaf 1 is in progress."""
    run = Run(definition)
    run.ok()
    return run


def due(run: Run, leaf: int = 1) -> Any:
    """The due scan fires the wait at `leaf` once its timeout has passed."""
    wait = attempt_of(run, leaf)
    late = (wait.not_before - run.now).total_seconds() + 1
    return run.apply(AttemptDue(leaf, FWD, wait.number), advance=max(late, 0))


# -------------------------------------------------------------------- WaitFor ---


def test_a_wait_begins_held_with_nothing_sent() -> None:
    run = Run(PAYMENT)
    d = run.ok()
    assert steps_of(d.audit) == [("step_complete", "reserve"), ("step_start", "await_payment")]
    data = d.audit[1].event_data
    assert data["wait"] == "signal" and data["signal"] == "payment"
    assert data["timeout_seconds"] == 600
    assert d.commands == ()
    saga = run.saga
    (wait,) = saga.attempts
    assert wait.key() == (1, FWD, 1) and wait.held
    assert wait.deadline == wait.not_before == run.now + timedelta(seconds=600)
    assert data["due"] == wait.deadline.isoformat()
    assert saga.waiting_for == "signal:payment" and saga.waiting_since == run.now
    assert saga.current_step_index == 1 and saga.state is R


def test_a_signal_delivered_to_its_wait_merges_its_payload_and_goes_on() -> None:
    run = waiting(PAYMENT)
    d = run.apply(SignalReceived("payment", {"paid": 42}, user_id="bank", ip_address="10.1.1.1"))
    assert steps_of(d.audit) == [
        ("signal_received", "await_payment"),
        ("step_complete", "await_payment"),
        ("step_start", "ship"),
    ]
    received = d.audit[0]
    assert received.user_id == "bank"  # the sender, not the starter
    assert received.event_data["signal"] == "payment"
    assert received.event_data["payload_keys"] == ["paid"]
    assert "kept_since" not in received.event_data
    assert d.audit[1].event_data["signal"] == "payment"
    assert only_command(d) == sent(2, FWD, 1, run.now)
    saga = run.saga
    assert saga.context == {"paid": 42}
    assert saga.completed_steps == ("reserve", "await_payment")
    assert saga.seen_signals == ("payment",)
    assert saga.waiting_for is None and saga.waiting_since is None
    run.ok()
    assert run.saga.state is SagaState.COMPLETED


def test_an_early_signal_is_kept_then_delivered_when_its_wait_begins() -> None:
    run = Run(PAYMENT)  # reserve still running
    reserve = run.saga.attempts
    d = run.apply(SignalReceived("payment", {"paid": 1}, user_id="bank"))
    assert steps_of(d.audit) == [("signal_received", "await_payment")]
    assert d.audit[0].event_data["kept"] is True
    assert d.audit[0].user_id == "bank"
    assert d.commands == ()
    kept_at = run.now
    saga = run.saga
    assert saga.attempts == reserve and saga.context == {}
    assert [(s.name, s.payload, s.user_id) for s in saga.inbox] == [
        ("payment", {"paid": 1}, "bank")
    ]
    assert saga.waiting_for is None
    # A second copy writes nothing, kept or not.
    ignored_without_effect(run, SignalReceived("payment", {"paid": 2}, user_id="bank"))

    d = run.ok()
    assert steps_of(d.audit) == [
        ("step_complete", "reserve"),
        ("step_start", "await_payment"),
        ("signal_received", "await_payment"),
        ("step_complete", "await_payment"),
        ("step_start", "ship"),
    ]
    delivered = d.audit[2]
    assert delivered.user_id == "bank"
    assert delivered.event_data["kept_since"] == kept_at.isoformat()
    assert only_command(d) == sent(2, FWD, 1, run.now)
    saga = run.saga
    assert saga.inbox == () and saga.context == {"paid": 1}
    assert saga.waiting_for is None


def test_an_early_signal_is_delivered_at_the_join_of_the_group_before_its_wait() -> None:
    definition = SagaDefinition(
        "joined",
        [
            Parallel("g", [Step("a", NOOP), Step("b", NOOP)]),
            WaitFor("w", signal="go", timeout_seconds=60),
            Step("c", NOOP),
        ],
    )
    run = Run(definition)
    run.apply(SignalReceived("go", {"go": True}, user_id="x"))
    ok_at(run, 1)
    d = ok_at(run, 0)
    assert steps_of(d.audit) == [
        ("step_complete", "a"),
        ("step_start", "w"),
        ("signal_received", "w"),
        ("step_complete", "w"),
        ("step_start", "c"),
    ]
    assert [c.step_index for c in d.commands] == [3]


def test_a_duplicate_signal_writes_nothing() -> None:
    run = waiting(PAYMENT)
    run.apply(SignalReceived("payment", {"paid": 1}, user_id="bank"))
    ignored_without_effect(run, SignalReceived("payment", {"paid": 1}, user_id="bank"))
    ignored_without_effect(run, SignalReceived("payment", {"paid": 9}, user_id="other"))
    assert run.saga.context == {"paid": 1}


def test_an_unknown_signal_is_recorded_once_then_ignored() -> None:
    run = waiting(PAYMENT)
    before = run.saga
    d = run.apply(SignalReceived("refund", {"x": 1}, user_id="bank"))
    assert steps_of(d.audit) == [("signal_received", None)]
    assert "no wait for signal 'refund'" in d.audit[0].event_data["ignored"]
    assert d.audit[0].user_id == "bank" and d.commands == ()
    saga = run.saga
    assert saga.seen_signals == ("refund",)
    assert saga.context == before.context and saga.attempts == before.attempts
    assert saga.inbox == () and saga.completed_steps == before.completed_steps
    # still waiting, and since the wait began
    assert saga.waiting_for == "signal:payment" and saga.waiting_since == before.waiting_since
    ignored_without_effect(run, SignalReceived("refund", {"x": 2}, user_id="bank"))


def test_unknown_signals_are_recorded_up_to_a_bound() -> None:
    run = waiting(PAYMENT)
    for n in range(MAX_SEEN_SIGNALS):
        assert run.apply(SignalReceived(f"junk{n}", {})).ignored is None
    ignored_without_effect(run, SignalReceived("one_more", {}))
    assert len(run.saga.seen_signals) == MAX_SEEN_SIGNALS


def test_unexpected_signals_filling_the_bound_do_not_shut_out_an_awaited_one() -> None:
    # MAX_SEEN_SIGNALS bounds what whoever can send saga.signal makes the saga record; every
    # signal the definition awaits must still fit, or junk would make the wait time out.
    for early in (False, True):
        run = Run(PAYMENT) if early else waiting(PAYMENT)
        for n in range(MAX_SEEN_SIGNALS):
            run.apply(SignalReceived(f"junk{n}", {}))
        d = run.apply(SignalReceived("payment", {"paid": 1}, user_id="bank"))
        assert d.ignored is None
        if early:
            assert run.saga.inbox[0].name == "payment"
            run.ok()
        assert run.saga.context == {"paid": 1}
        assert ("step_complete", "await_payment") in steps_of(run.audit())
        assert len(run.saga.seen_signals) == MAX_SEEN_SIGNALS + 1


def test_a_signal_after_the_saga_ended_is_recorded_once_and_changes_nothing_else() -> None:
    run = waiting(PAYMENT)
    run.apply(SignalReceived("payment", {}))
    run.ok()
    assert run.saga.state is SagaState.COMPLETED
    ended = run.saga
    d = run.apply(SignalReceived("late", {}, user_id="bank"))
    assert types(d.audit) == ["signal_received"] and d.commands == ()
    assert d.audit[0].state_before == d.audit[0].state_after == SagaState.COMPLETED
    assert d.audit[0].event_data["ignored"]
    saga = run.saga
    assert saga.state is SagaState.COMPLETED and saga.attempts == ()
    assert saga.completed_steps == ended.completed_steps and saga.context == ended.context
    ignored_without_effect(run, SignalReceived("late", {}))


def test_a_signal_for_a_wait_that_timed_out_is_ignored() -> None:
    run = waiting(PAYMENT)
    due(run)
    d = run.apply(SignalReceived("payment", {"paid": 1}, user_id="bank"))
    assert d.audit[0].event_data["ignored"] == "saga is rolling back"
    assert "paid" not in run.saga.context and run.saga.inbox == ()


def test_a_wait_times_out_at_its_due_time_and_the_saga_compensates() -> None:
    run = waiting(PAYMENT)
    d = due(run)
    assert steps_of(d.audit) == [
        ("step_failed", "await_payment"),
        ("compensation_start", "reserve"),
    ]
    failed = d.audit[0]
    assert failed.event_data["error_type"] == "WaitTimedOut"
    assert failed.event_data["retryable"] is False
    assert failed.error_message == "await_payment: no signal 'payment' within 600s"
    assert (failed.state_before, failed.state_after) == (R, C)
    assert only_command(d).direction is Direction.COMPENSATE
    saga = run.saga
    assert saga.state is C and saga.waiting_for is None and saga.waiting_since is None
    assert saga.undo == ()  # a wait takes no effect
    ignored_without_effect(run, AttemptDue(1, FWD, 1))
    compensate_all(run)
    assert run.saga.state is SagaState.COMPENSATED
    assert run.saga.compensated_steps == ("reserve",)
    assert (
        run.saga.error
        == "step 'await_payment' failed: await_payment: no signal 'payment' within 600s"
    )


def test_nothing_but_the_due_scan_ends_a_wait() -> None:
    run = waiting(PAYMENT)
    # No result, stall, expiry or re-send can be a wait's own: nothing was ever sent for it.
    wait = attempt_of(run, 1)
    for event in (
        StepSucceeded(1, FWD, 1, {"forged": True}),
        StepFailed(1, FWD, 1, "RuntimeError", "forged"),
        AttemptStalled(1, FWD, 1, 0),
        AttemptExpired(1, FWD, 1, wait.start_by),
        RetryRequested(user_id="op", force=True),
        VoteCast(True, "a1"),
    ):
        ignored_without_effect(run, event)
    assert run.saga.attempts == (wait,)


def test_abort_during_a_wait_rolls_back_at_once() -> None:
    run = waiting(PAYMENT)
    d = run.apply(AbortRequested("changed my mind", user_id="ops"))
    assert steps_of(d.audit) == [
        ("abort_requested", "await_payment"),
        ("compensation_start", "reserve"),
    ]
    assert only_command(d).step_index == 0
    saga = run.saga
    assert saga.state is C and saga.abort_requested
    assert saga.waiting_for is None and saga.waiting_since is None
    ignored_without_effect(run, AttemptDue(1, FWD, 1))
    d = run.apply(SignalReceived("payment", {"paid": 1}))
    assert d.audit[0].event_data["ignored"] == "saga is rolling back"
    compensate_all(run)
    assert run.saga.state is SagaState.ABORTED
    assert "await_payment" not in run.saga.completed_steps


def test_a_wait_as_the_last_stage_completes_the_saga() -> None:
    definition = SagaDefinition(
        "tail", [Step("a", NOOP), WaitFor("w", signal="done", timeout_seconds=60)]
    )
    run = waiting(definition)
    d = run.apply(SignalReceived("done", {}))
    assert types(d.audit) == ["signal_received", "step_complete", "saga_complete"]
    assert run.saga.state is SagaState.COMPLETED and run.saga.waiting_for is None


# ---------------------------------------------------------------------- Sleep ---


def test_a_sleep_completes_at_its_due_time_and_not_before() -> None:
    run = Run(NAP)
    d = run.ok()
    assert steps_of(d.audit)[-1] == ("step_start", "cool_off")
    assert d.audit[-1].event_data["wait"] == "sleep" and d.commands == ()
    assert run.saga.waiting_for == "sleep:cool_off"
    nap = attempt_of(run, 1)
    assert nap.held and nap.deadline == run.now + timedelta(seconds=300)
    for event in (
        AttemptStalled(1, FWD, 1, 0),  # a held attempt is due, not stalled
        StepSucceeded(1, FWD, 1, {}),
        RetryRequested(user_id="op", force=True),
        VoteCast(True, "a1"),
    ):
        ignored_without_effect(run, event)
    d = due(run)
    assert steps_of(d.audit) == [("step_complete", "cool_off"), ("step_start", "ship")]
    assert d.audit[0].event_data["slept_seconds"] == 300
    assert only_command(d) == sent(2, FWD, 1, run.now)
    assert run.now > nap.not_before
    assert run.saga.waiting_for is None
    ignored_without_effect(run, AttemptDue(1, FWD, 1))  # the sweep's second look


def test_abort_during_a_sleep_rolls_back_at_once() -> None:
    run = waiting(NAP)
    d = run.apply(AbortRequested("stop"))
    assert types(d.audit) == ["abort_requested", "compensation_start"]
    ignored_without_effect(run, AttemptDue(1, FWD, 1))
    compensate_all(run)
    assert run.saga.state is SagaState.ABORTED


@pytest.mark.parametrize(
    "definition", [NAP, PAYMENT, SIGN_OFF], ids=["sleep", "signal", "approval"]
)
def test_a_due_wait_after_an_abort_recorded_without_the_definition_rolls_back(
    definition: SagaDefinition,
) -> None:
    # A worker without the saga's version records the abort (core/parking.record_abort)
    # and cannot cancel the wait; a worker with it finds the wait due and cancels it then,
    # as an abort cancels a held wait or retry: the rollback begins in that transition and
    # the saga never goes on to the next step.
    run = waiting(definition)
    recorded = record_abort(run.saga, AbortRequested("stop", user_id="ops"), run.now)
    assert recorded.ignored is None
    run.saga = recorded.saga
    d = due(run)
    assert steps_of(d.audit) == [("compensation_start", "reserve")]
    assert [c.step_index for c in d.commands] == [0]
    assert run.saga.waiting_for is None
    compensate_all(run)
    assert run.saga.state is SagaState.ABORTED
    assert ("step_start", "ship") not in steps_of(run.audit())


def test_unparking_a_saga_parked_in_a_wait_is_audited_and_sends_nothing() -> None:
    # The sweep parks a saga whose wait came due while no live worker had its version;
    # a worker with it resumes the saga: nothing to send, the due scan fires the wait.
    run = waiting(NAP)
    nap = attempt_of(run, 1)
    run.now = nap.deadline + timedelta(seconds=60)
    parked = park(run.saga, ParkRequested(1, FWD, 1, 0, "no live worker has it"), run.now)
    assert parked.ignored is None
    run.saga = parked.saga
    d = run.apply(UnparkRequested(user_id="system:recovery"))
    assert d.ignored is None and d.commands == ()
    assert steps_of(d.audit) == [("saga_recovered", "cool_off")]
    data = d.audit[0].event_data
    assert (data["reason"], data["held"], data["attempt"]) == ("unparked", True, 1)
    assert d.audit[0].user_id == "system:recovery"
    assert run.saga.parked_at is None and run.saga.attempts == (nap,)
    ignored_without_effect(run, UnparkRequested(user_id="system:recovery"))
    d = run.apply(AttemptDue(1, FWD, 1))
    assert steps_of(d.audit) == [("step_complete", "cool_off"), ("step_start", "ship")]


# ------------------------------------------------------------------- Approval ---


def vote(run: Run, user: str | None, approve: bool = True, **kw: Any) -> Any:
    return run.apply(VoteCast(approve, user, **kw))


def test_an_approval_waits_for_votes() -> None:
    run = Run(SIGN_OFF)
    d = run.ok()
    data = d.audit[-1].event_data
    assert (data["wait"], data["approvers"], data["exclude_starter"]) == ("approval", 2, True)
    assert run.saga.waiting_for == "approval:sign_off" and d.commands == ()


def test_the_starter_may_not_approve() -> None:
    run = waiting(SIGN_OFF)
    d = vote(run, STARTER)
    assert steps_of(d.audit) == [("signal_received", "sign_off")] and d.commands == ()
    assert d.audit[0].user_id == STARTER
    assert "started the saga" in d.audit[0].event_data["refused"]
    assert run.saga.votes == () and run.saga.waiting_for == "approval:sign_off"
    vote(run, "a1")
    d = vote(run, "a2")
    assert types(d.audit) == ["signal_received", "step_complete", "step_start"]


def test_a_second_vote_by_the_same_user_is_refused() -> None:
    run = waiting(SIGN_OFF)
    d = vote(run, "a1")
    assert types(d.audit) == ["signal_received"]
    assert d.audit[0].event_data["approvals"] == 1 and "refused" not in d.audit[0].event_data
    assert [(v.user_id, v.approve) for v in run.saga.votes] == [("a1", True)]
    for again in (True, False):  # neither counts again nor rejects
        d = vote(run, "a1", again)
        assert "has voted on sign_off already" in d.audit[0].event_data["refused"]
        assert [(v.user_id, v.approve) for v in run.saga.votes] == [("a1", True)]
        assert run.saga.state is R and run.saga.waiting_for == "approval:sign_off"


def test_two_distinct_approvers_complete_a_two_approver_wait() -> None:
    run = waiting(SIGN_OFF)
    since = run.saga.waiting_since
    vote(run, "a1", reason="looks fine")
    assert run.saga.waiting_since == since
    d = vote(run, "a2")
    assert steps_of(d.audit) == [
        ("signal_received", "sign_off"),
        ("step_complete", "sign_off"),
        ("step_start", "ship"),
    ]
    assert d.audit[0].event_data["approvals"] == 2 and d.audit[0].user_id == "a2"
    assert d.audit[1].event_data["approvers"] == ["a1", "a2"]
    assert only_command(d) == sent(2, FWD, 1, run.now)
    saga = run.saga
    assert saga.votes == () and saga.waiting_for is None
    assert saga.completed_steps == ("reserve", "sign_off")
    # The approval is over: a third vote is not for anything in progress.
    ignored_without_effect(run, VoteCast(True, "a3"))


def test_one_rejection_fails_the_approval() -> None:
    run = waiting(SIGN_OFF)
    vote(run, "a1")
    d = vote(run, "a2", False, reason="wrong amount")
    assert steps_of(d.audit) == [
        ("signal_received", "sign_off"),
        ("step_failed", "sign_off"),
        ("compensation_start", "reserve"),
    ]
    assert d.audit[0].event_data["vote"] == "reject"
    failed = d.audit[1]
    assert failed.event_data["error_type"] == "ApprovalRejected"
    assert failed.error_message == "sign_off rejected by a2: wrong amount"
    assert run.saga.state is C and run.saga.votes == () and run.saga.waiting_for is None
    ignored_without_effect(run, VoteCast(True, "a3"))
    compensate_all(run)
    assert run.saga.state is SagaState.COMPENSATED


def test_an_approval_times_out_like_any_wait() -> None:
    run = waiting(SIGN_OFF)
    vote(run, "a1")
    d = due(run)
    assert d.audit[0].event_data["error_type"] == "WaitTimedOut"
    assert d.audit[0].error_message == "sign_off: no approval within 3600s"
    assert "sign_off" not in run.saga.completed_steps


@pytest.mark.parametrize(
    "event",
    [
        VoteCast(True, None),  # no identity
        VoteCast(True, ""),
        VoteCast(True, "a1", wait="other_wait"),  # names no approval in progress
    ],
)
def test_votes_that_cannot_count_are_ignored(event: VoteCast) -> None:
    run = waiting(SIGN_OFF)
    ignored_without_effect(run, event)


def test_a_vote_when_no_approval_is_in_progress_is_ignored() -> None:
    run = Run(SIGN_OFF)  # reserve still running
    ignored_without_effect(run, VoteCast(True, "a1"))
    ignored_without_effect(run, VoteCast(True, "a1", wait="sign_off"))
    run.ok()
    assert vote(run, "a1", wait="sign_off").ignored is None


def test_without_exclude_starter_the_starter_may_approve() -> None:
    run = waiting(around(Approval("sign_off", exclude_starter=False, timeout_seconds=60)))
    d = vote(run, STARTER)
    assert types(d.audit) == ["signal_received", "step_complete", "step_start"]


def test_a_signal_with_an_approvals_name_is_ignored() -> None:
    run = waiting(SIGN_OFF)
    d = run.apply(SignalReceived("sign_off", {"approved": True}, user_id="a1"))
    assert "approvals take votes" in d.audit[0].event_data["ignored"]
    saga = run.saga
    assert saga.votes == () and "approved" not in saga.context
    assert saga.waiting_for == "approval:sign_off" and len(saga.attempts) == 1
    ignored_without_effect(run, SignalReceived("sign_off", {"approved": True}, user_id="a2"))


def test_abort_during_an_approval_rolls_back_and_later_votes_are_ignored() -> None:
    run = waiting(SIGN_OFF)
    vote(run, "a1")
    d = run.apply(AbortRequested("stop"))
    assert types(d.audit) == ["abort_requested", "compensation_start"]
    assert run.saga.votes == ()
    ignored_without_effect(run, VoteCast(True, "a2"))
