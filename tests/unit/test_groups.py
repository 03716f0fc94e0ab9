"""Parallel groups in the pure core (issue 16, DESIGN section 10): every branch starts in one
decision, the join is the transition of the last branch to complete, and a branch that fails
for good rolls the saga back once no branch is running any more."""

from __future__ import annotations

import itertools
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest

from saga_worker.core.decision import Decision
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
from saga_worker.core.model import Attempt, Direction, Saga, SagaState
from saga_worker.core.retry import RetryPolicy
from saga_worker.core.stages import Parallel
from saga_worker.core.transition import start, transition
from tests.unit.test_transition import (
    COMP,
    FWD,
    HELD_LIMITS,
    LIMITS,
    NO_JITTER,
    NOOP,
    NOW,
    C,
    R,
    Run,
    only_command,
    sent,
    steps_of,
    types,
)

#: Retries 60 s apart or more: past HELD_LIMITS' broker delay, so they wait in the database.
SLOW = RetryPolicy(
    max_attempts=3,
    initial_delay_seconds=60.0,
    backoff_factor=2.0,
    max_delay_seconds=600.0,
    jitter=0.0,
)


def grouped(
    branches: tuple[str, ...] = ("left", "middle", "right"),
    *,
    compensated: tuple[str, ...] | None = None,
    tail: bool = True,
    retry: RetryPolicy = NO_JITTER,
) -> SagaDefinition:
    """prepare, then a group of `branches`, then book (when `tail`). Leaves: prepare is 0,
    the branches 1.., book the last."""
    undone = branches if compensated is None else compensated
    return SagaDefinition(
        "grp",
        [
            Step("prepare", NOOP, NOOP, retry=retry, timeout_seconds=10),
            Parallel(
                "checks",
                [
                    Step(
                        name,
                        NOOP,
                        NOOP if name in undone else None,
                        retry=retry,
                        timeout_seconds=10,
                    )
                    for name in branches
                ],
            ),
            *([Step("book", NOOP, NOOP, retry=retry, timeout_seconds=10)] if tail else []),
        ],
    )


GROUP = grouped()  # prepare 0, left 1, middle 2, right 3, book 4
PAIR = grouped(("left", "right"))  # prepare 0, left 1, right 2, book 3


# ------------------------------------------------------------------- helpers ---


def attempt_of(run: Run, index: int, direction: Direction = FWD) -> Attempt:
    """The one attempt in flight for leaf `index` in `direction`."""
    found = [a for a in run.saga.attempts if (a.step_index, a.direction) == (index, direction)]
    assert len(found) == 1, run.saga.attempts
    return found[0]


def keys(saga: Saga) -> list[tuple[int, Direction, int]]:
    return [a.key() for a in saga.attempts]


def ok_at(
    run: Run, index: int, output: dict[str, Any] | None = None, *, direction: Direction = FWD
) -> Decision:
    """The attempt in flight for leaf `index` succeeds."""
    number = attempt_of(run, index, direction).number
    return run.apply(StepSucceeded(index, direction, number, output or {}))


def fail_at(
    run: Run,
    index: int,
    *,
    retryable: bool = True,
    message: str = "boom",
    error_type: str = "RuntimeError",
    timed_out: bool = False,
) -> Decision:
    """The forward attempt in flight for leaf `index` fails."""
    number = attempt_of(run, index).number
    return run.apply(
        StepFailed(
            index, FWD, number, error_type, message, retryable=retryable, timed_out=timed_out
        )
    )


def in_group(definition: SagaDefinition = GROUP, **limits: Any) -> Run:
    """A run whose first step completed: every branch of the group is in flight."""
    run = Run(definition, **limits)
    ok_at(run, 0)
    return run


def compensate_all(run: Run) -> None:
    """Each compensation in turn succeeds until the rollback ends."""
    while run.saga.state is C:
        run.ok()


def ignored_without_effect(run: Run, event: Any) -> None:
    saga = run.saga
    d = run.apply(event)
    assert d.ignored is not None, event
    assert d.saga is saga and d.audit == () and d.commands == ()


def starts_of(run: Run, name: str) -> int:
    return steps_of(run.audit()).count(("step_start", name))


