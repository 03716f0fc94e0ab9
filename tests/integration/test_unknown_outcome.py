"""An attempt that took effect and then timed out is rolled back (issue 14, item 5).

`slow_after_step` makes create_backtest insert its row, then sleep past the step's 30 s
timeout, on every attempt: the step fails for good with an unknown outcome, so its own
compensation runs and no row remains after COMPENSATED.
"""

from __future__ import annotations

import pytest

from tests.waiting import wait_for

from .conftest import Stack

pytestmark = pytest.mark.parametrize("stack", ["postgres"], indirect=True)


def test_an_effect_left_by_a_timed_out_step_is_compensated(stack: Stack) -> None:
    saga_id = stack.start(
        "backtest_workflow",
        {"strategy_id": 21, "slow_after_step": {"step": "create_backtest", "seconds": 35}},
    )
    # The effect happens first, then the attempt runs past its timeout.
    wait_for(lambda: stack.example_row(saga_id), 20, f"{saga_id}'s row", details=stack.logs)
    saga = stack.wait(saga_id, timeout=160)
    assert saga.state.value == "COMPENSATED"
    assert saga.completed_steps == ()
    assert saga.compensated_steps == ("create_backtest",)
    rows = stack.store.audit_trail(saga_id)
    kinds = [r["event_type"] for r in rows]
    assert kinds.count("step_start") == 3
    failed = next(r for r in rows if r["event_type"] == "step_failed")
    assert failed["event_data"]["timed_out"] is True
    assert failed["event_data"]["outcome_unknown"] is True
    assert failed["event_data"]["own_compensation"] is True
    assert kinds[kinds.index("step_failed") :] == [
        "step_failed",
        "compensation_start",
        "compensation_complete",
        "saga_compensated",
    ]
    assert stack.example_row(saga_id) is None
    stack.assert_chain_ok(saga_id)
