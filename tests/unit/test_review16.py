"""Adversarial review of issue 16 (parallel groups, waits, signals, approvals, sleeps).

The tests under "findings" reproduce the review's findings (each failed before its fix);
the others pin down what the review checked and found sound (the join happens once, early
signals are kept and delivered, replays write nothing, payloads are redacted in the audit
trail, a failed branch rolls back the others).

Everything here is pure core or in-memory (SagaTestHarness): no broker, no database.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from saga_worker.core.decision import Decision, Limits
from saga_worker.core.definition import Remote, SagaDefinition, Step, StepInput
from saga_worker.core.events import (
    AbortRequested,
    AttemptDue,
    Event,
    ParkRequested,
    SignalReceived,
    StartRequested,
    StepFailed,
    StepSucceeded,
    UnparkRequested,
    VoteCast,
)
from saga_worker.core.model import Direction, Saga, SagaState
from saga_worker.core.parking import park, record_abort
from saga_worker.core.retry import RetryPolicy
from saga_worker.core.stages import Approval, Parallel, Sleep, WaitFor
from saga_worker.core.transition import start, transition
from saga_worker.errors import InvalidSagaDefinition
from saga_worker.requests import parse_vote
from saga_worker.testing.harness import SagaTestHarness

NOW = datetime(2026, 1, 15, 12, 0, 0, tzinfo=UTC)
FWD = Direction.FORWARD
COMP = Direction.COMPENSATE
LIMITS = Limits(stall_grace_seconds=30.0, max_recoveries=3, max_broker_delay_seconds=3600)
POLICY = RetryPolicy(
    max_attempts=3,
    initial_delay_seconds=5.0,
    backoff_factor=2.0,
    max_delay_seconds=60.0,
    jitter=0.0,
)


def noop(call: StepInput) -> dict[str, Any]:
    return {}


def step(name: str, *, timeout: float = 10.0, compensate: bool = True) -> Step:
    return Step(
        name,
        noop,
        noop if compensate else None,
        retry=POLICY,
        timeout_seconds=timeout,
    )


def remote(name: str, timeout: float = 10.0) -> Step:
    return Step(name, Remote(f"svc.{name}", "svc"), timeout_seconds=timeout)


class Run:
    """One saga driven through the pure core; `now` moves only when told."""

    def __init__(
        self, definition: SagaDefinition, user_id: str | None = "starter", limits: Limits = LIMITS
    ) -> None:
        self.definition = definition
        self.limits = limits
        self.now = NOW
        decision = start(
            definition,
            StartRequested("s-1", definition.saga_type, {"n": 1}, user_id=user_id),
            NOW,
            limits,
        )
        self.saga: Saga = decision.saga

    def apply(self, event: Event, advance: float = 0.0) -> Decision:
        self.now += timedelta(seconds=advance)
        decision = transition(self.definition, self.saga, event, self.now, self.limits)
        self.saga = decision.saga
        return decision


def state_of(run: Run) -> SagaState:
    """The saga's state now (a call, so that no earlier assert narrows it for mypy)."""
    return run.saga.state


def events(decision: Decision) -> list[tuple[str, str | None]]:
    return [(e.event_type, e.step_name) for e in decision.audit]


def grouped() -> SagaDefinition:
    return SagaDefinition(
        "grouped",
        [
            step("first"),
            Parallel("checks", [step("left", timeout=5.0), step("right", timeout=600.0)]),
            step("last"),
        ],
    )


# ------------------------------------------------------------------------- findings ----


def test_unpark_resends_only_the_overdue_attempts_of_a_group() -> None:
    run = Run(grouped())
    run.apply(StepSucceeded(0, FWD, 1, {}), advance=1)
    # `right` fails once; its retry (attempt 2) is sent 20 s later with a fresh start-by.
    run.apply(StepFailed(2, FWD, 1, "E", "boom"), advance=20)
    right = run.saga.attempt_for(2, FWD, 2)
    assert right is not None and not right.held
    # `left` stalls; no live worker has the version: the sweep parks the saga.
    left = run.saga.attempt_for(1, FWD, 1)
    assert left is not None
    run.now = left.deadline + timedelta(seconds=1)
    parked = park(run.saga, ParkRequested(1, FWD, 1, 0, "no live worker"), run.now)
    assert parked.ignored is None
    run.saga = parked.saga
    # A worker with the version comes back while `right`'s copy is still inside its
    # start-by: that copy can still start, so re-sending it lets two copies run.
    decision = run.apply(UnparkRequested("worker"), advance=1)
    assert run.now < right.start_by
    resent = sorted(c.step_index for c in decision.commands)
    assert resent == [1], f"re-sent {resent}: attempt 2 of `right` may start twice"


