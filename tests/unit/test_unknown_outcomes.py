"""A step that fails for good with an unknown outcome is compensated itself (issue 14, item 5).

Its last attempt timed out, its worker was lost, or it stalled too often: it may have taken
effect, so its own compensation runs first, then those of the completed steps. A step may
opt in to the same for ordinary failures (`compensate_on_failure=True`).
"""

from __future__ import annotations

from typing import Any

import pytest

from saga_worker.core.definition import SagaDefinition, Step
from saga_worker.core.events import AbortRequested, AttemptStalled, StepFailed
from saga_worker.core.model import SagaState
from saga_worker.core.retry import RetryPolicy
from saga_worker.errors import InvalidSagaDefinition
from saga_worker.store.codec import pending_from_json, pending_to_json
from tests.unit.test_transition import (
    COMP,
    FWD,
    HELD_LIMITS,
    LIMITS,
    NO_JITTER,
    NOOP,
    Run,
    make_definition,
    steps_of,
    types,
)


def _fail(run: Run, *, error_type: str = "RuntimeError", timed_out: bool = False) -> Any:
    p = run.saga.pending
    assert p is not None
    return run.apply(
        StepFailed(p.step_index, p.direction, p.number, error_type, "boom", timed_out=timed_out)
    )


def _timeout_until_given_up(run: Run) -> None:
    p = run.saga.pending
    assert p is not None
    key = (p.step_index, p.direction)
    while (
        run.saga.pending is not None
        and (
            run.saga.pending.step_index,
            run.saga.pending.direction,
        )
        == key
    ):
        _fail(run, error_type="StepTimeout", timed_out=True)


def test_a_step_whose_last_attempt_timed_out_is_compensated_first() -> None:
    run = Run()
    run.ok()  # reserve
    _timeout_until_given_up(run)  # charge: 3 attempts, each past its timeout
    failed = run.audit()[-2]
    assert steps_of(run.last.audit) == [
        ("step_failed", "charge"),
        ("compensation_start", "charge"),
    ]
    assert failed.event_data["outcome_unknown"] is True
    assert failed.event_data["own_compensation"] is True
    assert run.saga.state is SagaState.COMPENSATING
    cmd = run.last.commands[0]
    assert (cmd.step_index, cmd.direction, cmd.attempt) == (1, COMP, 1)
    d = run.ok()
    assert steps_of(d.audit) == [
        ("compensation_complete", "charge"),
        ("compensation_start", "reserve"),
    ]
    d = run.ok()
    assert types(d.audit)[-1] == "saga_compensated"
    assert run.saga.completed_steps == ("reserve",)
    assert run.saga.compensated_steps == ("charge", "reserve")
    assert d.audit[-1].event_data["compensated_steps"] == ["charge", "reserve"]


@pytest.mark.parametrize(
    "error_type", ["WorkerLostError", "TimeLimitExceeded", "SoftTimeLimitExceeded"]
)
def test_a_lost_or_killed_remote_worker_is_an_unknown_outcome(error_type: str) -> None:
    """What saga_remote's errback reports when the remote worker died or was killed."""
    run = Run(definition=make_definition(retry=RetryPolicy(max_attempts=1)))
    _fail(run, error_type=error_type)
    assert steps_of(run.last.audit) == [
        ("step_failed", "reserve"),
        ("compensation_start", "reserve"),
    ]


def test_a_step_that_stalled_too_often_is_compensated_first() -> None:
    run = Run(limits=LIMITS)  # max_recoveries=2
    run.ok()
    for n in (0, 1, 2):
        d = run.apply(AttemptStalled(1, FWD, 1, recoveries=n))
    assert steps_of(d.audit) == [("step_failed", "charge"), ("compensation_start", "charge")]
    assert d.audit[0].event_data["error_type"] == "StalledTooOften"


def test_an_ordinary_failure_does_not_compensate_the_failed_step() -> None:
    run = Run()
    run.ok()
    run.fail_until_given_up()
    assert steps_of(run.last.audit) == [
        ("step_failed", "charge"),
        ("compensation_start", "reserve"),
    ]
    assert "own_compensation" not in run.last.audit[0].event_data


def test_an_earlier_timed_out_attempt_makes_a_later_ordinary_failure_uncertain() -> None:
    """Attempt 1 timed out (it may have taken effect); attempts 2 and 3 raised."""
    run = Run()
    run.ok()
    _fail(run, error_type="StepTimeout", timed_out=True)
    assert run.saga.pending is not None and run.saga.pending.uncertain
    run.fail()
    run.fail()
    assert steps_of(run.last.audit) == [
        ("step_failed", "charge"),
        ("compensation_start", "charge"),
    ]


