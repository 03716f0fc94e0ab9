"""Property tests of `core.migration.migrate`: any reachable saga, any target, any map.

A saga is driven by `transition` (results, failures, timeouts, stalls, aborts, parking and
operator retries) to any state; it is then migrated to a random definition under a random
map. The result is a valid migration or a refusal, never an exception; a migrated saga runs
to its end under the new definition without skipping a compensation of a step that ran, and
no (step, direction, attempt) is ever issued twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from saga_worker.core.decision import Decision, Limits
from saga_worker.core.definition import SagaDefinition, Step
from saga_worker.core.events import (
    AbortRequested,
    AttemptDue,
    AttemptStalled,
    MigrateRequested,
    ParkRequested,
    RetryRequested,
    StartRequested,
    StepFailed,
    StepSucceeded,
)
from saga_worker.core.migration import Shape, migrate
from saga_worker.core.model import MAX_ATTEMPT, Direction, Saga, SagaState
from saga_worker.core.parking import park
from saga_worker.core.retry import RetryPolicy
from saga_worker.core.transition import start, transition

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
NOOP: Any = lambda call: {}  # noqa: E731
LIMITS = Limits(stall_grace_seconds=5.0, max_recoveries=1)
POOL = ["a", "b", "c", "d", "e"]
FRESH = ["f", "g"]


@st.composite
def definitions(draw: st.DrawFn, version: str) -> SagaDefinition:
    names = draw(st.lists(st.sampled_from(POOL), min_size=1, max_size=5, unique=True))
    steps = []
    for name in names:
        undo = draw(st.booleans())
        steps.append(
            Step(
                name,
                NOOP,
                NOOP if undo else None,
                compensate_on_failure=undo and draw(st.booleans()),
                retry=RetryPolicy(max_attempts=draw(st.integers(1, 3))),
                compensation_retry=RetryPolicy(max_attempts=draw(st.integers(1, 2))),
                timeout_seconds=30.0,
            )
        )
    return SagaDefinition("mig", steps, version=version)


@dataclass
class Run:
    """A saga driven by hypothesis, with every attempt key it was ever issued."""

    data: st.DataObject
    definition: SagaDefinition
    saga: Saga
    now: datetime
    issued: set[tuple[int, Direction, int]] = field(default_factory=set)

    def record(self, before: Saga, decision: Decision) -> None:
        after = decision.saga
        if decision.ignored is None and after.pending is not None:
            key = after.pending.key()
            if before.pending is None or key != before.pending.key():
                assert key not in self.issued, f"attempt {key} issued twice"
                self.issued.add(key)
            assert after.pending.number <= after.attempt_seq <= MAX_ATTEMPT
        self.saga = after

    def elapse(self, most: int) -> None:
        self.now += timedelta(seconds=self.data.draw(st.integers(0, most), label="elapsed"))

    def step(self, moves: list[str]) -> None:
        """One event, picked by hypothesis among `moves`, applied to the pending attempt."""
        saga = self.saga
        pending = saga.pending
        move = self.data.draw(st.sampled_from(moves), label="move")
        self.elapse(400)
        if move == "retry":
            decision = transition(
                self.definition, saga, RetryRequested(user_id="op"), self.now, LIMITS
            )
        elif move == "abort":
            decision = transition(
                self.definition, saga, AbortRequested("test", "op"), self.now, LIMITS
            )
        else:
            assert pending is not None
            key = (pending.step_index, pending.direction, pending.number)
            if move == "park":
                decision = park(
                    saga,
                    ParkRequested(*key, recoveries=pending.recoveries, reason="gone"),
                    self.now,
                )
            else:
                events: dict[str, Any] = {
                    "ok": StepSucceeded(*key, output={"at": move}),
                    "fail": StepFailed(*key, "E", "boom"),
                    "fatal": StepFailed(*key, "E", "boom", retryable=False),
                    "timeout": StepFailed(*key, "StepTimeout", "late", timed_out=True),
                    "stall": AttemptStalled(*key, recoveries=pending.recoveries),
                    "due": AttemptDue(*key),
                }
                decision = transition(self.definition, saga, events[move], self.now, LIMITS)
        self.record(saga, decision)

    def to_the_end(self) -> None:
        """Deliver outcomes of the pending attempt until the saga ends."""
        for _ in range(200):
            if self.saga.state.is_terminal:
                return
            self.step(["ok", "ok", "fail", "fatal", "timeout", "stall"])
        raise AssertionError(f"the saga did not end: {self.saga}")


def reach(data: st.DataObject, definition: SagaDefinition) -> Run:
    decision = start(definition, StartRequested("s-1", "mig", {"n": 1}), T0, LIMITS)
    run = Run(data, definition, decision.saga, T0)
    assert decision.saga.pending is not None
    run.issued.add(decision.saga.pending.key())
    for _ in range(data.draw(st.integers(0, 8), label="moves")):
        if run.saga.state is SagaState.FAILED:
            run.step(["retry"])
        elif run.saga.state.is_terminal:
            break
        else:
            run.step(
                ["ok", "ok", "ok", "fail", "fatal", "timeout", "stall", "abort", "park", "due"]
            )
    return run


@st.composite
def targets(draw: st.DrawFn, old: SagaDefinition) -> tuple[SagaDefinition, dict[str, str]]:
    """A new version and a map: anything at all, or (mostly) an edit of the old one."""
    version = draw(st.sampled_from(["v1", *["v2"] * 6]))
    if draw(st.integers(0, 3)) == 0:
        keys = st.sampled_from([*old.step_names, "zz"])
        values = st.sampled_from([*POOL, *FRESH, "zz"])
        return draw(definitions(version)), draw(st.dictionaries(keys, values, max_size=3))
    steps = list(old.steps)
    mapping: dict[str, str] = {}
    for edit in draw(st.lists(st.sampled_from(["rename", "insert", "drop", "flip"]), max_size=2)):
        free = [n for n in [*POOL, *FRESH] if n not in {s.name for s in steps}]
        i = draw(st.integers(0, len(steps) - 1))
        if edit == "rename" and free:
            renamed = draw(st.sampled_from(free))
            mapping.update({k: renamed for k, v in mapping.items() if v == steps[i].name})
            mapping.setdefault(steps[i].name, renamed)
            steps[i] = Step(renamed, NOOP, steps[i].compensate, retry=steps[i].retry)
        elif edit == "insert" and free:
            undo = NOOP if draw(st.booleans()) else None
            steps.insert(
                draw(st.integers(0, len(steps))), Step(draw(st.sampled_from(free)), NOOP, undo)
            )
        elif edit == "drop" and len(steps) > 1:
            steps.pop(i)
        elif edit == "flip":
            steps[i] = Step(steps[i].name, NOOP, None if steps[i].compensate else NOOP)
    return SagaDefinition("mig", steps, version=version), mapping


@settings(
    max_examples=600,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_a_migration_is_valid_or_refused_and_never_skips_a_compensation(
    data: st.DataObject,
) -> None:
    old = data.draw(definitions("v1"), label="old")
    run = reach(data, old)
    new, mapping = data.draw(targets(old), label="target")
    run.elapse(data.draw(st.sampled_from([0, *[4000] * 5]), label="wait"))
    before = run.saga
    request = MigrateRequested(mapping, user_id="op", reason="move")
    decision = migrate(new, before, Shape.of(old, "v1"), request, run.now, LIMITS)
    event(f"{before.state.value}: {'refused' if decision.ignored else 'migrated'}")
    if decision.ignored is not None:
        assert decision.saga == before and decision.audit == () and decision.commands == ()
        assert decision.ignored.startswith("cannot migrate saga s-1")
        return
    after = decision.saga
    pending = after.pending
    assert not before.state.is_terminal and after.state is before.state
    assert before.definition_version == "v1" != new.version == after.definition_version
    assert after.parked_at is None and after.total_steps == len(new.steps)
    assert after.context == before.context
    # A fresh attempt number: no token or late result of an old attempt matches it.
    assert pending is not None and pending.number == pending.first == before.attempt_seq + 1
    assert not pending.held and pending.number == after.attempt_seq
    assert [c.attempt for c in decision.commands] == [pending.number]
    migrated, started = decision.audit
    assert migrated.event_type == "saga_migrated"
    assert (
        started.event_type
        == f"{'step' if pending.direction is Direction.FORWARD else 'compensation'}_start"
    )
    assert migrated.user_id == "op" and migrated.event_data["reason"] == "move"
    assert migrated.event_data["resume_step"] == new.step_names[pending.step_index]
    rename = {n: mapping.get(n, n) for n in old.step_names}
    assert after.completed_steps == tuple(rename[n] for n in before.completed_steps)
    if before.state is SagaState.RUNNING:
        # Exactly the completed steps come first: none skipped, none run again.
        assert after.completed_steps == new.step_names[: len(after.completed_steps)]
        assert pending.step_index == len(after.completed_steps)
    old_steps = {s.name: s for s in old.steps}
    must_undo = {
        rename[n]
        for n in before.completed_steps
        if old_steps[n].compensate is not None
        and n not in before.compensated_steps + before.failed_compensations
    }
    run.record(before, decision)
    run.definition = new
    run.to_the_end()
    end = run.saga
    event(f"then {end.state.value}")
    if end.state is SagaState.COMPLETED:
        assert end.completed_steps == new.step_names
    else:
        settled = set(end.compensated_steps) | set(end.failed_compensations)
        assert must_undo <= settled, (must_undo, end)
        # Nothing compensated before the migration was compensated again after it.
        assert len(set(end.compensated_steps)) == len(end.compensated_steps)
