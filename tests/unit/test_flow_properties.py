"""Property tests of sagas beyond a line of steps (issue 16): a group of branches and a wait.

Definitions are drawn at random: a few steps, a parallel group of 2-3 branches, and maybe a
WaitFor, Sleep or Approval before or after the group. The simulation keeps a network of
results like tests/unit/test_transition_properties.py, and hypothesis picks every move:
branch results in any order, duplicates and late results, two results applied to the same
loaded checkpoint (two workers racing: the loser reloads and applies again), stalls, due
timers (fired at their due time, as the sweep does), signals early, late, twice or unknown,
votes by the starter, by others and twice, and aborts. After every move the saga must be
valid; over the run the join happens at most once, no wait completes without what completes
it, and a rollback compensates every completed step that has a compensation.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from saga_worker.core.commands import RunAttempt
from saga_worker.core.decision import Decision, Limits
from saga_worker.core.definition import SagaDefinition, Step
from saga_worker.core.events import (
    AbortRequested,
    AttemptDue,
    AttemptStalled,
    SignalReceived,
    StartRequested,
    StepFailed,
    StepSucceeded,
    VoteCast,
)
from saga_worker.core.model import Direction, Saga, SagaState
from saga_worker.core.retry import RetryPolicy
from saga_worker.core.stages import Approval, Parallel, Sleep, Stage, WaitFor
from saga_worker.core.transition import start, transition

T0 = datetime(2026, 1, 15, 12, 0, 0, tzinfo=UTC)
NOOP: Any = lambda call: {}  # noqa: E731
#: Retry delays of 30 s are held in the database (past the 5 s broker delay).
LIMITS = Limits(stall_grace_seconds=5.0, max_recoveries=1, max_broker_delay_seconds=5.0)
FWD = Direction.FORWARD
COMP = Direction.COMPENSATE
STARTER = "starter"
VOTERS = (STARTER, "a1", "a2", "a3")
#: The signal every WaitFor here awaits; "junk" is awaited by none.
AWAITED = "go"

ResultEvent = StepSucceeded | StepFailed


@st.composite
def definitions(draw: st.DrawFn) -> SagaDefinition:
    def step(name: str) -> Step:
        undo = draw(st.booleans(), label=f"{name} compensates")
        return Step(
            name,
            NOOP,
            NOOP if undo else None,
            compensate_on_failure=undo and draw(st.booleans()),
            retry=RetryPolicy(
                max_attempts=draw(st.integers(1, 3)),
                initial_delay_seconds=draw(st.sampled_from([0.0, 1.0, 30.0])),
                jitter=0.0,
            ),
            compensation_retry=RetryPolicy(
                max_attempts=draw(st.integers(1, 2)),
                initial_delay_seconds=draw(st.sampled_from([0.0, 30.0])),
                jitter=0.0,
            ),
            timeout_seconds=draw(st.sampled_from([1.0, 30.0])),
        )

    prefix = [step(f"s{i}") for i in range(draw(st.integers(0, 2)))]
    group = Parallel("g", [step(f"b{i}") for i in range(draw(st.integers(2, 3)))])
    kind = draw(st.sampled_from([None, "signal", "sleep", "approval"]), label="wait")
    waits: list[Step] = []
    if kind == "signal":
        waits.append(WaitFor("w", signal=AWAITED, timeout_seconds=draw(st.sampled_from([60, 600]))))
    elif kind == "sleep":
        waits.append(Sleep("w", draw(st.sampled_from([30, 300]))))
    elif kind == "approval":
        waits.append(
            Approval(
                "w",
                approvers=draw(st.integers(1, 2)),
                exclude_starter=draw(st.booleans()),
                timeout_seconds=600,
            )
        )
    before = draw(st.booleans(), label="wait before the group")
    tail = [step(f"t{i}") for i in range(draw(st.integers(0, 1)))]
    stages: list[Step | Parallel] = [
        *prefix,
        *(waits if before else []),
        group,
        *([] if before else waits),
        *tail,
    ]
    return SagaDefinition("flow", stages)


def group_of(definition: SagaDefinition) -> Stage:
    return next(stage for stage in definition.stages if stage.kind == "parallel")


def wait_leaf(definition: SagaDefinition) -> int | None:
    return next(
        (i for i in range(len(definition.steps)) if definition.wait_of(i) is not None), None
    )


# ----------------------------------------------------------------- invariants ---


def check_saga(definition: SagaDefinition, saga: Saga) -> None:
    """What every checkpoint must satisfy, whatever happened before."""
    names = definition.step_names
    comps = {s.name for s in definition.steps if s.compensate is not None}
    forward = [a for a in saga.attempts if a.direction is FWD]
    compensating = [a for a in saga.attempts if a.direction is COMP]
    completed = saga.completed_steps
    compensated = saga.compensated_steps
    failed = saga.failed_compensations
    undoable = set(completed) | set(saga.undo)

    # In flight: forward attempts (one per running branch), or exactly one compensation.
    assert not (forward and compensating), saga.attempts
    assert len(compensating) <= 1
    assert len({a.step_index for a in saga.attempts}) == len(saga.attempts)
    if compensating:
        assert saga.state is SagaState.COMPENSATING
        (comp,) = compensating
        assert names[comp.step_index] in undoable & comps
        assert names[comp.step_index] not in set(compensated) | set(failed)
    if saga.state.is_terminal:
        assert saga.attempts == ()
        assert saga.waiting_for is None
    else:
        assert saga.attempts, "a live saga always waits for something"
    if forward:
        stages = {definition.stage_of(a.step_index) for a in forward}
        assert len(stages) == 1, "forward attempts all belong to the stage in progress"
        (stage,) = stages
        assert saga.current_step_index == stage.leaves[0]
        assert not {names[a.step_index] for a in forward} & set(completed)
        if saga.state is SagaState.COMPENSATING:
            # only branches still running after a sibling failed for good
            assert stage.kind == "parallel"
        # every stage before the one in progress completed; none after it began
        for leaf, name in enumerate(names):
            if leaf < stage.leaves[0]:
                assert name in completed
            elif leaf > stage.leaves[-1]:
                assert name not in completed
    if saga.state is SagaState.RUNNING:
        assert compensated == () and failed == ()
        # An abort that cancelled a held retry of a branch records it to undo itself while
        # the other branches still run; nothing else fails for good while RUNNING.
        assert saga.undo == () or saga.abort_requested
    for attempt in saga.attempts:
        if attempt.held:
            assert attempt.deadline == attempt.not_before
        if definition.wait_of(attempt.step_index) is not None:
            assert attempt.held and attempt.direction is FWD
    # waiting_for names the wait in progress, and only that
    waits = [a for a in saga.attempts if definition.wait_of(a.step_index) is not None]
    assert (saga.waiting_for is not None) is bool(waits)
    assert (saga.waiting_since is not None) is bool(waits)
    # Completed steps: distinct leaves of the definition.
    assert len(set(completed)) == len(completed)
    assert set(completed) <= set(names)
    # Each compensated (or failed compensation) step completed, or failed for good and had
    # to undo itself; none twice, none both.
    assert len(set(compensated)) == len(compensated)
    assert len(set(failed)) == len(failed)
    assert not set(compensated) & set(failed)
    assert set(compensated) | set(failed) <= undoable & comps
    assert set(saga.undo) <= comps and not set(saga.undo) & set(completed)
    # Kept signals wait for a wait that has not begun.
    for kept in saga.inbox:
        taker = definition.signal_wait(kept.name)
        assert taker is not None and names[taker] not in completed
        assert all(a.step_index != taker for a in saga.attempts)
    if saga.votes:
        assert saga.waiting_for is not None and saga.waiting_for.startswith("approval:")
    if saga.state is SagaState.COMPLETED:
        assert set(completed) == set(names) and not saga.abort_requested
    if saga.state in (SagaState.COMPENSATED, SagaState.ABORTED):
        assert {n for n in completed if n in comps} | set(saga.undo) == set(compensated)
        assert failed == ()
    if saga.state is SagaState.FAILED:
        assert {n for n in completed if n in comps} | set(saga.undo) == set(compensated) | set(
            failed
        )
        assert failed
    if saga.state is SagaState.COMPENSATED:
        assert not saga.abort_requested and saga.error
    if saga.state is SagaState.ABORTED:
        assert saga.abort_requested


def check_decision(definition: SagaDefinition, before: Saga, decision: Decision) -> None:
    """What any decision on `before` must satisfy (also one a racing worker will lose)."""
    after = decision.saga
    if decision.ignored is not None:
        assert after == before and decision.audit == () and decision.commands == ()
        return
    assert decision.audit, "an accepted transition is audited"
    assert decision.audit[0].state_before == before.state
    assert decision.audit[-1].state_after == after.state
    # Commands: exactly the attempts sent now, each one in flight and not held.
    sent = {a.key(): a for a in after.attempts if not a.held}
    keys = [(c.step_index, c.direction, c.attempt) for c in decision.commands]
    assert len(set(keys)) == len(keys)
    for cmd, key in zip(decision.commands, keys, strict=True):
        assert key in sent, (key, after.attempts)
        assert cmd.not_before == sent[key].not_before
        assert cmd.start_by == sent[key].start_by
        assert definition.wait_of(cmd.step_index) is None, "nothing is ever sent for a wait"
    for attempt in sent.values():
        if attempt not in before.attempts:
            assert attempt.key() in keys, f"{attempt} in flight but never sent"
    if before.state is SagaState.COMPENSATING or before.abort_requested:
        # Rolling back, nothing new goes forward: only a copy already sent is sent again
        # (a recovery); held retries and waits are dropped, never sent.
        was_sent = {a.key() for a in before.attempts if not a.held}
        for key in keys:
            assert key[1] is COMP or key in was_sent, (key, before.attempts)
    if before.state.is_terminal:
        # only a signal is recorded (once) after the end
        assert after.state is before.state and after.attempts == () and not decision.commands


# ----------------------------------------------------------------- simulation ---


@dataclass
class Flow:
    """The saga under test, the network around it and what was observed so far."""

    definition: SagaDefinition
    data: st.DataObject
    saga: Saga
    now: datetime = T0
    network: list[ResultEvent] = field(default_factory=list)
    delivered: list[Any] = field(default_factory=list)
    issued: list[RunAttempt] = field(default_factory=list)
    #: The payload of the first signal sent under each name (later ones are dropped).
    signals: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Users who cast an approving vote while the approval was in progress.
    approving: set[str] = field(default_factory=set)
    #: Transitions in which the group's last branch completed and the saga went on.
    joins: int = 0
    #: step_start rows of the first leaf after the group that began it (not re-sends).
    next_stage_starts: int = 0
    sent_signals: int = 0
    kept: bool = False
    #: Whether this run injects aborts (in half the runs: an abort ends most runs early).
    aborts: bool = True
    moves: list[str] = field(default_factory=list)

    @property
    def group(self) -> Stage:
        return group_of(self.definition)

    @property
    def after_group(self) -> int | None:
        following = self.group.leaves[-1] + 1
        return following if following < len(self.definition.steps) else None

    # ------------------------------------------------------------ environment ---

    def draw(self, strategy: st.SearchStrategy[Any], label: str) -> Any:
        return self.data.draw(strategy, label=label)

    def result_for(self, cmd: RunAttempt) -> ResultEvent:
        kind = self.draw(st.sampled_from(["ok"] * 8 + ["fail", "fatal"]), "outcome")
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
            timed_out=self.draw(st.booleans(), "timed_out"),
        )

    def send(self, commands: tuple[RunAttempt, ...]) -> None:
        for cmd in commands:
            self.issued.append(cmd)
            self.network.append(self.result_for(cmd))

    # ------------------------------------------------------------------ moves ---

    def apply(self, event: Any, *, at: datetime | None = None) -> Decision:
        if at is None:
            at = self.now + timedelta(seconds=self.draw(st.integers(0, 30), "elapsed"))
        self.now = max(self.now, at)
        if isinstance(event, SignalReceived):
            self.signals.setdefault(event.signal, dict(event.payload))
        before = self.saga
        decision = transition(self.definition, before, event, self.now, LIMITS)
        check_decision(self.definition, before, decision)
        self.observe(before, event, decision)
        self.saga = decision.saga
        self.kept = self.kept or bool(self.saga.inbox)
        check_saga(self.definition, self.saga)
        self.send(decision.commands)
        self.delivered.append(event)
        if decision.ignored is None:
            again = transition(self.definition, self.saga, event, self.now, LIMITS)
            if isinstance(event, VoteCast) and again.ignored is None:
                # A vote is an operator's action: the same user's second one is refused,
                # audited, and changes nothing else.
                (row,) = again.audit
                assert row.event_type == "signal_received" and "refused" in row.event_data
                assert again.commands == ()
                assert replace(again.saga, updated_at=self.saga.updated_at) == self.saga
            else:
                # The very same message again changes nothing.
                assert again.ignored is not None, (event, again.audit)
        self.check_liveness()
        return decision

    def act(self) -> None:
        moves = ["signal", "vote"]
        if self.aborts:
            moves.append("abort")
        waiting = self.saga.waiting_for or ""
        if waiting.startswith("approval:"):
            moves += ["vote"] * 4
        elif waiting.startswith("signal:"):
            moves += ["signal"] * 2
        if self.network:
            moves += ["deliver"] * 6
        if len(self.network) >= 2:
            moves += ["race"] * 2
        if self.delivered:
            moves.append("redeliver")
        if self.issued:
            moves.append("rerun")
        if any(not a.held for a in self.saga.attempts):
            moves.append("stall")
        if any(a.held for a in self.saga.attempts):
            moves += ["due"] * 2
        move = self.draw(st.sampled_from(moves), "move")
        self.moves.append(move)
        if move == "deliver":
            self.deliver(self.draw(st.integers(0, len(self.network) - 1), "which"))
        elif move == "race":
            self.race()
        elif move == "redeliver":
            self.apply(self.draw(st.sampled_from(self.delivered), "duplicate"))
        elif move == "rerun":
            # An old task message ran again: a fresh (maybe different) result.
            self.network.append(self.result_for(self.draw(st.sampled_from(self.issued), "rerun")))
        elif move == "stall":
            self.stall()
        elif move == "due":
            self.due()
        elif move == "signal":
            self.signal()
        elif move == "vote":
            self.vote()
        else:
            self.apply(AbortRequested(reason="test", user_id="op"))

    def deliver(self, index: int) -> None:
        self.apply(self.network.pop(index))

    def race(self) -> None:
        """Two workers apply two results to the same loaded checkpoint. Each decision alone
        is valid; the first commits, the second fails its version check, reloads and applies
        its result to what was committed."""
        first = self.draw(st.integers(0, len(self.network) - 1), "first")
        others = [i for i in range(len(self.network)) if i != first]
        second = self.draw(st.sampled_from(others), "second")
        events = [self.network[first], self.network[second]]
        at = self.now + timedelta(seconds=self.draw(st.integers(0, 30), "elapsed"))
        loaded = self.saga
        for alone in events:
            decision = transition(self.definition, loaded, alone, at, LIMITS)
            check_decision(self.definition, loaded, decision)
            check_saga(self.definition, decision.saga)
        # (the second result stays on the network until its worker reloads)
        self.network.remove(events[0])
        self.apply(events[0], at=at)
        self.network.remove(events[1])
        self.apply(events[1], at=at)

    def stall(self) -> None:
        sent = [a for a in self.saga.attempts if not a.held]
        attempt = self.draw(st.sampled_from(sent), "stalled")
        seen = self.draw(
            st.sampled_from(sorted({attempt.recoveries, max(0, attempt.recoveries - 1)})),
            "recoveries seen",
        )
        self.apply(AttemptStalled(attempt.step_index, attempt.direction, attempt.number, seen))

    def due(self) -> None:
        """The sweep's due scan: a held attempt fires once its time has come."""
        held = [a for a in self.saga.attempts if a.held]
        attempt = self.draw(st.sampled_from(held), "due")
        late = self.draw(st.integers(0, 5), "late by")
        at = max(self.now, attempt.not_before) + timedelta(seconds=late)
        self.apply(AttemptDue(attempt.step_index, attempt.direction, attempt.number), at=at)

    def signal(self) -> None:
        names = ["junk", AWAITED, AWAITED]
        leaf = wait_leaf(self.definition)
        if leaf is not None:
            names.append(self.definition.steps[leaf].name)  # an approval's name too
        name = self.draw(st.sampled_from(names), "signal")
        self.sent_signals += 1
        payload = {f"{name}_payload": self.sent_signals}
        sender = self.draw(st.sampled_from([None, "svc"]), "sender")
        self.apply(SignalReceived(name, payload, user_id=sender))

    def vote(self) -> None:
        user = self.draw(st.sampled_from(VOTERS), "voter")
        approve = self.draw(st.sampled_from([True] * 5 + [False]), "approve")
        wait = self.draw(st.sampled_from([None, None, "w", "other"]), "names")
        self.apply(VoteCast(approve, user, wait=wait))

    # ------------------------------------------------------------ observation ---

    def observe(self, before: Saga, event: Any, decision: Decision) -> None:
        """Properties over the run: the join, and what completes or fails a wait."""
        if decision.ignored is not None:
            return
        after = decision.saga
        names = self.definition.step_names
        branches = {names[i] for i in self.group.leaves}
        if (
            branches <= set(after.completed_steps)
            and not branches <= set(before.completed_steps)
            and after.state in (SagaState.RUNNING, SagaState.COMPLETED)
        ):
            # The join: the last branch's own transition, once.
            assert isinstance(event, StepSucceeded) and event.step_index in self.group.leaves
            self.joins += 1
        following = self.after_group
        if following is not None:
            resent = any(
                e.event_type == "saga_recovered" and e.step_index == following
                for e in decision.audit
            )
            starts = [
                e
                for e in decision.audit
                if e.event_type == "step_start"
                and e.step_index == following
                and e.event_data.get("attempt") == 1
            ]
            if starts and not resent:
                assert len(starts) == 1
                assert branches <= set(after.completed_steps)
                self.next_stage_starts += 1
        assert self.joins <= 1, "the group joined twice"
        assert self.next_stage_starts <= 1, "the stage after the group began twice"
        voted = isinstance(event, VoteCast) and event.approve and event.user_id
        if voted and before.waiting_for == "approval:w" and event.wait in (None, "w"):
            self.approving.add(event.user_id)
        self.observe_wait(before, event, decision)

    def observe_wait(self, before: Saga, event: Any, decision: Decision) -> None:
        leaf = wait_leaf(self.definition)
        if leaf is None:
            return
        wait = self.definition.wait_of(leaf)
        assert wait is not None
        after = decision.saga
        in_progress = before.attempt_for(leaf, FWD, 1)
        rows = [e for e in decision.audit if e.step_index == leaf]
        completed = [e for e in rows if e.event_type == "step_complete"]
        failed = [e for e in rows if e.event_type == "step_failed"]
        if completed:
            assert "w" in after.completed_steps and "w" not in before.completed_steps
            (row,) = completed
            if wait.kind == "sleep":
                # only the due scan, at or after the due time
                assert isinstance(event, AttemptDue) and event.step_index == leaf
                assert in_progress is not None and self.now >= in_progress.not_before
            elif wait.kind == "signal":
                # its signal came: now, or earlier and kept until the wait began
                assert AWAITED in self.signals
                assert row.event_data["signal"] == AWAITED
                for key, value in self.signals[AWAITED].items():
                    assert after.context.get(key) == value
                if in_progress is not None:
                    assert isinstance(event, SignalReceived) and event.signal == AWAITED
                else:
                    assert any(s.name == AWAITED for s in before.inbox)
            else:
                assert isinstance(event, VoteCast) and event.approve
                approvers = row.event_data["approvers"]
                assert len(set(approvers)) == len(approvers) >= wait.approvers
                assert set(approvers) <= self.approving
                if wait.exclude_starter:
                    assert STARTER not in approvers
        if failed:
            (row,) = failed
            error = row.event_data["error_type"]
            assert wait.kind != "sleep"
            if error == "WaitTimedOut":
                assert isinstance(event, AttemptDue) and in_progress is not None
                assert self.now >= in_progress.not_before
            else:
                assert error == "ApprovalRejected"
                assert isinstance(event, VoteCast) and not event.approve
                assert not (wait.exclude_starter and event.user_id == STARTER)

    def check_liveness(self) -> None:
        """Every attempt sent has a result on the way; held ones have the due scan."""
        for attempt in self.saga.attempts:
            if not attempt.held:
                assert any(
                    (m.step_index, m.direction, m.attempt) == attempt.key() for m in self.network
                ), f"{attempt} has no result coming: the saga would wedge"


