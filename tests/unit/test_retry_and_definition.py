"""Retry math (pure, seeded) and whole-definition validation."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from saga_worker.core.definition import (
    DEFAULT_TIMEOUT_SECONDS,
    Remote,
    SagaDefinition,
    Step,
    idempotency_key,
)
from saga_worker.core.model import Direction
from saga_worker.core.retry import RetryPolicy, backoff_seconds
from saga_worker.errors import InvalidSagaDefinition, SagaError

NOOP: Any = lambda call: {}  # noqa: E731
FWD = Direction.FORWARD
COMP = Direction.COMPENSATE

policies = st.builds(
    RetryPolicy,
    max_attempts=st.integers(1, 10),
    initial_delay_seconds=st.just(0.0) | st.floats(0.01, 100.0),
    backoff_factor=st.floats(1.0, 5.0),
    max_delay_seconds=st.floats(100.0, 10_000.0),
    jitter=st.floats(0.0, 1.0),
)
seeds = st.text(max_size=40)


# ------------------------------------------------------------------ backoff ---


def test_backoff_grows_exponentially_without_jitter_and_is_capped() -> None:
    policy = RetryPolicy(
        initial_delay_seconds=1.5, backoff_factor=2.0, max_delay_seconds=20.0, jitter=0.0
    )
    delays = [backoff_seconds(policy, n, "s") for n in range(1, 7)]
    assert delays == [1.5, 3.0, 6.0, 12.0, 20.0, 20.0]


def test_backoff_factor_one_is_constant() -> None:
    policy = RetryPolicy(initial_delay_seconds=4.0, backoff_factor=1.0, jitter=0.0)
    assert {backoff_seconds(policy, n, "x") for n in range(1, 20)} == {4.0}


def test_backoff_zero_initial_delay_is_zero_even_with_jitter() -> None:
    policy = RetryPolicy(initial_delay_seconds=0.0, jitter=0.5)
    assert backoff_seconds(policy, 3, "seed") == 0.0


def test_backoff_of_a_huge_retry_number_stays_finite_and_capped() -> None:
    policy = RetryPolicy(
        max_attempts=100_000, backoff_factor=10.0, max_delay_seconds=300.0, jitter=0.0
    )
    assert backoff_seconds(policy, 50_000, "s") == 300.0


@pytest.mark.parametrize("retry_number", [0, -1])
def test_backoff_rejects_retry_numbers_below_one(retry_number: int) -> None:
    with pytest.raises(ValueError, match="retry_number"):
        backoff_seconds(RetryPolicy(), retry_number, "s")


@settings(max_examples=200, deadline=None)
@given(policy=policies, retry_number=st.integers(1, 80), seed=seeds)
def test_backoff_is_deterministic_per_seed(
    policy: RetryPolicy, retry_number: int, seed: str
) -> None:
    first = backoff_seconds(policy, retry_number, seed)
    assert backoff_seconds(policy, retry_number, seed) == first
    # An equal policy built again (another process) agrees as well.
    again = RetryPolicy(
        policy.max_attempts,
        policy.initial_delay_seconds,
        policy.backoff_factor,
        policy.max_delay_seconds,
        policy.jitter,
    )
    assert backoff_seconds(again, retry_number, seed) == first


@settings(max_examples=300, deadline=None)
@given(policy=policies, retry_number=st.integers(1, 65), seed=seeds)
def test_backoff_jitter_stays_within_bounds(
    policy: RetryPolicy, retry_number: int, seed: str
) -> None:
    base = min(
        policy.max_delay_seconds,
        policy.initial_delay_seconds * policy.backoff_factor ** (retry_number - 1),
    )
    delay = backoff_seconds(policy, retry_number, seed)
    assert math.isfinite(delay)
    assert 0.0 <= delay <= policy.max_delay_seconds
    assert base * (1 - policy.jitter) - 1e-9 <= delay <= base * (1 + policy.jitter) + 1e-9


@settings(max_examples=100, deadline=None)
@given(
    initial=st.floats(0.01, 10.0),
    factor=st.floats(1.5, 4.0),
    retry_number=st.integers(1, 8),
)
def test_backoff_grows_by_the_factor_until_the_cap(
    initial: float, factor: float, retry_number: int
) -> None:
    policy = RetryPolicy(
        initial_delay_seconds=initial, backoff_factor=factor, max_delay_seconds=1e9, jitter=0.0
    )
    now = backoff_seconds(policy, retry_number, "s")
    nxt = backoff_seconds(policy, retry_number + 1, "s")
    assert now == pytest.approx(initial * factor ** (retry_number - 1))
    assert nxt == pytest.approx(now * factor)


def test_backoff_jitter_spreads_different_seeds() -> None:
    policy = RetryPolicy(initial_delay_seconds=10.0, jitter=0.5)
    delays = {backoff_seconds(policy, 1, f"saga-{i}:step:forward") for i in range(30)}
    assert len(delays) > 20
    assert all(5.0 <= d <= 15.0 for d in delays)


def test_backoff_does_not_overflow_for_a_large_valid_factor() -> None:
    policy = RetryPolicy(max_attempts=100, backoff_factor=1e6, max_delay_seconds=60.0)
    assert policy.problems() == []
    assert backoff_seconds(policy, 66, "s") <= 60.0


# ------------------------------------------------------------ RetryPolicy ---


def test_default_retry_policy_is_valid() -> None:
    assert RetryPolicy().problems() == []
    assert (
        RetryPolicy(
            max_attempts=1, initial_delay_seconds=0, max_delay_seconds=0, jitter=0
        ).problems()
        == []
    )
    assert RetryPolicy(jitter=1.0, backoff_factor=1.0).problems() == []


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": 2.5}, "max_attempts"),
        ({"max_attempts": "3"}, "max_attempts"),
        ({"initial_delay_seconds": -1.0}, "initial_delay_seconds"),
        ({"backoff_factor": 0.5}, "backoff_factor"),
        ({"initial_delay_seconds": 10.0, "max_delay_seconds": 5.0}, "max_delay_seconds"),
        ({"jitter": 1.5}, "jitter"),
        ({"jitter": -0.1}, "jitter"),
        ({"jitter": float("nan")}, "jitter"),
    ],
)
def test_retry_policy_problems_name_the_field(changes: dict[str, Any], needle: str) -> None:
    problems = RetryPolicy(**changes).problems()
    assert len(problems) == 1, problems
    assert needle in problems[0]


def test_retry_policy_lists_every_problem_at_once() -> None:
    problems = RetryPolicy(
        max_attempts=0, initial_delay_seconds=-1, backoff_factor=0, jitter=2
    ).problems()
    joined = "\n".join(problems)
    for needle in ("max_attempts", "initial_delay_seconds", "backoff_factor", "jitter"):
        assert needle in joined
    assert len(problems) == 4


@pytest.mark.parametrize(
    "changes",
    [
        {"max_delay_seconds": float("nan")},
        {"initial_delay_seconds": float("nan")},
        {"backoff_factor": float("nan")},
    ],
)
def test_retry_policy_rejects_nan(changes: dict[str, Any]) -> None:
    assert RetryPolicy(**changes).problems() != []


# --------------------------------------------------------- SagaDefinition ---


def test_valid_definition_builds() -> None:
    d = SagaDefinition("order", [Step("reserve", NOOP, NOOP), Step("ship", NOOP)])
    assert d.step_names == ("reserve", "ship")
    assert d.problems() == []
    assert isinstance(d.steps, tuple)


def test_definition_reports_every_problem_at_once() -> None:
    with pytest.raises(InvalidSagaDefinition) as info:
        SagaDefinition(
            "order",
            [
                Step("reserve", NOOP, NOOP),
                Step("reserve", NOOP),  # duplicate
                Step("bad name", NOOP),  # invalid name
                Step("charge", NOOP, retry=RetryPolicy(max_attempts=0)),  # bad policy
                Step("wait", NOOP, timeout_seconds=0),  # bad timeout
                Step("remote", Remote("billing.charge", "")),  # remote without queue
                Step(
                    "undo",
                    NOOP,
                    compensation_retry=RetryPolicy(jitter=3),
                    compensation_timeout_seconds=-1,
                ),
                Step("notask", Remote("", "billing")),
                Step("notcallable", "not a function"),  # type: ignore[arg-type]
            ],
        )
    err = info.value
    assert isinstance(err, SagaError)
    assert err.code == "invalid_saga_definition"
    assert err.saga_type == "order"
    message = str(err)
    expected = [
        ("step 1 ('reserve')", "duplicate name"),
        ("step 2 ('bad name')", "name must match"),
        ("step 3 ('charge')", "retry: max_attempts"),
        ("step 4 ('wait')", "timeout_seconds must be a finite number > 0"),
        ("step 5 ('remote')", "remote action needs a queue"),
        ("step 6 ('undo')", "compensation_retry: jitter"),
        ("step 6 ('undo')", "compensation_timeout_seconds must be a finite number > 0"),
        ("step 7 ('notask')", "remote action needs a task_name"),
        ("step 8 ('notcallable')", "action must be a function"),
    ]
    assert len(err.problems) == len(expected), err.problems
    for where, what in expected:
        assert any(where in p and what in p for p in err.problems), (where, what)
        assert what in message
    # One line per problem in the message.
    assert message.count("\n  - ") == len(expected)
    assert "step 0" not in message


def test_definition_without_steps_and_with_bad_type_and_default_timeout() -> None:
    with pytest.raises(InvalidSagaDefinition) as info:
        SagaDefinition("bad-type", [], default_timeout_seconds=0)
    problems = info.value.problems
    assert len(problems) == 3
    message = str(info.value)
    assert "at least one step" in message
    assert "saga_type 'bad-type'" in message
    assert "default_timeout_seconds" in message


@pytest.mark.parametrize("name", ["", "1step", "step-1", "a" * 101, "é", "a.b"])
def test_invalid_step_names(name: str) -> None:
    with pytest.raises(InvalidSagaDefinition, match="name must match"):
        SagaDefinition("order", [Step(name, NOOP)])


def test_step_name_of_100_chars_is_fine() -> None:
    SagaDefinition("order", [Step("a" * 100, NOOP), Step("_x9", NOOP)])


def test_remote_compensation_without_queue_is_reported() -> None:
    with pytest.raises(InvalidSagaDefinition, match="remote compensate needs a queue"):
        SagaDefinition("order", [Step("a", NOOP, Remote("svc.undo", ""))])


def test_non_step_in_list_is_reported() -> None:
    with pytest.raises(InvalidSagaDefinition, match=r"expected saga_worker\.Step"):
        SagaDefinition("order", [Step("a", NOOP), {"name": "b"}])  # type: ignore[list-item]


@pytest.mark.parametrize(("saga_type", "step_name"), [("order", "reserve\n"), ("order\n", "ok")])
def test_names_with_trailing_newline_are_rejected(saga_type: str, step_name: str) -> None:
    with pytest.raises(InvalidSagaDefinition):
        SagaDefinition(saga_type, [Step(step_name, NOOP)])


# ----------------------------------------------------- task names, timeouts ---


def test_task_names_for_local_and_remote_steps() -> None:
    d = SagaDefinition(
        "order",
        [
            Step("reserve", NOOP, NOOP),
            Step(
                "charge", Remote("billing.charge", "billing"), Remote("billing.refund", "billing")
            ),
            Step("ship", NOOP, Remote("shipping.cancel", "shipping")),
        ],
    )
    assert d.task_name(0, FWD) == "saga.order.reserve"
    assert d.task_name(0, COMP) == "saga.order.reserve.compensate"
    assert d.task_name(1, FWD) == "billing.charge"
    assert d.task_name(1, COMP) == "billing.refund"
    assert d.task_name(2, FWD) == "saga.order.ship"
    assert d.task_name(2, COMP) == "shipping.cancel"


def test_timeouts_and_policies_fall_back_per_direction() -> None:
    comp_policy = RetryPolicy(max_attempts=7)
    d = SagaDefinition(
        "order",
        [
            Step("a", NOOP, NOOP),
            Step("b", NOOP, NOOP, timeout_seconds=5.0),
            Step(
                "c",
                NOOP,
                NOOP,
                timeout_seconds=5.0,
                compensation_timeout_seconds=9.0,
                compensation_retry=comp_policy,
            ),
        ],
        default_timeout_seconds=42.0,
    )
    assert d.timeout(0, FWD) == d.timeout(0, COMP) == 42.0
    assert d.timeout(1, FWD) == d.timeout(1, COMP) == 5.0
    assert (d.timeout(2, FWD), d.timeout(2, COMP)) == (5.0, 9.0)
    assert d.steps[1].policy(COMP) == d.steps[1].retry == RetryPolicy()
    assert d.steps[2].policy(FWD) == RetryPolicy()
    assert d.steps[2].policy(COMP) is comp_policy
    assert SagaDefinition("x", [Step("a", NOOP)]).timeout(0, FWD) == DEFAULT_TIMEOUT_SECONDS


def test_idempotency_key_is_stable_and_direction_specific() -> None:
    assert idempotency_key("s-1", "reserve", FWD) == "s-1:reserve"
    assert idempotency_key("s-1", "reserve", COMP) == "s-1:reserve:compensate"
    assert idempotency_key("s-1", "reserve", FWD) != idempotency_key("s-2", "reserve", FWD)


def test_definition_rejects_nan_default_timeout() -> None:
    with pytest.raises(InvalidSagaDefinition, match="default_timeout_seconds"):
        SagaDefinition("order", [Step("a", NOOP)], default_timeout_seconds=float("nan"))


def test_definition_rejects_nan_step_timeout() -> None:
    with pytest.raises(InvalidSagaDefinition, match="timeout_seconds must be a finite number > 0"):
        SagaDefinition("order", [Step("a", NOOP, timeout_seconds=float("nan"))])
