"""Property tests of `transition` in a simulated at-least-once environment.

The simulation keeps a "network": a multiset of messages that can still be delivered.
Every RunAttempt the core asks for puts a result of that attempt (success or failure,
chosen by hypothesis) into the network. Hypothesis then picks, step by step, which message
to deliver, redelivers messages already delivered, makes old attempts run again (so stale
and contradictory results arrive), injects AbortRequested, and injects AttemptStalled for the
pending attempt with a correct or a stale recoveries count. After each transition the saga
must be valid and the decision coherent; once injections stop and the network is drained,
the saga must be terminal.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from saga_worker.core.builder import MAX_QUEUE_ALLOWANCE_SECONDS
from saga_worker.core.commands import RunAttempt
from saga_worker.core.decision import Decision, Limits
from saga_worker.core.definition import SagaDefinition, Step
from saga_worker.core.events import (
    AbortRequested,
    AttemptDue,
    AttemptExpired,
    AttemptStalled,
    ParkRequested,
    RetryRequested,
    StartRequested,
    StepFailed,
    StepSucceeded,
    UnparkRequested,
)
from saga_worker.core.model import MAX_ATTEMPT, Direction, Saga, SagaState
from saga_worker.core.parking import park
from saga_worker.core.retry import RetryPolicy
from saga_worker.core.transition import start, transition

T0 = datetime(2026, 1, 15, 12, 0, 0, tzinfo=UTC)
NOOP: Any = lambda call: {}  # noqa: E731
LIMITS = Limits(stall_grace_seconds=5.0, max_recoveries=1)

ResultEvent = StepSucceeded | StepFailed


@st.composite
def definitions(draw: st.DrawFn) -> SagaDefinition:
    n = draw(st.integers(1, 4))
    steps = []
    for i in range(n):
        undo = draw(st.booleans())
        steps.append(
            Step(
                f"s{i}",
                NOOP,
                NOOP if undo else None,
                compensate_on_failure=undo and draw(st.booleans()),
                retry=RetryPolicy(
                    max_attempts=draw(st.integers(1, 3)),
                    initial_delay_seconds=draw(st.sampled_from([0.0, 1.0, 2.5])),
                    jitter=draw(st.sampled_from([0.0, 0.5])),
                ),
                compensation_retry=RetryPolicy(max_attempts=draw(st.integers(1, 3))),
                timeout_seconds=draw(st.sampled_from([1.0, 30.0])),
            )
        )
    return SagaDefinition("prop", steps)


@dataclass
class Sim:
    """The saga under test plus the network around it and what was observed so far."""

    definition: SagaDefinition
    data: st.DataObject
    saga: Saga
    now: datetime = T0
    network: list[Any] = field(default_factory=list)
    delivered: list[Any] = field(default_factory=list)
    issued: list[RunAttempt] = field(default_factory=list)
    accepted_successes: set[tuple[int, Direction]] = field(default_factory=set)
    seen_audit_types: list[str] = field(default_factory=list)
    given_up_errors: list[str] = field(default_factory=list)
    operator_retries: int = 0
    #: Steps that failed for good and had their own compensation scheduled (item 5).
    compensated_itself: set[str] = field(default_factory=set)
    #: Every (step, direction, number) made pending so far: a token is never issued twice.
    allocated: set[tuple[int, Direction, int]] = field(default_factory=set)

    # ------------------------------------------------------------ environment ---

    def result_for(self, cmd: RunAttempt) -> ResultEvent:
        """What one run of an attempt reports; hypothesis decides how it went."""
        kind = self.data.draw(st.sampled_from(["ok", "ok", "fail", "fatal"]), label="outcome")
        if kind == "ok":
            tag = f"{cmd.step_index}:{cmd.direction.value}:{cmd.attempt}"
            return StepSucceeded(cmd.step_index, cmd.direction, cmd.attempt, {"last": tag})
        return StepFailed(
            cmd.step_index,
            cmd.direction,
            cmd.attempt,
            "RuntimeError",
            "boom",
            retryable=kind == "fail",
            timed_out=self.data.draw(st.booleans(), label="timed_out"),
        )

    def send(self, commands: tuple[RunAttempt, ...]) -> None:
        for cmd in commands:
            assert cmd.saga_id == self.saga.saga_id
            self.issued.append(cmd)
            self.network.append(self.result_for(cmd))

    # ------------------------------------------------------------------ steps ---

    def apply(self, event: Any) -> Decision:
        self.now += timedelta(seconds=self.data.draw(st.integers(0, 90), label="elapsed"))
        before = self.saga
        decision = transition(self.definition, before, event, self.now, LIMITS)
        check_decision(self, before, event, decision)
        self.saga = decision.saga
        check_saga(self.definition, self.saga, retried=self.operator_retries > 0)
        self.send(decision.commands)
        if decision.ignored is None and self.saga.pending is not None and self.saga.pending.held:
            # The recovery sweep sends a held attempt once its not_before has passed.
            p = self.saga.pending
            self.network.append(AttemptDue(p.step_index, p.direction, p.number))
        if decision.ignored is None and not isinstance(event, RetryRequested):
            # Idempotence: the very same event again right away is a no-op. (An operator's
            # retry is a new request each time, not a redelivered message.)
            again = transition(self.definition, self.saga, event, self.now, LIMITS)
            assert again.ignored is not None, (event, self.saga)
            assert again.saga == self.saga and again.audit == () and again.commands == ()
        check_liveness(self)
        return decision

    def park(self) -> None:
        """The sweep found no live worker with the saga's version (core/parking.py)."""
        self.now += timedelta(seconds=self.data.draw(st.integers(0, 400), label="elapsed"))
        before = self.saga
        pending = before.pending
        assert pending is not None
        event = ParkRequested(
            pending.step_index, pending.direction, pending.number, pending.recoveries, "gone"
        )
        decision = park(before, event, self.now)
        if decision.ignored is None:
            after = decision.saga
            assert after.parked_at == self.now and pending.overdue(self.now)
            assert replace(after, parked_at=None, updated_at=before.updated_at) == before
            assert [e.event_type for e in decision.audit] == ["saga_parked"]
            assert decision.commands == ()
            # Parked once: the same request again changes nothing.
            assert park(after, event, self.now).ignored is not None
        else:
            assert decision.saga == before and decision.audit == () and decision.commands == ()
        self.saga = decision.saga
        check_saga(self.definition, self.saga, retried=self.operator_retries > 0)

    def deliver(self, index: int) -> None:
        event = self.network.pop(index)
        self.delivered.append(event)
        self.apply(event)

    def act(self) -> None:
        """One move of the adversarial environment, chosen by hypothesis."""
        moves = []
        if self.network:
            moves += ["deliver"] * 4
        if self.delivered:
            moves.append("redeliver")
        if self.issued:
            moves.append("rerun")
        moves.append("abort")
        if self.saga.state is SagaState.FAILED or self.saga.pending is not None:
            moves.append("operator_retry")
        if self.saga.pending is not None:
            moves += ["stall"] * 2
            moves += ["park", "expire"]
        if self.saga.parked_at is not None:
            moves.append("unpark")
        move = self.data.draw(st.sampled_from(moves), label="move")
        if move == "deliver":
            self.deliver(self.data.draw(st.integers(0, len(self.network) - 1), label="which"))
        elif move == "redeliver":
            self.apply(self.data.draw(st.sampled_from(self.delivered), label="duplicate"))
        elif move == "rerun":
            # The broker ran an old task message again: a fresh (maybe different) result.
            cmd = self.data.draw(st.sampled_from(self.issued), label="rerun of")
            self.network.append(self.result_for(cmd))
        elif move == "abort":
            self.apply(AbortRequested(reason="test", user_id="op"))
        elif move == "park":
            self.park()
        elif move == "expire":
            # A worker discarded a copy unstarted at its start-by time (the latest one, or
            # an older one whose start-by passed before a re-send).
            pending = self.saga.pending
            assert pending is not None
            late = self.data.draw(st.sampled_from([0, 0, 7]), label="older copy by")
            start_by = pending.start_by - timedelta(seconds=late)
            self.apply(
                AttemptExpired(pending.step_index, pending.direction, pending.number, start_by)
            )
        elif move == "unpark":
            self.apply(UnparkRequested(user_id="system:recovery"))
        elif move == "operator_retry":
            was_failed = self.saga.state is SagaState.FAILED
            force = self.data.draw(st.booleans(), label="force")
            retry = RetryRequested(user_id="op", force=force)
            if self.apply(retry).ignored is None and was_failed:
                self.operator_retries += 1
        else:
            pending = self.saga.pending
            assert pending is not None
            recoveries = self.data.draw(
                st.sampled_from(sorted({pending.recoveries, max(0, pending.recoveries - 1)})),
                label="recoveries seen",
            )
            self.apply(
                AttemptStalled(pending.step_index, pending.direction, pending.number, recoveries)
            )