# -------------------------------------------------------------- entering one ---


def test_entering_a_group_sends_every_branch_in_one_decision() -> None:
    run = Run(GROUP)
    d = ok_at(run, 0, {"prepared": True})
    assert steps_of(d.audit) == [
        ("step_complete", "prepare"),
        ("step_start", "left"),
        ("step_start", "middle"),
        ("step_start", "right"),
    ]
    assert [e.step_index for e in d.audit[1:]] == [1, 2, 3]
    assert all((e.state_before, e.state_after) == (R, R) for e in d.audit)
    assert d.commands == tuple(sent(i, FWD, 1, run.now) for i in (1, 2, 3))
    saga = run.saga
    assert keys(saga) == [(1, FWD, 1), (2, FWD, 1), (3, FWD, 1)]
    assert saga.current_step_index == 1  # the group's first leaf
    assert saga.state is R and saga.completed_steps == ("prepare",)
    assert saga.waiting_for is None


def test_a_group_as_the_first_stage_starts_every_branch_with_the_saga() -> None:
    definition = SagaDefinition(
        "first",
        [Parallel("g", [Step("a", NOOP), Step("b", NOOP)]), Step("c", NOOP)],
    )
    d = start(definition, StartRequested("saga-1", "first", {}), NOW, LIMITS)
    assert steps_of(d.audit) == [("saga_start", None), ("step_start", "a"), ("step_start", "b")]
    assert [(c.step_index, c.attempt) for c in d.commands] == [(0, 1), (1, 1)]
    assert keys(d.saga) == [(0, FWD, 1), (1, FWD, 1)]


# ------------------------------------------------------------------- the join ---


@pytest.mark.parametrize("order", list(itertools.permutations((1, 2, 3))))
def test_branches_complete_in_any_order_and_join_once(order: tuple[int, ...]) -> None:
    run = in_group()
    for n, index in enumerate(order):
        name = GROUP.steps[index].name
        d = ok_at(run, index, {name: n})
        if n < len(order) - 1:
            assert steps_of(d.audit) == [("step_complete", name)]
            assert d.commands == ()
            assert run.saga.current_step_index == 1
            assert len(run.saga.attempts) == len(order) - n - 1
        else:
            # The join is this very transition: the next stage starts in it.
            assert steps_of(d.audit) == [("step_complete", name), ("step_start", "book")]
            assert only_command(d) == sent(4, FWD, 1, run.now)
    assert starts_of(run, "book") == 1
    saga = run.saga
    assert saga.completed_steps == ("prepare", *(GROUP.steps[i].name for i in order))
    assert saga.context == {GROUP.steps[i].name: n for n, i in enumerate(order)}
    assert keys(saga) == [(4, FWD, 1)] and saga.current_step_index == 4
    d = run.ok()
    assert types(d.audit) == ["step_complete", "saga_complete"]
    assert run.saga.state is SagaState.COMPLETED


def test_a_group_as_the_last_stage_completes_the_saga_once() -> None:
    run = in_group(grouped(("left", "right"), tail=False))
    assert steps_of(ok_at(run, 2).audit) == [("step_complete", "right")]
    d = ok_at(run, 1)
    assert steps_of(d.audit) == [("step_complete", "left"), ("saga_complete", None)]
    assert run.saga.state is SagaState.COMPLETED and run.saga.attempts == ()
    for late in (StepSucceeded(1, FWD, 1, {}), StepSucceeded(2, FWD, 1, {})):
        ignored_without_effect(run, late)
    assert types(run.audit()).count("saga_complete") == 1


def test_results_of_a_completed_branch_duplicates_and_late_ones_are_ignored() -> None:
    run = in_group(PAIR)
    first = StepSucceeded(1, FWD, 1, {"left": 1})
    run.apply(first)
    for stale in (
        first,  # the very same message again
        StepSucceeded(1, FWD, 1, {"left": 2}),  # another copy of the same attempt
        StepFailed(1, FWD, 1, "RuntimeError", "late failure"),
        StepSucceeded(1, FWD, 2, {}),  # an attempt never issued
        StepSucceeded(1, COMP, 1, {}),
        AttemptStalled(1, FWD, 1, 0),
    ):
        ignored_without_effect(run, stale)
    assert run.saga.context == {"left": 1}
    ok_at(run, 2)  # the join
    for stale in (first, StepSucceeded(2, FWD, 1, {}), StepFailed(2, FWD, 1, "E", "late")):
        ignored_without_effect(run, stale)
    assert starts_of(run, "book") == 1
    assert run.saga.completed_steps == ("prepare", "left", "right")


