"""Review of issue 14, item 6: the doubled queue allowance has no bound."""

from __future__ import annotations

from saga_worker.core.decision import Limits
from saga_worker.core.events import RetryRequested
from tests.unit.test_transition import FWD, Run


def test_repeated_re_sends_do_not_overflow_the_start_by() -> None:
    """SAGA_MAX_RECOVERIES has no upper bound (config: minimum 0), and each re-send doubles the
    queue allowance with no cap. An operator's `saga-worker retry --force` re-sends at once,
    so a few dozen of them (a retry loop in a runbook script) push start-by past
    datetime.max: the transition raises OverflowError on every later retry or stall, and the
    sweep logs "recovery failed; the next sweep tries again" for ever (it never reaches
    StalledTooOften). Without an operator the same unbounded doubling shows as waits: with
    SAGA_MAX_RECOVERIES=20 (about two hours of re-sends before this change) the 20th re-send
    of a lost message waits 30 s x 2**20, a year, for its deadline."""
    run = Run(limits=Limits(stall_grace_seconds=30.0, max_recoveries=100))
    for _ in range(60):
        run.apply(RetryRequested(user_id="op", force=True), advance=1.0)
    pending = run.saga.pending
    assert pending is not None and pending.step_index == 0 and pending.direction is FWD