# ---------------------------------------------------------------- properties ---


def check_saga(definition: SagaDefinition, saga: Saga, *, retried: bool = False) -> None:
    """The invariants every persisted saga state must satisfy."""
    names = definition.step_names
    state = saga.state
    pending = saga.pending
    comps = {s.name for s in definition.steps if s.compensate is not None}
    completed = saga.completed_steps
    compensated = saga.compensated_steps
    failed = saga.failed_compensations

    # The step that failed for good (the one after the completed ones) is compensated too
    # when its outcome is unknown or it has compensate_on_failure (issue 14, item 5).
    failed_step = {names[len(completed)]} if len(completed) < len(names) else set()
    undoable = set(completed) | failed_step

    assert saga.total_steps == len(names)
    if state.is_terminal:
        assert pending is None
    else:
        assert pending is not None
        assert saga.current_step_index == pending.step_index
        if pending.held:
            # waits in the database; the sweep sends it at not_before
            assert pending.deadline == pending.not_before
        else:
            assert pending.deadline > pending.not_before
            # A copy starts by its start-by time or never; the deadline is that + the timeout.
            timeout = definition.timeout(pending.step_index, pending.direction)
            assert pending.deadline == pending.start_by + timedelta(seconds=timeout)
        # The first allowance is the grace; each re-send of a sent copy doubles it (item 6),
        # up to the cap (or the grace, when that is larger).
        grace = LIMITS.stall_grace_seconds
        assert grace <= pending.allowance <= grace * 2**pending.recoveries
        assert pending.allowance <= max(MAX_QUEUE_ALLOWANCE_SECONDS, grace)
        step = definition.steps[pending.step_index]
        assert pending.first <= pending.number
        assert pending.number < pending.first + step.policy(pending.direction).max_attempts
    if state is SagaState.RUNNING:
        assert pending is not None and pending.direction is Direction.FORWARD
        assert compensated == () and failed == ()
        assert names[pending.step_index] not in completed
        assert pending.step_index == len(completed)
    if state is SagaState.COMPENSATING:
        assert pending is not None and pending.direction is Direction.COMPENSATE
        assert names[pending.step_index] in undoable
        assert names[pending.step_index] in comps
        assert names[pending.step_index] not in compensated + failed
    # completed_steps: a prefix of the step names, in order, no duplicates
    assert completed == names[: len(completed)]
    # compensated_steps: distinct, each completed, in reverse order of completion
    assert len(set(compensated)) == len(compensated)
    assert set(compensated) <= undoable
    positions = [names.index(n) for n in compensated]
    if not retried:  # an operator retry re-runs higher steps after lower ones succeeded
        assert positions == sorted(positions, reverse=True)
    assert set(compensated) <= comps
    assert len(set(failed)) == len(failed)
    assert set(failed) <= undoable & comps
    assert not set(failed) & set(compensated)
    if state is SagaState.COMPLETED:
        assert completed == names
        assert compensated == () and failed == ()
        assert not saga.abort_requested
    if state in (SagaState.COMPENSATED, SagaState.ABORTED):
        assert {n for n in completed if n in comps} == set(compensated) - failed_step
        assert failed == ()
    if state is SagaState.COMPENSATED:
        assert not saga.abort_requested
        assert saga.error  # the step failure that caused the rollback
    if state is SagaState.ABORTED:
        assert saga.abort_requested
    if state is SagaState.FAILED:
        assert failed != ()
        assert {n for n in completed if n in comps} == (set(compensated) | set(failed)) - (
            failed_step
        )
        assert saga.error
    if state in (SagaState.COMPENSATED, SagaState.ABORTED, SagaState.FAILED):
        assert len(completed) < len(names) or saga.abort_requested