def _race(loaded: Saga, first: Any, second: Any, definition: SagaDefinition) -> Decision:
    """Two workers apply `first` and `second` to the same loaded checkpoint; `first` commits,
    `second`'s write fails the version check, and it is applied again to what was
    committed (the engine's reload). Returns that second decision."""
    at = NOW + timedelta(minutes=1)
    alone = [transition(definition, loaded, e, at, LIMITS) for e in (first, second)]
    for decision in alone:
        assert decision.ignored is None
        check_group_saga(definition, decision.saga)
    committed = alone[0].saga
    return transition(definition, committed, second, at + timedelta(seconds=1), LIMITS)


def check_group_saga(definition: SagaDefinition, saga: Saga) -> None:
    """What any checkpoint of these tests must satisfy."""
    forward = [a for a in saga.attempts if a.direction is FWD]
    compensating = [a for a in saga.attempts if a.direction is COMP]
    assert not (forward and compensating) and len(compensating) <= 1
    assert len(set(saga.completed_steps)) == len(saga.completed_steps)
    assert not {definition.steps[a.step_index].name for a in forward} & set(saga.completed_steps)
    if compensating:
        assert saga.state is C
    if saga.state.is_terminal:
        assert saga.attempts == ()


@pytest.mark.parametrize("swap", [False, True])
def test_two_workers_racing_on_one_checkpoint_join_once(swap: bool) -> None:
    run = in_group(PAIR)
    loaded = run.saga
    left, right = StepSucceeded(1, FWD, 1, {"left": 1}), StepSucceeded(2, FWD, 1, {"right": 1})
    first, second = (right, left) if swap else (left, right)
    at = NOW + timedelta(minutes=1)
    # Each alone, on the checkpoint both workers loaded: its branch completes, no join (the
    # other branch is still running as far as that checkpoint says).
    for event in (first, second):
        alone = transition(PAIR, loaded, event, at, LIMITS)
        assert steps_of(alone.audit) == [("step_complete", PAIR.steps[event.step_index].name)]
        assert alone.commands == ()
        assert keys(alone.saga) == [(3 - event.step_index, FWD, 1)]
    # The loser reloads what the winner committed: it now is the last branch, and joins.
    joined = _race(loaded, first, second, PAIR)
    assert steps_of(joined.audit) == [
        ("step_complete", PAIR.steps[second.step_index].name),
        ("step_start", "book"),
    ]
    assert [(c.step_index, c.direction, c.attempt) for c in joined.commands] == [(3, FWD, 1)]
    assert joined.saga.context == {"left": 1, "right": 1}
    # Either result once more (a redelivery after the commit) is a no-op.
    for event in (first, second):
        again = transition(PAIR, joined.saga, event, at + timedelta(seconds=2), LIMITS)
        assert again.ignored is not None and again.commands == ()


def test_the_last_two_of_three_branches_racing_join_once() -> None:
    run = in_group()
    ok_at(run, 1)
    loaded = run.saga
    middle, right = StepSucceeded(2, FWD, 1, {}), StepSucceeded(3, FWD, 1, {})
    for first, second in ((middle, right), (right, middle)):
        joined = _race(loaded, first, second, GROUP)
        assert types(joined.audit) == ["step_complete", "step_start"]
        assert joined.audit[-1].step_name == "book"
        assert len(joined.commands) == 1


