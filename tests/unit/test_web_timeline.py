"""The timeline page's model: bars per attempt from audit rows, context changes, the chain."""

from __future__ import annotations

from saga_worker import SagaDefinition, Step, StepInput
from saga_worker.testing import SagaTestHarness
from saga_worker.web.timeline import build


def flaky(call: StepInput) -> dict[str, object]:
    forward = call.direction.value == "forward"
    if forward and call.step_name == "charge" and call.attempt == 1:
        raise RuntimeError("card declined")
    if forward and call.step_name == "ship":
        raise RuntimeError("no stock")
    return {f"{call.step_name}_{call.direction.value}": call.attempt}


DEFINITION = SagaDefinition(
    "tl",
    [
        Step(name, flaky, compensate=flaky, timeout_seconds=10)
        for name in ("reserve", "charge", "ship")
    ],
)


def test_attempts_become_bars_and_context_changes_are_listed() -> None:
    h = SagaTestHarness(DEFINITION)
    h.start({"order": 1})
    h.run_until_settled()
    rows = h.audit_trail()
    timeline = build(rows, h.clock())
    outcomes = [(b.lane, b.attempt, b.outcome) for b in timeline.bars]
    assert ("charge", 1, "retried") in outcomes and ("charge", 2, "ok") in outcomes
    assert ("ship", 3, "failed") in outcomes
    assert ("charge (compensation)", 1, "ok") in outcomes
    assert timeline.lanes[:3] == ["reserve", "charge", "ship"]
    assert all(b.end is not None and b.end >= b.start for b in timeline.bars)
    assert all(0.0 <= timeline.x(b.start) <= 1.0 for b in timeline.bars)
    added = [c.added for c in timeline.changes if c.step == "reserve"]
    assert {"reserve_forward": 1} in added
    assert timeline.chain_problems == []


def test_a_tampered_row_breaks_the_badge() -> None:
    h = SagaTestHarness(DEFINITION)
    h.start({"order": 1})
    h.run_until_settled()
    rows = [dict(r) for r in h.audit_trail()]
    rows[2]["error_message"] = "edited"
    assert build(rows, h.clock()).chain_problems


def test_no_rows_no_bars() -> None:
    h = SagaTestHarness(DEFINITION)
    assert build([], h.clock()).bars == []