def check_decision(sim: Sim, before: Saga, event: Any, decision: Decision) -> None:
    after = decision.saga
    if decision.ignored is not None:
        assert decision.audit == ()
        assert decision.commands == ()
        assert after == before
        return
    if isinstance(event, RetryRequested) and before.state is SagaState.FAILED:
        assert after.state is SagaState.COMPENSATING
    elif isinstance(event, RetryRequested):
        assert after.state is before.state and before.pending is not None
        # In flight and inside its deadline: re-sent only when forced (it may be running).
        assert before.pending.held or before.pending.stalled(sim.now) or event.force
        assert after.pending is not None and after.pending.key() == before.pending.key()
        assert after.pending.recoveries == before.pending.recoveries + 1
    elif isinstance(event, UnparkRequested):
        # Resumed: the very attempt it kept, sent again; not counted as a recovery.
        assert before.parked_at is not None and before.pending is not None
        assert after.pending is not None and after.pending.key() == before.pending.key()
        assert after.pending.recoveries == before.pending.recoveries
    else:
        assert not before.state.is_terminal
    # Any transition a worker with the definition makes resumes a parked saga.
    assert after.parked_at is None
    assert decision.audit, "an accepted transition is always audited"
    # No audit-only decision: what is written always changes the saga (issue 14).
    assert replace(after, updated_at=before.updated_at) != before, event
    # Attempt numbers: a new pending attempt never repeats a key issued before (a re-send
    # keeps its key); none goes past what a step message may carry; attempt_seq covers all.
    if after.pending is not None:
        issued = after.pending.key()
        if before.pending is None or issued != before.pending.key():
            assert issued not in sim.allocated, f"attempt {issued} issued twice"
            sim.allocated.add(issued)
        assert after.pending.number <= after.attempt_seq <= MAX_ATTEMPT
    assert after.attempt_seq >= before.attempt_seq
    assert decision.audit[0].state_before == before.state
    assert decision.audit[-1].state_after == after.state
    assert after.updated_at == sim.now
    assert (after.saga_id, after.started_at) == (before.saga_id, before.started_at)
    sim.seen_audit_types.extend(e.event_type for e in decision.audit)
    sim.given_up_errors.extend(
        str(e.event_data.get("error_type"))
        for e in decision.audit
        if e.event_type in ("step_failed", "compensation_failed")
    )
    # Commands: exactly the new pending attempt, or nothing (ended, or held in the database).
    unchanged_by_abort = isinstance(event, AbortRequested) and after.pending == before.pending
    if after.pending is None or after.pending.held or unchanged_by_abort:
        assert decision.commands == ()
    else:
        (cmd,) = decision.commands
        assert (cmd.step_index, cmd.direction, cmd.attempt) == after.pending.key()
        assert cmd.not_before == after.pending.not_before
        assert cmd.start_by == after.pending.start_by > cmd.not_before
        assert cmd.not_before >= sim.now
        if cmd.direction is Direction.COMPENSATE:
            # a completed step, or the one that failed for good (item 5)
            assert cmd.step_index <= len(after.completed_steps)
    # Recovery re-sends the very same attempt, or gives up on it after max_recoveries.
    if isinstance(event, AttemptDue):
        assert before.pending is not None and before.pending.held
        assert decision.audit[0].event_type in ("step_start", "compensation_start")
        assert after.pending is not None and not after.pending.held
        assert after.pending.key() == before.pending.key()
    elif isinstance(event, AttemptStalled):
        assert before.pending is not None and not before.pending.held
        assert before.pending is not None
        if before.pending.recoveries < LIMITS.max_recoveries:
            assert decision.audit[0].event_type == "saga_recovered"
            assert after.pending is not None
            assert after.pending.key() == before.pending.key()
            assert after.pending.recoveries == before.pending.recoveries + 1
            cap = max(MAX_QUEUE_ALLOWANCE_SECONDS, LIMITS.stall_grace_seconds)
            assert after.pending.allowance == min(2 * before.pending.allowance, cap)
        else:
            assert decision.audit[0].event_type in ("step_failed", "compensation_failed")
    # A step that failed for good is compensated first when its outcome is unknown (this
    # failure or an earlier attempt or copy: a timeout, a re-send) or it opts in.
    failed_for_good = [e for e in decision.audit if e.event_type == "step_failed"]
    if failed_for_good:
        assert before.pending is not None
        index = before.pending.step_index
        step = sim.definition.steps[index]
        unknown = before.pending.uncertain or (
            isinstance(event, StepFailed) and event.outcome_unknown
        )
        unknown = unknown or isinstance(event, AttemptStalled | AttemptExpired)
        assert failed_for_good[0].event_data.get("outcome_unknown", False) is unknown
        own = step.compensate is not None and (unknown or step.compensate_on_failure)
        comp_of_itself = after.pending is not None and after.pending.key() == (
            index,
            Direction.COMPENSATE,
            1,
        )
        assert comp_of_itself is own, (event, before.pending, after.pending)
        if own:
            sim.compensated_itself.add(step.name)
    # Never two accepted successes for the same (step, direction).
    if isinstance(event, StepSucceeded):
        key = (event.step_index, event.direction)
        assert key not in sim.accepted_successes, f"{key} accepted as succeeded twice"
        sim.accepted_successes.add(key)
        name = sim.definition.step_names[event.step_index]
        grown = (
            after.completed_steps
            if event.direction is Direction.FORWARD
            else after.compensated_steps
        )
        assert grown[-1] == name
    # Each forward success accepted adds exactly one completed step, and vice versa.
    forward_ok = {i for i, d in sim.accepted_successes if d is Direction.FORWARD}
    assert {sim.definition.step_names[i] for i in forward_ok} == set(after.completed_steps)
    comp_ok = {i for i, d in sim.accepted_successes if d is Direction.COMPENSATE}
    assert {sim.definition.step_names[i] for i in comp_ok} == set(after.compensated_steps)