@pytest.mark.parametrize("swap", [False, True])
def test_a_failure_and_a_success_racing_roll_back_the_completed_branch(swap: bool) -> None:
    run = in_group(PAIR)
    loaded = run.saga
    failure = StepFailed(1, FWD, 1, "RuntimeError", "no", retryable=False)
    success = StepSucceeded(2, FWD, 1, {})
    first, second = (success, failure) if swap else (failure, success)
    last = _race(loaded, first, second, PAIR)
    assert last.audit[-1].event_type == "compensation_start"
    assert last.audit[-1].step_name == "right"
    assert [(c.step_index, c.direction) for c in last.commands] == [(2, COMP)]
    assert last.saga.state is C and last.saga.completed_steps == ("prepare", "right")


# --------------------------------------------------------- a branch fails ---


def test_a_failed_branch_waits_for_the_running_ones_then_compensates_in_reverse_order() -> None:
    run = in_group()
    d = fail_at(run, 1, retryable=False, message="limits exceeded")
    assert steps_of(d.audit) == [("step_failed", "left")]
    assert (d.audit[0].state_before, d.audit[0].state_after) == (R, C)
    assert d.commands == ()  # middle and right still run: nothing is compensated yet
    assert run.saga.state is C
    assert run.saga.error == "step 'left' failed: limits exceeded"
    assert keys(run.saga) == [(2, FWD, 1), (3, FWD, 1)]

    d = ok_at(run, 3)  # completes while rolling back: it will be compensated
    assert steps_of(d.audit) == [("step_complete", "right")]
    assert (d.audit[0].state_before, d.audit[0].state_after) == (C, C)
    assert d.commands == ()
    d = ok_at(run, 2)  # no branch left running: the rollback begins
    assert steps_of(d.audit) == [("step_complete", "middle"), ("compensation_start", "right")]
    assert only_command(d) == sent(3, COMP, 1, run.now)

    # completed branches in reverse listed order, then the steps before the group
    assert steps_of(run.ok().audit) == [
        ("compensation_complete", "right"),
        ("compensation_start", "middle"),
    ]
    assert steps_of(run.ok().audit) == [
        ("compensation_complete", "middle"),
        ("compensation_start", "prepare"),
    ]
    assert types(run.ok().audit) == ["compensation_complete", "saga_compensated"]
    saga = run.saga
    assert saga.state is SagaState.COMPENSATED
    assert saga.compensated_steps == ("right", "middle", "prepare")
    assert saga.error == "step 'left' failed: limits exceeded"
    assert starts_of(run, "book") == 0


def test_the_other_branch_failing_too_rolls_back_with_both_failures_in_the_error() -> None:
    run = in_group(PAIR)
    fail_at(run, 1, retryable=False, message="first")
    d = fail_at(run, 2, retryable=True, message="second")  # attempts left: not retried
    assert steps_of(d.audit) == [("step_failed", "right"), ("compensation_start", "prepare")]
    assert only_command(d) == sent(0, COMP, 1, run.now)
    assert run.saga.error == "step 'left' failed: first; step 'right' failed: second"
    assert "step_retry" not in types(run.audit())
    compensate_all(run)
    assert run.saga.state is SagaState.COMPENSATED
    assert run.saga.compensated_steps == ("prepare",)
    assert run.saga.error == "step 'left' failed: first; step 'right' failed: second"


def test_a_branch_retry_sent_before_a_sibling_failed_is_not_retried_again() -> None:
    run = in_group(PAIR)
    d = fail_at(run, 2)  # right: retried in 5 s, a broker countdown (sent)
    assert types(d.audit) == ["step_retry", "step_start"]
    fail_at(run, 1, retryable=False)
    # A sent retry cannot be recalled: it is awaited, and its failure is final.
    assert keys(run.saga) == [(2, FWD, 2)]
    d = fail_at(run, 2)
    assert steps_of(d.audit) == [("step_failed", "right"), ("compensation_start", "prepare")]
    assert types(run.audit()).count("step_retry") == 1


