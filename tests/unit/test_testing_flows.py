"""SagaTestHarness with groups, signals, approvals and sleeps: the same engine, in-process."""

from __future__ import annotations

import pytest

from saga_worker import Approval, Parallel, SagaDefinition, Sleep, Step, WaitFor
from saga_worker.core.model import SagaState
from saga_worker.testing import HarnessError, SagaTestHarness

from .test_testing_harness import Script


def definition(script: Script) -> SagaDefinition:
    def step(name: str) -> Step:
        return Step(name, script, compensate=script, timeout_seconds=10)

    return SagaDefinition(
        "flows",
        [
            step("validate"),
            Parallel("checks", [step("reserve"), step("limits")]),
            WaitFor("await_fill", signal="fill", timeout_seconds=60, require="filled"),
            Approval("sign_off", approvers=2, timeout_seconds=600),
            Sleep("settle", 30),
            step("book"),
        ],
    )


def test_a_saga_with_every_stage_runs_to_completion_in_the_harness() -> None:
    script = Script()
    h = SagaTestHarness(definition(script))
    h.start({}, user_id="alice")
    h.run_until_settled()
    assert h.saga.waiting_for == "signal:fill"
    assert sorted(script.ran()) == [("limits", 1), ("reserve", 1), ("validate", 1)]
    h.signal("fill", {"filled": True, "price": 101.5}, user_id="exchange")
    assert h.saga.waiting_for == "approval:sign_off"
    h.vote("alice")  # the starter: refused, audited
    h.vote("bob")
    h.vote("carol")
    assert h.saga.waiting_for == "sleep:settle"
    with pytest.raises(HarnessError, match="is a wait"):
        h.succeed("settle")
    h.advance_clock(31)
    h.recover()
    h.run_until_settled()
    assert h.saga.state is SagaState.COMPLETED
    assert h.saga.context["price"] == 101.5
    votes = [r for r in h.audit_trail() if r["event_type"] == "signal_received"]
    assert [(v["user_id"], "refused" in v["event_data"]) for v in votes] == [
        ("exchange", False),
        ("alice", True),
        ("bob", False),
        ("carol", False),
    ]


def test_a_refused_fill_rolls_back_both_branches_in_reverse_order() -> None:
    script = Script()
    h = SagaTestHarness(definition(script))
    h.start({})
    h.run_until_settled()
    h.signal("fill", {"filled": False})
    h.run_until_settled()
    assert h.saga.state is SagaState.COMPENSATED
    undone = [name for name, _ in script.ran() if name.endswith("_undo")]
    assert undone == ["limits_undo", "reserve_undo", "validate_undo"]


def test_a_signal_adds_keys_but_never_replaces_one_a_step_or_the_start_wrote() -> None:
    h = SagaTestHarness(definition(Script()))
    h.start({"amount": 10})
    h.run_until_settled()
    h.signal("fill", {"amount": 10**9, "validate": 99, "filled": True, "price": 1.5})
    assert h.saga.context["amount"] == 10
    assert h.saga.context["validate"] == 1  # what the step wrote
    assert h.saga.context["price"] == 1.5
    [row] = [r for r in h.audit_trail() if r["event_type"] == "signal_received"]
    assert row["event_data"]["dropped_keys"] == ["amount", "validate"]
    assert row["event_data"]["payload_keys"] == ["filled", "price"]


def test_a_timed_out_wait_and_a_finished_sleep_are_audited_as_the_sweep() -> None:
    h = SagaTestHarness(definition(Script()))
    h.start({}, user_id="alice")
    h.run_until_settled()
    h.advance_clock(61)
    h.recover()
    [failed] = [r for r in h.audit_trail() if r["event_type"] == "step_failed"]
    assert failed["step_name"] == "await_fill" and failed["user_id"] == "system:recovery"
