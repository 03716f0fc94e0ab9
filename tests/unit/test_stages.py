"""Definitions with stages beyond one step (issue 16): groups and waits, numbered flat."""

from __future__ import annotations

from typing import Any

import pytest

from saga_worker.core.definition import Remote, SagaDefinition, Step, StepInput
from saga_worker.core.model import Direction
from saga_worker.core.stages import Approval, Parallel, Sleep, Wait, WaitFor
from saga_worker.errors import InvalidSagaDefinition


def noop(call: StepInput) -> dict[str, Any]:
    return {}


def step(name: str) -> Step:
    return Step(name, noop, compensate=noop)


def order() -> SagaDefinition:
    return SagaDefinition(
        "order_like",
        [
            step("validate_order"),
            Parallel("checks", [step("reserve_funds"), Step("check_limits", noop)]),
            WaitFor("await_approval", signal="approval", timeout_seconds=3600),
            step("book_trade"),
        ],
    )


def test_leaves_are_numbered_flat_and_stages_name_their_leaves() -> None:
    d = order()
    assert d.step_names == (
        "validate_order",
        "reserve_funds",
        "check_limits",
        "await_approval",
        "book_trade",
    )
    assert [(s.kind, s.name, s.leaves) for s in d.stages] == [
        ("step", "validate_order", (0,)),
        ("parallel", "checks", (1, 2)),
        ("wait", "await_approval", (3,)),
        ("step", "book_trade", (4,)),
    ]
    assert not d.linear
    # Branches are tasks like any step; a wait is none (nothing is sent for it).
    assert d.task_name(2, Direction.FORWARD) == "saga.order_like.check_limits"
    wait = d.steps[3]
    assert isinstance(wait.action, Wait) and wait.action.signal == "approval"
    assert wait.retry.max_attempts == 1 and wait.timeout_seconds == 3600


def test_a_linear_definition_keeps_the_version_it_had_before_stages() -> None:
    d = SagaDefinition("lin", [step("a"), step("b")])
    assert d.linear and "stages" not in d.shape()
    # The same leaves grouped are another shape and another structure.
    grouped = SagaDefinition("lin", [Parallel("g", [step("a"), step("b")])])
    assert grouped.version != d.version and grouped.structure != d.structure


def test_waits_sleeps_and_approvals_change_the_version_by_what_completes_them() -> None:
    base = [step("a")]
    versions = {
        SagaDefinition("w", [*base, WaitFor("x", signal="s1", timeout_seconds=60)]).version,
        SagaDefinition("w", [*base, WaitFor("x", signal="s2", timeout_seconds=60)]).version,
        SagaDefinition("w", [*base, Sleep("x", 60)]).version,
        SagaDefinition("w", [*base, Approval("x", approvers=2, timeout_seconds=60)]).version,
        SagaDefinition("w", [*base, Approval("x", approvers=1, timeout_seconds=60)]).version,
    }
    assert len(versions) == 5


@pytest.mark.parametrize(
    ("stages", "says"),
    [
        ([Parallel("g", [step("a")])], "at least two branches"),
        ([Parallel("g", [step("a"), Sleep("s", 5)])], "waits run on their own"),
        ([Parallel("g", [step("a"), step("b")]), step("g")], "must be unique"),
        ([step("a"), Parallel("a", [step("b"), step("c")])], "must be unique"),
        ([Parallel("g", [step("a"), step("a")])], "must be unique"),
        ([WaitFor("w", signal="", timeout_seconds=5)], "signal .. must match"),
        ([Approval("w", approvers=0, timeout_seconds=5)], "approvers must be"),
        ([Step("w", Wait("sleep"), compensate=noop, timeout_seconds=5)], "no compensation"),
        ([Sleep("w", -1)], "timeout_seconds must be"),
        (["not a stage"], "expected saga_worker.Step or Parallel"),
        ([Parallel("g", [step("a"), "x"])], "expected saga_worker.Step"),  # type: ignore[list-item]
    ],
)
def test_bad_stages_are_refused_saying_what_to_fix(stages: list[Any], says: str) -> None:
    with pytest.raises(InvalidSagaDefinition, match=says):
        SagaDefinition("bad", stages)


def test_remote_branches_are_allowed() -> None:
    d = SagaDefinition(
        "rg", [Parallel("g", [Step("a", Remote("svc.a", "q")), Step("b", Remote("svc.b", "q"))])]
    )
    assert d.task_name(1, Direction.FORWARD) == "svc.b"
