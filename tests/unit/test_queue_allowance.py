"""At most one live copy of an attempt (issue 14, item 6; DESIGN section 3).

Each send gives the attempt a start-by time (not_before + its queue allowance), which the
step message carries as Celery's `expires`; its deadline is start-by + the step's timeout.
A re-send of the same attempt doubles the allowance (up to MAX_QUEUE_ALLOWANCE_SECONDS), so
a backlog longer than timeout + grace drains instead of being re-sent until StalledTooOften.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from saga_worker.core.builder import MAX_QUEUE_ALLOWANCE_SECONDS
from saga_worker.core.decision import Limits
from saga_worker.core.events import AttemptDue, AttemptStalled, RetryRequested
from saga_worker.store.codec import pending_from_json, pending_to_json
from tests.unit.test_transition import FWD, HELD_LIMITS, LIMITS, Run, only_command

GRACE = LIMITS.stall_grace_seconds  # 30 s, the first allowance
TIMEOUT = 10.0  # the steps' timeout in make_definition


def test_a_first_send_has_the_grace_as_allowance_and_carries_its_start_by() -> None:
    run = Run()
    pending = run.saga.pending
    assert pending is not None
    assert pending.allowance == GRACE
    assert pending.start_by == pending.not_before + timedelta(seconds=GRACE)
    assert pending.deadline == pending.start_by + timedelta(seconds=TIMEOUT)
    assert only_command(run.last).start_by == pending.start_by


def test_each_re_send_doubles_the_allowance_and_moves_the_start_by() -> None:
    run = Run()  # max_recoveries=2
    for recoveries, allowance in ((0, 2 * GRACE), (1, 4 * GRACE)):
        d = run.apply(AttemptStalled(0, FWD, 1, recoveries=recoveries), advance=100.0)
        pending = run.saga.pending
        assert pending is not None and pending.allowance == allowance
        assert pending.start_by == run.now + timedelta(seconds=allowance)
        assert pending.deadline == pending.start_by + timedelta(seconds=TIMEOUT)
        cmd = only_command(d)
        assert cmd.start_by == pending.start_by
        assert d.audit[-1].event_data["queue_allowance_seconds"] == allowance


def test_an_operator_re_send_doubles_it_too() -> None:
    run = Run()
    run.apply(RetryRequested(user_id="op", force=True))
    pending = run.saga.pending
    assert pending is not None and pending.allowance == 2 * GRACE


def test_the_next_attempt_starts_again_from_the_grace() -> None:
    run = Run()
    run.apply(AttemptStalled(0, FWD, 1, recoveries=0), advance=100.0)
    run.fail()
    pending = run.saga.pending
    assert pending is not None and pending.number == 2 and pending.allowance == GRACE
    run.ok()
    pending = run.saga.pending
    assert pending is not None and pending.step_index == 1 and pending.allowance == GRACE


def test_a_held_attempt_gets_its_start_by_when_it_is_sent() -> None:
    run = Run(limits=HELD_LIMITS)
    run.fail()
    run.fail()  # the 10 s retry is held in the database
    held = run.saga.pending
    assert held is not None and held.held
    d = run.apply(AttemptDue(0, FWD, 3), advance=11)
    sent = run.saga.pending
    assert sent is not None and sent.allowance == GRACE
    assert only_command(d).start_by == run.now + timedelta(seconds=GRACE)


def test_the_checkpoint_keeps_the_allowance_and_an_old_one_falls_back_to_the_grace() -> None:
    run = Run()
    run.apply(AttemptStalled(0, FWD, 1, recoveries=0), advance=100.0)
    pending = run.saga.pending
    assert pending is not None
    assert pending_from_json(pending_to_json(pending)) == pending
    legacy = {k: v for k, v in (pending_to_json(pending) or {}).items() if k != "allowance"}
    restored = pending_from_json(legacy)
    assert restored is not None and restored.allowance == 0.0
    # Written before allowances existed: a re-send doubles the grace.
    run.saga = replace(run.saga, attempts=(restored,))
    run.apply(AttemptStalled(0, FWD, 1, recoveries=1), advance=200.0)
    again = run.saga.pending
    assert again is not None and again.allowance == 2 * GRACE


def test_repeated_re_sends_are_capped_and_do_not_overflow_the_start_by() -> None:
    """An operator's `saga-worker retry --force` re-sends at once, whatever the recoveries:
    uncapped, 60 of them (a retry loop in a runbook script) doubled 30 s past datetime.max
    and every later transition raised OverflowError."""
    run = Run(limits=Limits(stall_grace_seconds=GRACE, max_recoveries=100))
    for _ in range(60):
        run.apply(RetryRequested(user_id="op", force=True), advance=1.0)
    pending = run.saga.pending
    assert pending is not None and pending.step_index == 0 and pending.direction is FWD
    assert pending.recoveries == 60
    assert pending.allowance == MAX_QUEUE_ALLOWANCE_SECONDS
    assert pending.start_by == run.now + timedelta(seconds=MAX_QUEUE_ALLOWANCE_SECONDS)


def test_the_cap_stops_doubling_exactly_at_the_cap() -> None:
    run = Run(limits=Limits(stall_grace_seconds=GRACE, max_recoveries=100))
    allowances = []
    for _ in range(9):
        run.apply(RetryRequested(user_id="op", force=True))
        pending = run.saga.pending
        assert pending is not None
        allowances.append(pending.allowance)
    # 60, 120, ... 1920, then the cap (3840 would be over it)
    assert allowances == [GRACE * 2**n for n in range(1, 7)] + [MAX_QUEUE_ALLOWANCE_SECONDS] * 3


def test_a_grace_above_the_cap_is_kept_not_lowered() -> None:
    grace = 2 * MAX_QUEUE_ALLOWANCE_SECONDS
    run = Run(limits=Limits(stall_grace_seconds=grace, max_recoveries=3))
    run.apply(RetryRequested(user_id="op", force=True))
    pending = run.saga.pending
    assert pending is not None and pending.allowance == grace