def test_junk_signal_names_do_not_starve_the_signal_the_saga_waits_for() -> None:
    definition = SagaDefinition(
        "waits_go",
        [step("first"), WaitFor("await_go", signal="go", timeout_seconds=60), step("last")],
    )
    run = Run(definition)
    for n in range(32):  # anyone who can write to the broker
        run.apply(SignalReceived(f"junk{n}", {}, "mallory"))
    run.apply(StepSucceeded(0, FWD, 1, {}))
    assert run.saga.waiting_for == "signal:go"
    decision = run.apply(SignalReceived("go", {}, "alice"))
    assert decision.ignored is None, decision.ignored
    assert "await_go" in run.saga.completed_steps


def test_two_waits_that_require_the_same_key_can_both_be_approved() -> None:
    definition = SagaDefinition(
        "two_approvals",
        [
            step("first"),
            WaitFor("manager", signal="manager_ok", timeout_seconds=60, require="approved"),
            WaitFor("risk", signal="risk_ok", timeout_seconds=60, require="approved"),
            step("last"),
        ],
    )
    run = Run(definition)
    run.apply(StepSucceeded(0, FWD, 1, {}))
    run.apply(SignalReceived("manager_ok", {"approved": True}, "manager"))
    assert run.saga.waiting_for == "signal:risk_ok"
    decision = run.apply(SignalReceived("risk_ok", {"approved": True}, "risk"))
    failures = [e.error_message for e in decision.audit if e.event_type == "step_failed"]
    assert failures == [], failures  # "risk: signal 'risk_ok' came without approved=true"
    assert state_of(run) is SagaState.RUNNING and "risk" in run.saga.completed_steps


def test_a_sleep_due_after_a_recorded_abort_rolls_back_instead_of_going_on() -> None:
    definition = SagaDefinition(
        "sleeps",
        [step("first"), Sleep("cool_off", 60), Parallel("g", [step("b"), step("c")])],
    )
    run = Run(definition)
    run.apply(StepSucceeded(0, FWD, 1, {}), advance=1)
    assert run.saga.waiting_for == "sleep:cool_off"
    # saga.abort reached a worker without the saga's version: recorded, nothing cancelled.
    flagged = record_abort(run.saga, AbortRequested("stop it", "ops"), run.now)
    run.saga = flagged.saga
    assert run.saga.abort_requested
    decision = run.apply(AttemptDue(1, FWD, 1, "system:recovery"), advance=61)
    assert decision.commands == () or all(c.direction is COMP for c in decision.commands), (
        f"after the abort the sleep went on and started {events(decision)}"
    )
    assert run.saga.state in (SagaState.COMPENSATING, SagaState.ABORTED)


def test_an_approval_counts_people_not_spellings_of_their_ids() -> None:
    definition = SagaDefinition(
        "approved",
        [step("first"), Approval("sign_off", approvers=2, timeout_seconds=600), step("last")],
    )
    run = Run(definition, user_id="alice")
    run.apply(StepSucceeded(0, FWD, 1, {}))
    counted: list[Any] = []
    for who in ("Alice", "ops", "ops "):  # parse_vote is what the CLI and client call
        decision = run.apply(parse_vote(who, True, None, ""))
        counted += [
            e.event_data["approvers"]
            for e in decision.audit
            if e.step_name == "sign_off" and e.event_type == "step_complete"
        ]
    assert "sign_off" not in run.saga.completed_steps, f"approved by {counted}"


def test_one_sweep_recovers_every_overdue_branch() -> None:
    definition = SagaDefinition(
        "grouped_remote",
        [remote("first"), Parallel("checks", [remote("left"), remote("right")]), remote("last")],
    )
    h = SagaTestHarness(definition, limits=Limits(stall_grace_seconds=30.0, max_recoveries=3))
    h.start({})
    h.succeed("first")
    h.advance_clock(100)  # both branches are past their deadline
    h.recover()
    assert [a.recoveries for a in h.saga.attempts] == [1, 1]


def test_a_waitfor_named_like_an_approval_is_refused_or_completes() -> None:
    stages: list[Step | Parallel] = [
        step("first"),
        Approval("sign_off", timeout_seconds=60),
        WaitFor("await_ack", signal="sign_off", timeout_seconds=60),
    ]
    try:
        definition = SagaDefinition("clash", stages)
    except InvalidSagaDefinition:
        return  # refused with a reason: fine
    run = Run(definition)
    run.apply(StepSucceeded(0, FWD, 1, {}))
    run.apply(VoteCast(True, "ops"))
    assert run.saga.waiting_for == "signal:sign_off"
    run.apply(SignalReceived("sign_off", {}, "producer"))
    assert "await_ack" in run.saga.completed_steps


def test_a_wait_too_long_for_datetime_is_refused_by_validation() -> None:
    try:
        definition = SagaDefinition("forever", [step("first"), Sleep("nap", 1e12)])
    except InvalidSagaDefinition:
        return
    run = Run(definition)
    run.apply(StepSucceeded(0, FWD, 1, {}))  # OverflowError: date value out of range