# --------------------------------------------------------------------- tests ---


def _run(data: st.DataObject, definition: SagaDefinition, moves: int) -> Flow:
    first = start(
        definition, StartRequested("saga-f", "flow", {"seed": 1}, user_id=STARTER), T0, LIMITS
    )
    flow = Flow(definition, data, first.saga)
    flow.aborts = moves > 0 and data.draw(st.booleans(), label="aborts")
    check_saga(definition, flow.saga)
    flow.send(first.commands)
    for _ in range(moves):
        flow.act()
    # Drain: results in any order, timers when nothing else is left; no more injections.
    budget = 400
    while not flow.saga.state.is_terminal:
        budget -= 1
        assert budget > 0, "draining did not terminate"
        waiting = flow.saga.waiting_for or ""
        if waiting and flow.draw(st.sampled_from([True, True, True, False]), "answer the wait"):
            # what a wait is for: its signal, or approvals by operators
            if waiting.startswith("signal:"):
                flow.apply(SignalReceived(AWAITED, {"late": True}, user_id="svc"))
            elif waiting.startswith("approval:"):
                flow.apply(VoteCast(True, flow.draw(st.sampled_from(["a1", "a2"]), "approver")))
        elif flow.network:
            flow.deliver(flow.draw(st.integers(0, len(flow.network) - 1), "drain"))
        else:
            flow.due()
    # Everything left over, and everything once more, is stale by now.
    for leftover in [*flow.network, *flow.delivered]:
        flow.apply(leftover)
        assert flow.saga.state.is_terminal
    return flow


@settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data(), definition=definitions(), moves=st.integers(0, 40))
def test_groups_and_waits_stay_valid_under_any_delivery(
    data: st.DataObject, definition: SagaDefinition, moves: int
) -> None:
    flow = _run(data, definition, moves)
    saga = flow.saga
    event(f"end state {saga.state.value}")
    leaf = wait_leaf(definition)
    wait = None if leaf is None else definition.wait_of(leaf)
    done = "w" in saga.completed_steps
    event(f"wait: {wait.kind if wait else None}, completed: {done}")
    event(f"joined: {flow.joins}")
    event(f"a signal was kept: {flow.kept}")
    event(f"raced: {'race' in flow.moves}")
    if saga.state is SagaState.COMPLETED:
        assert flow.joins == 1
        assert flow.next_stage_starts == (0 if flow.after_group is None else 1)
    else:
        assert flow.next_stage_starts == flow.joins


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), definition=definitions())
def test_without_injections_a_flow_ends_completed_or_rolled_back(
    data: st.DataObject, definition: SagaDefinition
) -> None:
    """Results in any order and timers only: completed, or rolled back whole."""
    flow = _run(data, definition, moves=0)
    assert flow.saga.state in (SagaState.COMPLETED, SagaState.COMPENSATED, SagaState.FAILED)
