"""Review of issue 14, item 6: the doubled queue allowance has no bound."""

from __future__ import annotations

from datetime import timedelta

from saga_worker.core.decision import Limits
from saga_worker.core.events import AttemptStalled, RetryRequested
from tests.unit.test_transition import FWD, Run

# -- 3. the doubled allowance has no bound -------------------------------------------------


def test_repeated_re_sends_do_not_overflow_the_start_by() -> None:
    """SAGA_MAX_RECOVERIES has no upper bound (config: minimum 0), and each re-send doubles the
    queue allowance with no cap. An operator's `saga-worker retry --force` re-sends at once,
    so a few dozen of them (a retry loop in a runbook script) push start-by past
    datetime.max: the transition raises OverflowError on every later retry or stall, and the
    sweep logs "recovery failed; the next sweep tries again" for ever (it never reaches
    StalledTooOften). Long before that the allowance passes what brokers take: RabbitMQ's
    per-message TTL must fit 2**32-1 ms (~49.7 days), reached at the 18th doubling of 30 s,
    and Redis' visibility_timeout (3600 s) at the 7th."""
    run = Run(limits=Limits(stall_grace_seconds=30.0, max_recoveries=100))
    for _ in range(60):
        run.apply(RetryRequested(user_id="op", force=True), advance=1.0)
    pending = run.saga.pending
    assert pending is not None and pending.step_index == 0 and pending.direction is FWD


def test_the_allowance_stays_within_a_broker_message_ttl() -> None:
    """The same without the operator: with SAGA_MAX_RECOVERIES=20 (a value that meant about
    two hours of re-sends before this change), the sweep's last re-sends carry an `expires`
    a year out (30 s x 2**20): a lost message is retried only after that long, and the
    RabbitMQ expiration Celery derives from it (in ms) exceeds 2**32-1."""
    limits = Limits(stall_grace_seconds=30.0, max_recoveries=20)
    run = Run(limits=limits)
    for recoveries in range(20):
        pending = run.saga.pending
        assert pending is not None
        overdue = (pending.deadline - run.now).total_seconds() + 1
        run.apply(AttemptStalled(0, FWD, 1, recoveries=recoveries), advance=overdue)
    pending = run.saga.pending
    assert pending is not None
    window = pending.start_by - pending.not_before
    assert window <= timedelta(milliseconds=2**32 - 1), (
        f"queue allowance {window} after 20 re-sends: past RabbitMQ's per-message TTL limit"
    )
