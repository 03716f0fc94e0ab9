"""Issue 14, item 3: fresh attempt numbers, never reused, always within what messages carry.

An attempt's token binds (saga, step, direction, attempt number): a number issued twice for
one step and direction makes every old message of the first issue valid again.
"""

from __future__ import annotations

from dataclasses import replace

from saga_worker.core.events import RetryRequested
from saga_worker.core.model import MAX_ATTEMPT, Direction
from saga_worker.core.retry import RetryPolicy
from saga_worker.worker.messages import parse_attempt_ref

from .test_transition import COMP, Run, _failed_saga


def _issued(run: Run) -> list[tuple[int, Direction, int]]:
    """Every attempt key the run's decisions made pending, in order, re-sends once."""
    keys: list[tuple[int, Direction, int]] = []
    for decision in run.decisions:
        pending = decision.saga.pending
        if decision.ignored is None and pending is not None and pending.key() not in keys[-1:]:
            keys.append(pending.key())
    return keys


def test_operator_retry_gives_every_retried_compensation_a_fresh_number() -> None:
    run = _failed_saga()
    first_rollback = {k for k in _issued(run) if k[1] is COMP}
    run.apply(RetryRequested(user_id="oncall"))
    run.ok()  # charge's compensation, re-run
    assert run.saga.pending is not None and run.saga.pending.step_index == 0
    run.ok()  # reserve's compensation, re-run: it must not be attempt 1 again
    assert run.saga.state.value == "COMPENSATED"
    retried = [k for k in _issued(run) if k[1] is COMP][len(first_rollback) :]
    assert [k[0] for k in retried] == [1, 0]
    assert not set(retried) & first_rollback, (retried, first_rollback)
    assert len(set(_issued(run))) == len(_issued(run))  # no key issued twice


def test_fresh_numbers_do_not_follow_the_version() -> None:
    run = _failed_saga()
    run.saga = replace(run.saga, version=20_000)
    decision = run.apply(RetryRequested(user_id="oncall"))
    (cmd,) = decision.commands
    # What the step message of this attempt carries is accepted by the step task.
    kwargs = {
        "saga_id": run.saga.saga_id,
        "step_index": cmd.step_index,
        "direction": cmd.direction.value,
        "attempt": cmd.attempt,
    }
    assert parse_attempt_ref(kwargs, extra=frozenset())[3] == cmd.attempt
    assert cmd.attempt <= 10


def test_operator_retry_is_refused_when_the_attempt_numbers_are_used_up() -> None:
    run = _failed_saga()
    run.saga = replace(run.saga, attempt_seq=MAX_ATTEMPT - 2)
    decision = run.apply(RetryRequested(user_id="oncall"))
    assert decision.ignored is not None and str(MAX_ATTEMPT) in decision.ignored
    assert decision.commands == ()


def test_a_retry_policy_cannot_outnumber_what_step_messages_carry() -> None:
    problems = RetryPolicy(max_attempts=MAX_ATTEMPT + 1).problems()
    assert any(str(MAX_ATTEMPT) in p for p in problems)