def test_a_completed_saga_ends_on_its_last_leaf_whichever_branch_finished_last() -> None:
    definition = SagaDefinition("ends_grouped", [step("a"), Parallel("g", [step("b"), step("c")])])
    run = Run(definition)
    run.apply(StepSucceeded(0, FWD, 1, {}))
    run.apply(StepSucceeded(2, FWD, 1, {}))
    run.apply(StepSucceeded(1, FWD, 1, {}))
    assert state_of(run) is SagaState.COMPLETED
    assert run.saga.current_step_index == run.saga.total_steps - 1


# ------------------------------------------------------- checked and found sound ----


# Found by this review on 2ce8ed8 and fixed on the branch since (ec2d589, 69cfd2a): kept as
# regression tests.


def test_harness_delivers_the_result_of_any_running_branch() -> None:
    definition = SagaDefinition(
        "grouped_remote",
        [remote("first"), Parallel("checks", [remote("left"), remote("right")]), remote("last")],
    )
    h = SagaTestHarness(definition)
    h.start({})
    h.succeed("first")
    h.succeed("right")  # on 2ce8ed8: HarnessError "waits for left (forward) attempt 1"
    h.succeed("left")
    h.succeed("last")
    assert h.saga.state is SagaState.COMPLETED


def test_a_delivered_signal_is_audited_with_the_senders_ip_address() -> None:
    definition = SagaDefinition(
        "waits_go", [step("first"), WaitFor("await_go", signal="go", timeout_seconds=60)]
    )
    run = Run(definition)
    run.apply(StepSucceeded(0, FWD, 1, {}))
    decision = run.apply(SignalReceived("go", {}, "alice", "10.0.0.1"))
    (row,) = [e for e in decision.audit if e.event_type == "signal_received"]
    assert (row.user_id, row.ip_address) == ("alice", "10.0.0.1")


def test_two_branch_results_on_one_loaded_checkpoint_join_once() -> None:
    definition = SagaDefinition(
        "grouped_remote",
        [remote("first"), Parallel("checks", [remote("left"), remote("right")]), remote("last")],
    )
    h = SagaTestHarness(definition)
    h.start({})
    h.succeed("first")
    assert h.saga_id is not None
    loaded = h.store.load_for_step(h.saga_id)  # both workers read the same checkpoint
    first = h.engine.handle(h.saga_id, StepSucceeded(1, FWD, 1, {"l": 1}), loaded=loaded)
    second = h.engine.handle(h.saga_id, StepSucceeded(2, FWD, 1, {"r": 1}), loaded=loaded)
    assert first.sent == () and second.sent == ("svc.last",)
    replay = h.engine.handle(h.saga_id, StepSucceeded(2, FWD, 1, {"r": 1}))
    assert replay.ignored is not None and replay.sent == ()
    assert h.audit_events().count("step_start") == 4  # first, left, right, last: one join


def test_a_failed_branch_waits_for_the_running_one_then_compensates_all() -> None:
    run = Run(grouped())
    run.apply(StepSucceeded(0, FWD, 1, {}))
    failed = run.apply(StepFailed(1, FWD, 1, "E", "no", retryable=False))
    assert state_of(run) is SagaState.COMPENSATING and failed.commands == ()
    done = run.apply(StepSucceeded(2, FWD, 1, {}))  # the running branch finishes
    assert [(c.step_index, c.direction) for c in done.commands] == [(2, COMP)]
    run.apply(StepSucceeded(2, COMP, 1, {}))
    run.apply(StepSucceeded(0, COMP, 1, {}))
    assert state_of(run) is SagaState.COMPENSATED
    assert run.saga.compensated_steps == ("right", "first")


def test_an_early_signal_is_kept_once_and_delivered_when_its_wait_begins() -> None:
    definition = SagaDefinition(
        "waits_go",
        [step("first"), WaitFor("await_go", signal="go", timeout_seconds=60), step("last")],
    )
    run = Run(definition)
    kept = run.apply(SignalReceived("go", {"ok": True}, "alice"))
    assert events(kept) == [("signal_received", "await_go")]
    replay = run.apply(SignalReceived("go", {"ok": False}, "alice"))
    assert replay.ignored is not None and replay.audit == ()
    begun = run.apply(StepSucceeded(0, FWD, 1, {}))
    assert ("signal_received", "await_go") in events(begun)
    assert run.saga.context["ok"] is True and run.saga.waiting_for is None
    assert [c.step_index for c in begun.commands] == [2]


def test_signal_payloads_are_redacted_in_the_audit_trail() -> None:
    definition = SagaDefinition(
        "waits_go_remote",
        [remote("first"), WaitFor("await_go", signal="go", timeout_seconds=60), remote("last")],
    )
    h = SagaTestHarness(definition)
    h.start({})
    assert h.saga_id is not None
    payload = {"api_key": "S3CRET-1", "nested": {"password": "S3CRET-2"}}
    h.engine.handle(h.saga_id, SignalReceived("go", payload, "alice"))
    h.succeed("first")
    trail = json.dumps(h.audit_trail(), default=str)
    assert "S3CRET" not in trail
    assert h.saga.context["api_key"] == "S3CRET-1"  # delivered, only the audit is masked
