"""Issue 14, item 3: only authenticated progress reaches the database.

- A step message that is not carrying a trusted checkpoint was checked for "pending"
  against the database but ran its action on the message's own context: anyone holding
  one genuine step message could replay it with a context of their choosing.
- A result with an invalid token wrote a `saga_rejected` row (with a context snapshot) and
  bumped the version, even on a terminal saga: a broker writer could grow the audit table.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from saga_worker.examples.backtest import simulate
from saga_worker.tokens import attempt_token
from tests.waiting import wait_for_tasks

from .conftest import SIGNING_KEY, Stack

pytestmark = [
    pytest.mark.integration,
    pytest.mark.parametrize("stack", ["postgres"], indirect=True),
]

SAGA_TYPE = "backtest_workflow"


def test_a_replayed_step_message_runs_on_the_committed_context(stack: Stack) -> None:
    strategy = 4242
    victim = stack.start(
        SAGA_TYPE,
        {"strategy_id": strategy, "slow_step": {"step": "run_strategy", "seconds": 4}},
    )
    stack.wait_for_step(victim, 1)
    key = SIGNING_KEY
    # A copy of run_strategy's genuine message (valid token, no carried checkpoint), its
    # context edited: another strategy, and no slowness, so that it would finish first.
    forged = stack.send(
        f"saga.{SAGA_TYPE}.run_strategy",
        {
            "saga_id": victim,
            "step_index": 1,
            "direction": "forward",
            "attempt": 1,
            "saga_type": SAGA_TYPE,
            "context": {"strategy_id": 777},
            "token": attempt_token(key, victim, 1, "forward", 1),
        },
    )
    saga = stack.wait(victim, timeout=60)
    wait_for_tasks(stack.worker_logs(), [forged])
    assert saga.state.value == "COMPLETED"
    assert saga.context["strategy_id"] == strategy
    assert saga.context["results"] == simulate(strategy)
    row = stack.example_row(victim)
    assert row is not None and row["results"] == simulate(strategy)


def _forged_results(key: str, saga_id: str, n: int) -> list[dict[str, Any]]:
    base = {"saga_id": saga_id, "direction": "forward", "outcome": "success"}
    forged: list[dict[str, Any]] = []
    for i in range(n):
        forged.append(
            {
                **base,
                "step_index": i % 3,
                "attempt": 1 + i % 2,
                "output": {"results": f"forged {i}"},
                # wrong tokens: random hex, another saga's, non-ASCII
                "token": [
                    uuid.uuid4().hex * 2,
                    attempt_token(key, "other-saga", i % 3, "forward", 1 + i % 2),
                    "é" * 64,
                ][i % 3],
            }
        )
    return forged


@pytest.mark.parametrize("terminal", [False, True], ids=["live", "terminal"])
def test_results_with_invalid_tokens_write_nothing(stack: Stack, terminal: bool) -> None:
    context: dict[str, Any] = {"strategy_id": 5}
    if not terminal:
        context["slow_step"] = {"step": "run_strategy", "seconds": 4}
    victim = stack.start(SAGA_TYPE, context)
    before = stack.wait(victim) if terminal else stack.wait_for_step(victim, 1)
    rows_before = stack.store.audit_trail(victim)
    key = SIGNING_KEY
    sent = [stack.send("saga.advance", kw) for kw in _forged_results(key, victim, 20)]
    wait_for_tasks(stack.worker_logs(), sent)
    if terminal:
        after = stack.store.load(victim)
        assert after is not None and after.version == before.version
        assert stack.store.audit_trail(victim) == rows_before
    saga = stack.wait(victim)
    assert saga.state.value == "COMPLETED"
    rows = stack.store.audit_trail(victim)
    assert [r for r in rows if r["event_type"] == "saga_rejected"] == []
    assert all(r["error_message"] is None or "forged" not in r["error_message"] for r in rows)
    assert saga.context["results"] == simulate(5)
    stack.assert_chain_ok(victim)


def test_a_replayed_result_with_a_valid_token_writes_nothing(stack: Stack) -> None:
    """A genuine result sent again (a redelivery, or a copy pushed by a broker writer)."""
    victim = stack.start(SAGA_TYPE, {"strategy_id": 6})
    before = stack.wait(victim)
    rows_before = stack.store.audit_trail(victim)
    key = SIGNING_KEY
    replay = {
        "saga_id": victim,
        "step_index": 0,
        "direction": "forward",
        "attempt": 1,
        "outcome": "success",
        "output": {"backtest_id": -1},
        "token": attempt_token(key, victim, 0, "forward", 1),
    }
    sent = [stack.send("saga.advance", replay) for _ in range(5)]
    wait_for_tasks(stack.worker_logs(), sent)
    after = stack.store.load(victim)
    assert after is not None and after.version == before.version
    assert stack.store.audit_trail(victim) == rows_before