def check_liveness(sim: Sim) -> None:
    """A non-terminal saga always has a result for its pending attempt on the way."""
    pending = sim.saga.pending
    if pending is None:
        return
    assert any((m.step_index, m.direction, m.attempt) == pending.key() for m in sim.network), (
        "the pending attempt has no result in the network: the saga would wedge"
    )


# --------------------------------------------------------------------- tests ---


def _run(data: st.DataObject, definition: SagaDefinition, moves: int) -> Sim:
    decision = start(
        definition, StartRequested("saga-p", "prop", {"seed": 1}, user_id="u"), T0, LIMITS
    )
    assert [e.event_type for e in decision.audit] == ["saga_start", "step_start"]
    sim = Sim(definition, data, decision.saga)
    assert decision.saga.pending is not None
    sim.allocated.add(decision.saga.pending.key())
    check_saga(definition, sim.saga)
    sim.send(decision.commands)
    for _ in range(moves):
        sim.act()
    # Drain: deliver everything still in flight, in an order hypothesis picks, no injections.
    budget = 500
    while sim.network and not sim.saga.state.is_terminal:
        budget -= 1
        assert budget > 0, "draining the network did not terminate"
        sim.deliver(data.draw(st.integers(0, len(sim.network) - 1), label="drain"))
    assert sim.saga.state.is_terminal, sim.saga
    # Whatever is left over is stale by now.
    for leftover in [*sim.network, *sim.delivered]:
        sim.apply(leftover)
        assert sim.saga.state.is_terminal
    return sim


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data(), definition=definitions(), moves=st.integers(0, 40))
def test_at_least_once_delivery_keeps_the_saga_valid(
    data: st.DataObject, definition: SagaDefinition, moves: int
) -> None:
    sim = _run(data, definition, moves)
    end = sim.saga.state
    types = sim.seen_audit_types
    event(f"end state {end.value}")
    event(f"gave up after stalls: {'StalledTooOften' in sim.given_up_errors}")
    event(f"abort requested: {sim.saga.abort_requested}")
    terminal_events = {
        SagaState.COMPLETED: "saga_complete",
        SagaState.COMPENSATED: "saga_compensated",
        SagaState.ABORTED: "saga_aborted",
        SagaState.FAILED: "saga_failed",
    }
    assert types[-1] == terminal_events[end]
    # one terminal event, plus one more for each accepted operator retry of a FAILED saga
    assert sum(t in terminal_events.values() for t in types) == 1 + sim.operator_retries
    # step_failed at most once per step; compensation_failed at most once per step too
    assert types.count("step_failed") <= 1
    assert types.count("abort_requested") <= 1
    # A step whose own compensation was scheduled is compensated, or its compensation failed.
    settled = set(sim.saga.compensated_steps) | set(sim.saga.failed_compensations)
    assert sim.compensated_itself <= settled


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), definition=definitions())
def test_in_order_delivery_without_faults_completes_or_rolls_back(
    data: st.DataObject, definition: SagaDefinition
) -> None:
    """With no injections at all, draining alone reaches a terminal state."""
    sim = _run(data, definition, moves=0)
    assert sim.saga.state in (SagaState.COMPLETED, SagaState.COMPENSATED, SagaState.FAILED)
    assert not sim.saga.abort_requested