def test_a_held_retry_of_a_branch_is_cancelled_when_a_sibling_fails_for_good() -> None:
    run = in_group(grouped(("left", "right"), retry=SLOW), limits=HELD_LIMITS)
    d = fail_at(run, 2)  # right: retry in 60 s, held in the database
    assert types(d.audit) == ["step_retry"] and d.commands == ()
    assert attempt_of(run, 2).held
    d = fail_at(run, 1, retryable=False)
    # Nothing runs any more: the held retry is dropped and the rollback begins at once.
    assert steps_of(d.audit) == [("step_failed", "left"), ("compensation_start", "prepare")]
    assert keys(run.saga) == [(0, COMP, 1)]
    ignored_without_effect(run, AttemptDue(2, FWD, 2))
    compensate_all(run)
    assert run.saga.state is SagaState.COMPENSATED
    assert starts_of(run, "right") == 1


def test_a_cancelled_held_retry_that_may_have_taken_effect_is_compensated() -> None:
    run = in_group(grouped(("left", "right"), retry=SLOW), limits=HELD_LIMITS)
    fail_at(run, 2, error_type="StepTimeout", timed_out=True)  # right may have taken effect
    assert attempt_of(run, 2).uncertain
    d = fail_at(run, 1, retryable=False)
    assert steps_of(d.audit) == [("step_failed", "left"), ("compensation_start", "right")]
    assert run.saga.undo == ("right",)
    compensate_all(run)
    assert run.saga.compensated_steps == ("right", "prepare")
    assert run.saga.completed_steps == ("prepare",)


def test_a_due_held_retry_of_a_branch_is_sent_alone() -> None:
    run = in_group(grouped(("left", "right"), retry=SLOW), limits=HELD_LIMITS)
    fail_at(run, 1)
    right = attempt_of(run, 2)
    d = run.apply(AttemptDue(1, FWD, 2), advance=61)
    assert steps_of(d.audit) == [("step_start", "left")]
    assert [(c.step_index, c.attempt) for c in d.commands] == [(1, 2)]
    assert attempt_of(run, 2) == right
    ok_at(run, 1)
    assert steps_of(ok_at(run, 2).audit) == [("step_complete", "right"), ("step_start", "book")]


# ------------------------------------------------------------------- aborts ---


def test_abort_inside_a_group_waits_for_the_branches_in_flight() -> None:
    run = in_group()
    d = run.apply(AbortRequested("customer cancelled", user_id="ops"))
    assert types(d.audit) == ["abort_requested"] and d.commands == ()
    assert run.saga.state is R and run.saga.abort_requested
    assert keys(run.saga) == [(1, FWD, 1), (2, FWD, 1), (3, FWD, 1)]

    d = ok_at(run, 2)
    assert steps_of(d.audit) == [("step_complete", "middle")] and d.commands == ()
    assert (d.audit[0].state_before, d.audit[0].state_after) == (R, C)
    d = fail_at(run, 1)  # retryable with attempts left, but the saga rolls back
    assert steps_of(d.audit) == [("step_failed", "left")] and d.commands == ()
    d = ok_at(run, 3)
    assert steps_of(d.audit) == [("step_complete", "right"), ("compensation_start", "right")]
    compensate_all(run)
    saga = run.saga
    assert saga.state is SagaState.ABORTED
    assert saga.compensated_steps == ("right", "middle", "prepare")
    assert "step_retry" not in types(run.audit())
    assert starts_of(run, "book") == 0


def test_abort_cancels_a_held_retry_of_a_branch_and_awaits_the_other() -> None:
    run = in_group(grouped(("left", "right"), retry=SLOW), limits=HELD_LIMITS)
    fail_at(run, 1)  # left: held retry
    d = run.apply(AbortRequested("stop", user_id="ops"))
    assert types(d.audit) == ["abort_requested"] and d.commands == ()
    assert keys(run.saga) == [(2, FWD, 1)]  # right still runs; left's retry never will
    ignored_without_effect(run, AttemptDue(1, FWD, 2))
    d = ok_at(run, 2)
    assert steps_of(d.audit) == [("step_complete", "right"), ("compensation_start", "right")]
    compensate_all(run)
    assert run.saga.state is SagaState.ABORTED
    assert run.saga.compensated_steps == ("right", "prepare")
    assert starts_of(run, "left") == 1