def test_a_re_sent_attempt_is_uncertain_a_stalled_copy_may_have_run() -> None:
    run = Run()
    run.ok()
    run.apply(AttemptStalled(1, FWD, 1, recoveries=0), advance=100.0)
    assert run.saga.pending is not None and run.saga.pending.uncertain
    run.fail_until_given_up()
    assert ("compensation_start", "charge") in steps_of(run.audit())


def test_compensate_on_failure_compensates_an_ordinary_failure_too() -> None:
    definition = SagaDefinition(
        "order",
        [
            Step("reserve", NOOP, NOOP, retry=NO_JITTER, timeout_seconds=10),
            Step(
                "charge",
                NOOP,
                NOOP,
                retry=NO_JITTER,
                timeout_seconds=10,
                compensate_on_failure=True,
            ),
        ],
    )
    run = Run(definition=definition)
    run.ok()
    run.fail_until_given_up()
    assert steps_of(run.last.audit) == [
        ("step_failed", "charge"),
        ("compensation_start", "charge"),
    ]
    assert "outcome_unknown" not in run.last.audit[0].event_data
    run.ok()
    run.ok()
    assert run.saga.state is SagaState.COMPENSATED


def test_a_non_retryable_failure_with_compensate_on_failure_is_compensated() -> None:
    definition = SagaDefinition(
        "order", [Step("pay", NOOP, NOOP, compensate_on_failure=True, timeout_seconds=10)]
    )
    run = Run(definition=definition)
    run.fail(retryable=False)
    assert steps_of(run.last.audit) == [("step_failed", "pay"), ("compensation_start", "pay")]


def test_a_step_without_compensation_that_times_out_rolls_back_the_others() -> None:
    run = Run(definition=make_definition(compensations=(True, False, True)))
    run.ok()
    _timeout_until_given_up(run)
    assert steps_of(run.last.audit) == [
        ("step_failed", "charge"),
        ("compensation_start", "reserve"),
    ]
    assert "own_compensation" not in run.last.audit[0].event_data


def test_its_own_compensation_failing_goes_on_with_the_rest_and_ends_failed() -> None:
    run = Run()
    run.ok()
    _timeout_until_given_up(run)
    run.fail_until_given_up()  # charge's compensation
    assert run.saga.failed_compensations == ("charge",)
    run.ok()  # reserve's compensation
    assert run.saga.state is SagaState.FAILED


def test_an_abort_that_cancels_a_held_retry_after_a_timeout_compensates_the_step() -> None:
    run = Run(limits=HELD_LIMITS)  # the second retry (10 s) is held in the database
    run.ok()
    _fail(run, error_type="StepTimeout", timed_out=True)
    run.fail()
    assert run.saga.pending is not None and run.saga.pending.held
    d = run.apply(AbortRequested(reason="stop", user_id="op"))
    assert steps_of(d.audit) == [
        ("abort_requested", "charge"),
        ("compensation_start", "charge"),
    ]
    run.ok()
    run.ok()
    assert run.saga.state is SagaState.ABORTED
    assert run.saga.compensated_steps == ("charge", "reserve")


def test_an_aborted_step_that_then_times_out_is_compensated() -> None:
    run = Run()
    run.ok()
    run.apply(AbortRequested(reason="stop"))
    _fail(run, error_type="StepTimeout", timed_out=True)
    assert steps_of(run.last.audit) == [
        ("step_failed", "charge"),
        ("compensation_start", "charge"),
    ]


def test_compensate_on_failure_needs_a_compensation() -> None:
    with pytest.raises(InvalidSagaDefinition, match="compensate_on_failure"):
        SagaDefinition("order", [Step("pay", NOOP, compensate_on_failure=True)])


def test_the_checkpoint_keeps_an_uncertain_attempt() -> None:
    run = Run()
    _fail(run, error_type="StepTimeout", timed_out=True)
    pending = run.saga.pending
    assert pending is not None and pending.uncertain
    assert pending_from_json(pending_to_json(pending)) == pending
    legacy = {k: v for k, v in (pending_to_json(pending) or {}).items() if k != "uncertain"}
    restored = pending_from_json(legacy)
    assert restored is not None and not restored.uncertain