def test_abort_with_every_branch_held_rolls_back_at_once() -> None:
    run = in_group(grouped(("left", "right"), retry=SLOW), limits=HELD_LIMITS)
    fail_at(run, 1)
    fail_at(run, 2)
    assert all(a.held for a in run.saga.attempts)
    d = run.apply(AbortRequested("stop"))
    assert steps_of(d.audit) == [("abort_requested", "left"), ("compensation_start", "prepare")]
    assert keys(run.saga) == [(0, COMP, 1)]
    compensate_all(run)
    assert run.saga.state is SagaState.ABORTED


# -------------------------------------------------------- recovery, unknowns ---


def test_a_stalled_branch_is_re_sent_alone() -> None:
    run = in_group()
    ok_at(run, 1)
    right = attempt_of(run, 3)
    d = run.apply(AttemptStalled(2, FWD, 1, recoveries=0), advance=100)
    assert steps_of(d.audit) == [("saga_recovered", "middle"), ("step_start", "middle")]
    assert only_command(d) == replace(
        sent(2, FWD, 1, run.now, recoveries=1), start_by=run.now + timedelta(seconds=60)
    )
    assert attempt_of(run, 2).recoveries == 1 and attempt_of(run, 2).uncertain
    assert attempt_of(run, 3) == right
    ignored_without_effect(run, AttemptStalled(2, FWD, 1, recoveries=0))  # a racing scan
    ok_at(run, 3)
    d = ok_at(run, 2)
    assert steps_of(d.audit) == [("step_complete", "middle"), ("step_start", "book")]
    assert starts_of(run, "book") == 1


def test_a_branch_that_stalls_too_often_fails_and_is_compensated_after_the_others() -> None:
    run = in_group(PAIR)  # LIMITS: max_recoveries=2
    for n in (0, 1):
        run.apply(AttemptStalled(1, FWD, 1, recoveries=n))
    d = run.apply(AttemptStalled(1, FWD, 1, recoveries=2))
    assert steps_of(d.audit) == [("step_failed", "left")] and d.commands == ()
    assert d.audit[0].event_data["error_type"] == "StalledTooOften"
    assert run.saga.undo == ("left",)
    d = ok_at(run, 2)
    assert steps_of(d.audit) == [("step_complete", "right"), ("compensation_start", "right")]
    compensate_all(run)
    assert run.saga.compensated_steps == ("right", "left", "prepare")


def test_a_branch_with_an_unknown_outcome_is_compensated_itself() -> None:
    run = in_group()
    d = fail_at(run, 2, retryable=False, error_type="StepTimeout", timed_out=True)
    assert steps_of(d.audit) == [("step_failed", "middle")] and d.commands == ()
    data = d.audit[0].event_data
    assert data["outcome_unknown"] is True and data["own_compensation"] is True
    assert run.saga.undo == ("middle",)
    ok_at(run, 1)
    d = ok_at(run, 3)
    assert steps_of(d.audit) == [("step_complete", "right"), ("compensation_start", "right")]
    compensate_all(run)
    saga = run.saga
    assert saga.state is SagaState.COMPENSATED
    # reverse listed order, the failed one in its place
    assert saga.compensated_steps == ("right", "middle", "left", "prepare")
    assert "middle" not in saga.completed_steps


def test_a_branch_without_compensation_is_skipped_in_the_rollback() -> None:
    run = in_group(grouped(compensated=("left",)))
    ok_at(run, 1)
    ok_at(run, 2)
    d = fail_at(run, 3, retryable=False)
    assert steps_of(d.audit) == [("step_failed", "right"), ("compensation_start", "left")]
    compensate_all(run)
    assert run.saga.compensated_steps == ("left", "prepare")


def test_an_operator_retry_of_a_group_re_sends_each_branch_in_flight() -> None:
    run = in_group()
    ok_at(run, 2)
    refused = run.apply(RetryRequested(user_id="op"))
    assert refused.ignored is not None and "--force" in refused.ignored
    d = run.apply(RetryRequested(user_id="op", force=True))
    assert steps_of(d.audit) == [
        ("saga_recovered", "left"),
        ("step_start", "left"),
        ("saga_recovered", "right"),
        ("step_start", "right"),
    ]
    assert [(c.step_index, c.attempt) for c in d.commands] == [(1, 1), (3, 1)]
