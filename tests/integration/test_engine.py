"""The engine end to end: real Celery worker processes, real Redis, PostgreSQL and SQLite."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import text

from saga_worker.core.model import Attempt, Direction, SagaState
from saga_worker.examples.backtest import simulate
from saga_worker.store.port import Loaded
from saga_worker.tokens import attempt_token
from saga_worker.worker import snapshot
from tests.waiting import read_logs, wait_for, wait_for_log, wait_for_tasks

from .conftest import SIGNING_KEY, Stack

pytestmark = pytest.mark.integration

HAPPY = [
    "saga_start",
    "step_start",
    "step_complete",
    "step_start",
    "step_complete",
    "step_start",
    "step_complete",
    "saga_complete",
]


def test_completes_and_records_every_transition(stack: Stack) -> None:
    saga_id = stack.start(
        "backtest_workflow", {"strategy_id": 42}, user_id="user_123", ip_address="192.168.1.1"
    )
    saga = stack.wait(saga_id)
    assert saga.state.value == "COMPLETED"
    assert saga.completed_steps == ("create_backtest", "run_strategy", "save_results")
    assert saga.compensated_steps == ()
    assert saga.pending is None
    assert saga.context["results"] == simulate(42)
    rows = stack.store.audit_trail(saga_id)
    assert [r["event_type"] for r in rows] == HAPPY
    assert {r["user_id"] for r in rows} == {"user_123"}
    assert {r["ip_address"] for r in rows} == {"192.168.1.1"}
    assert [r["step_index"] for r in rows if r["event_type"] == "step_complete"] == [0, 1, 2]
    assert all(r["duration_ms"] is not None for r in rows if r["event_type"] == "step_complete")
    assert (
        rows[-1]["saga_state_before"] == "RUNNING" and rows[-1]["saga_state_after"] == "COMPLETED"
    )
    stack.assert_chain_ok(saga_id)
    row = stack.example_row(saga_id)
    assert row is not None and row["strategy_id"] == 42 and row["results"] == simulate(42)


def test_failure_compensates_completed_steps_in_reverse(stack: Stack) -> None:
    saga_id = stack.start("backtest_workflow", {"strategy_id": 7, "fail_step": "save_results"})
    saga = stack.wait(saga_id)
    assert saga.state.value == "COMPENSATED"
    assert saga.compensated_steps == ("run_strategy", "create_backtest")
    assert "injected failure of step save_results" in (saga.error or "")
    rows = stack.store.audit_trail(saga_id)
    kinds = [r["event_type"] for r in rows]
    # 3 attempts: two audited retries, then one step_failed
    assert [r["retry_count"] for r in rows if r["event_type"] == "step_retry"] == [1, 2]
    assert kinds.count("step_failed") == 1
    failed = next(r for r in rows if r["event_type"] == "step_failed")
    assert (
        failed["step_name"] == "save_results" and "InjectedFailure" in failed["error_stack_trace"]
    )
    assert failed["saga_state_after"] == "COMPENSATING"
    compensated = [r["step_name"] for r in rows if r["event_type"] == "compensation_complete"]
    assert compensated == ["run_strategy", "create_backtest"]
    assert kinds[-1] == "saga_compensated"
    assert stack.example_row(saga_id) is None
    stack.assert_chain_ok(saga_id)


def test_flaky_step_is_retried_then_completes(stack: Stack) -> None:
    saga_id = stack.start(
        "backtest_workflow",
        {"strategy_id": 3, "flaky_step": {"step": "run_strategy", "failures": 2}},
    )
    saga = stack.wait(saga_id)
    assert saga.state.value == "COMPLETED"
    assert saga.retries == 2
    rows = stack.store.audit_trail(saga_id)
    run = [(r["event_type"], r["retry_count"]) for r in rows if r["step_name"] == "run_strategy"]
    assert run == [
        ("step_start", None),
        ("step_retry", 1),
        ("step_start", 1),
        ("step_retry", 2),
        ("step_start", 2),
        ("step_complete", 2),
    ]
    assert stack.example_row(saga_id)["results"] == simulate(3)  # type: ignore[index]


def test_step_past_its_timeout_is_a_failed_attempt(stack: Stack) -> None:
    # `sleepy` has a 1 s timeout and 2 attempts; it sleeps 4 s each time.
    saga_id = stack.start("it_timeout", {"sleep": 4})
    saga = stack.wait(saga_id, timeout=60)
    assert saga.state.value == "COMPENSATED"
    rows = stack.store.audit_trail(saga_id)
    retry = next(r for r in rows if r["event_type"] == "step_retry")
    failed = next(r for r in rows if r["event_type"] == "step_failed")
    for row in (retry, failed):
        assert row["step_name"] == "sleepy"
        assert row["event_data"]["timed_out"] is True
        assert row["event_data"]["error_type"] == "StepTimeout"
        assert row["duration_ms"] < 3000  # interrupted by the soft limit, not slept out
    # A timed-out attempt may have had its effect: its own compensation runs first.
    assert failed["event_data"]["outcome_unknown"] is True
    assert [r["step_name"] for r in rows if r["event_type"] == "compensation_complete"] == [
        "sleepy",
        "prepare",
    ]


def test_context_flows_from_step_to_step(stack: Stack) -> None:
    saga_id = stack.start("it_context", {"seed": 1, "nested": {"x": [1, 2]}})
    saga = stack.wait(saga_id)
    assert saga.state.value == "COMPLETED"
    ctx = saga.context
    assert ctx["a"] == 2 and ctx["b"] == 20 and ctx["c"] == 22
    assert ctx["nested"] == {"x": [1, 2]}
    assert ctx["seen_by_first"] == ["nested", "seed"]
    assert ctx["key_second"] == f"{saga_id}:second"
    snapshots = [r["context_snapshot"] for r in stack.store.audit_trail(saga_id)]
    assert snapshots[0] == {"seed": 1, "nested": {"x": [1, 2]}}
    assert snapshots[-1]["c"] == 22


def test_duplicate_start_never_starts_a_second_saga(stack: Stack) -> None:
    saga_id = f"dup-{uuid.uuid4().hex[:10]}"
    for strategy in (1, 2, 3):
        stack.start("backtest_workflow", {"strategy_id": strategy}, saga_id=saga_id)
    saga = stack.wait(saga_id)
    # a late duplicate after completion is ignored too, even with other content
    stack.start(
        "backtest_workflow", {"strategy_id": 99, "fail_step": "run_strategy"}, saga_id=saga_id
    )
    stack.start("no_such_saga", {}, saga_id=saga_id)
    # Both late starts were handled (each logs that it is a duplicate), not merely waited for.
    wait_for_log(stack.worker_logs(), f"saga {saga_id} already exists: duplicate start ignored")
    wait_for_log(stack.worker_logs(), f"saga.start for existing {saga_id} is a duplicate")
    assert read_logs(stack.worker_logs()).count(f"saga {saga_id} already exists") == 3
    now = stack.store.load(saga_id)
    assert now is not None and now.state.value == "COMPLETED"
    kinds = stack.events(saga_id)
    assert kinds == HAPPY
    assert now.version == saga.version
    row = stack.example_row(saga_id)
    assert row is not None and row["strategy_id"] == saga.context["strategy_id"]


def test_abort_mid_run_compensates_and_ends_aborted(stack: Stack) -> None:
    saga_id = stack.start(
        "backtest_workflow",
        {"strategy_id": 5, "slow_step": {"step": "run_strategy", "seconds": 2}},
    )
    stack.wait_for_step(saga_id, 1)
    stack.send("saga.abort", {"saga_id": saga_id, "reason": "operator test", "user_id": "ops"})
    saga = stack.wait(saga_id, timeout=30)
    assert saga.state.value == "ABORTED"
    assert "save_results" not in saga.completed_steps
    assert saga.compensated_steps == tuple(reversed(saga.completed_steps))
    rows = stack.store.audit_trail(saga_id)
    abort = next(r for r in rows if r["event_type"] == "abort_requested")
    assert abort["user_id"] == "ops" and abort["event_data"]["reason"] == "operator test"
    assert rows[-1]["event_type"] == "saga_aborted"
    assert stack.example_row(saga_id) is None
    stack.assert_chain_ok(saga_id)


def test_failed_compensation_is_recorded_and_rollback_goes_on(stack: Stack) -> None:
    saga_id = stack.start(
        "backtest_workflow",
        {"strategy_id": 11, "fail_step": "save_results", "fail_compensation": "run_strategy"},
    )
    saga = stack.wait(saga_id)
    assert saga.state.value == "FAILED"
    assert saga.failed_compensations == ("run_strategy",)
    assert saga.compensated_steps == ("create_backtest",)
    rows = stack.store.audit_trail(saga_id)
    kinds = [r["event_type"] for r in rows]
    assert [r["retry_count"] for r in rows if r["event_type"] == "compensation_retry"] == [1, 2]
    assert kinds.count("compensation_failed") == 1
    assert kinds.index("compensation_failed") < kinds.index("compensation_complete")
    assert kinds[-1] == "saga_failed"
    # create_backtest's compensation ran, so the row is gone
    assert stack.example_row(saga_id) is None


def test_failed_compensation_of_first_step_leaves_its_row(stack: Stack) -> None:
    saga_id = stack.start(
        "backtest_workflow",
        {"strategy_id": 12, "fail_step": "run_strategy", "fail_compensation": "create_backtest"},
    )
    saga = stack.wait(saga_id)
    assert saga.state.value == "FAILED"
    assert stack.example_row(saga_id) is not None


def test_remote_step_served_by_another_service(stack: Stack) -> None:
    saga_id = stack.start("it_remote", {"qty": 5})
    saga = stack.wait(saga_id)
    assert saga.state.value == "COMPLETED", saga.error
    assert saga.context["price"] == 110
    assert saga.context["quoted_by"] == "it_pricing"
    assert saga.context["quote_key"] == f"{saga_id}:quote"
    assert b"it_pricing.quote" in stack.workers[1].log_path.read_bytes()


def test_remote_step_failure_retries_then_compensates(stack: Stack) -> None:
    saga_id = stack.start("it_remote", {"qty": 1, "remote_fail": True})
    saga = stack.wait(saga_id)
    assert saga.state.value == "COMPENSATED"
    rows = stack.store.audit_trail(saga_id)
    assert [r["event_type"] for r in rows if r["step_name"] == "quote"] == [
        "step_start",
        "step_retry",
        "step_start",
        "step_failed",
    ]
    assert saga.compensated_steps == ("reserve",)


def test_replayed_step_message_changes_nothing(stack: Stack) -> None:
    saga_id = stack.start("backtest_workflow", {"strategy_id": 21})
    saga = stack.wait(saga_id)
    before = stack.store.audit_trail(saga_id)
    key = SIGNING_KEY
    messages: list[tuple[str, dict[str, Any]]] = []
    for index, name in enumerate(("create_backtest", "run_strategy", "save_results")):
        attempt = {
            "saga_id": saga_id,
            "step_index": index,
            "direction": "forward",
            "attempt": 1,
            "token": attempt_token(key, saga_id, index, "forward", 1),
        }
        step = {**attempt, "saga_type": "backtest_workflow", "context": dict(saga.context)}
        messages.append((f"saga.backtest_workflow.{name}", step))
        result = {**attempt, "outcome": "success", "output": {"forged": True}}
        messages.append(("saga.advance", result))
    # a forged result with a wrong token for a live-looking attempt
    forged = {
        "saga_id": saga_id,
        "step_index": 0,
        "direction": "forward",
        "attempt": 1,
        "token": "0" * 64,
        "outcome": "failure",
    }
    messages.append(("saga.advance", forged))
    sent = [stack.send(name, kwargs) for name, kwargs in messages]
    # Every message ran to its end: the replayed results and the forged one wrote nothing
    # (issue 14: a broker writer cannot grow the audit table), the replayed step messages
    # were not run.
    wait_for_tasks(stack.worker_logs(), sent)
    assert stack.store.audit_trail(saga_id) == before
    final = stack.store.load(saga_id)
    assert final is not None
    assert final.version == saga.version
    assert (final.state, final.context, final.completed_steps) == (
        saga.state,
        saga.context,
        saga.completed_steps,
    )
    assert "forged" not in final.context
    stack.assert_chain_ok(saga_id)


def test_unknown_saga_type_is_rejected_and_audited(stack: Stack) -> None:
    saga_id = f"rej-{uuid.uuid4().hex[:10]}"
    stack.start("no_such_saga", {"x": 1}, saga_id=saga_id, user_id="u1")
    rows = wait_for(lambda: stack.store.audit_trail(saga_id), 20, f"the rejection of {saga_id}")
    assert [r["event_type"] for r in rows] == ["saga_rejected"]
    assert "unknown saga_type 'no_such_saga'" in rows[0]["error_message"]
    assert rows[0]["user_id"] == "u1"
    assert stack.store.load(saga_id) is None


def test_two_hundred_concurrent_sagas_settle_consistently(stack: Stack) -> None:
    plans = []
    for i in range(200):
        kind = i % 5
        ctx: dict[str, object] = {"strategy_id": i}
        expected = "COMPLETED"
        if kind == 1:
            ctx["fail_step"] = ["create_backtest", "run_strategy", "save_results"][i % 3]
            expected = "COMPENSATED"
        elif kind == 2:
            ctx["flaky_step"] = {"step": "save_results", "failures": 1}
        elif kind == 3:
            ctx.update(fail_step="save_results", fail_compensation="run_strategy")
            expected = "FAILED"
        plans.append((stack.start("backtest_workflow", ctx), expected, ctx))
    started = time.monotonic()
    final = stack.wait_all([p[0] for p in plans], timeout=240)
    elapsed = time.monotonic() - started
    outcomes = Counter(s.state.value for s in final.values())
    print(f"\n[{stack.backend}] 200 sagas settled in {elapsed:.1f}s: {dict(outcomes)}")
    for saga_id, expected, ctx in plans:
        saga = final[saga_id]
        assert saga.state.value == expected, (saga_id, ctx, saga.error)
        rows = stack.store.audit_trail(saga_id)
        kinds = [r["event_type"] for r in rows]
        assert kinds[0] == "saga_start"
        assert (
            kinds[-1]
            == {
                "COMPLETED": "saga_complete",
                "COMPENSATED": "saga_compensated",
                "FAILED": "saga_failed",
            }[expected]
        )
        assert kinds.count("step_complete") == len(saga.completed_steps)
        assert kinds.count("compensation_complete") == len(saga.compensated_steps)
        assert kinds.count("saga_start") == 1
        assert saga.pending is None
        assert [r["step_index"] for r in rows if r["event_type"] == "step_complete"] == list(
            range(len(saga.completed_steps))
        )
        stack.assert_chain_ok(saga_id)
        row = stack.example_row(saga_id)
        if expected == "COMPLETED":
            assert row is not None and row["results"] == simulate(int(ctx["strategy_id"]))  # type: ignore[call-overload]
        else:
            assert row is None


def _send_first_step(stack: Stack, saga_id: str, context: dict[str, Any], **extra: Any) -> str:
    """A validly signed message for attempt 1 of create_backtest, plus `extra` kwargs; returns
    its task id."""
    key = SIGNING_KEY
    return stack.send(
        "saga.backtest_workflow.create_backtest",
        {
            "saga_id": saga_id,
            "saga_type": "backtest_workflow",
            "step_index": 0,
            "direction": "forward",
            "attempt": 1,
            "token": attempt_token(key, saga_id, 0, "forward", 1),
            "context": context,
            **extra,
        },
    )


def test_carried_checkpoint_is_trusted_only_when_genuine_and_fresh(stack: Stack) -> None:
    """A step message's checkpoint spares the read only if its signature holds and it is
    fresh; a genuine but stale one is caught by the version check after the action."""
    saga_id = stack.start("backtest_workflow", {"strategy_id": 23})
    final = stack.wait(saga_id)
    assert final.state.value == "COMPLETED"
    trail = stack.store.audit_trail(saga_id)
    row = stack.example_row(saga_id)
    key = SIGNING_KEY
    # The checkpoint as it was when step 0 was sent: version 1, step 0 pending.
    as_started = replace(
        final,
        state=SagaState.RUNNING,
        current_step_index=0,
        completed_steps=(),
        version=1,
        attempts=(Attempt(0, Direction.FORWARD, 1, final.started_at, final.started_at),),
    )

    def step0(signing_key: str, sent_at: float, tag: str) -> str:
        context = {"strategy_id": 23, "tag": tag}
        old = Loaded(replace(as_started, context=context), trail[1]["hash"])
        return _send_first_step(
            stack, saga_id, context, checkpoint=snapshot.encode(signing_key, old, sent_at)
        )

    # Forged (another key) and stale (sent an hour ago): not trusted, read, not pending.
    wait_for_tasks(
        stack.worker_logs(),
        [step0("not-the-key", time.time(), "forged"), step0(key, time.time() - 3600, "stale")],
    )
    skipped = f"for {saga_id}: attempt 1 is not pending"
    assert read_logs(stack.worker_logs()).count(skipped) == 2
    # Genuine and fresh: trusted, so the action runs; its write meets a newer version and
    # the reloaded checkpoint has no such pending attempt: ignored, nothing written.
    wait_for_tasks(stack.worker_logs(), [step0(key, time.time(), "genuine")])
    assert f"saga {saga_id}: StepSucceeded ignored" in read_logs(stack.worker_logs())
    assert stack.store.audit_trail(saga_id) == trail
    assert stack.store.load(saga_id) == final
    assert stack.example_row(saga_id) == row  # the step's effect is keyed: ran, changed nothing


def test_a_saga_id_rejected_once_can_start_and_its_chain_continues(stack: Stack) -> None:
    """The start writes from the genesis hash in one statement; when a rejection already
    wrote rows under the saga_id, it reads the chain's head and writes after it."""
    saga_id = f"{stack.backend}-rej-then-ok-{uuid.uuid4().hex[:8]}"
    stack.start("no_such_saga", {"strategy_id": 1}, saga_id=saga_id)
    assert wait_for(lambda: stack.events(saga_id), 20, f"the rejection of {saga_id}") == [
        "saga_rejected"
    ]
    assert stack.store.load(saga_id) is None
    stack.start("backtest_workflow", {"strategy_id": 2}, saga_id=saga_id)
    assert stack.wait(saga_id).state is SagaState.COMPLETED
    events = stack.events(saga_id)
    assert events[:3] == ["saga_rejected", "saga_start", "step_start"]
    assert events[-1] == "saga_complete"
    stack.assert_chain_ok(saga_id)
    trail = stack.store.audit_trail(saga_id)
    assert trail[1]["prev_hash"] == trail[0]["hash"]


def test_a_step_message_with_a_task_kwarg_is_refused_like_any_unknown_argument(
    stack: Stack,
) -> None:
    """The step wrapper is a bound task; its own parameter must not swallow a kwarg."""
    saga_id = f"{stack.backend}-taskkw-{uuid.uuid4().hex[:8]}"
    _send_first_step(stack, saga_id, {"strategy_id": 1}, task="hijack")
    wait_for_log(
        stack.worker_logs(),
        "saga.backtest_workflow.create_backtest refused: task: unknown argument",
    )
    ok = stack.start("backtest_workflow", {"strategy_id": 3})
    assert stack.wait(ok).state is SagaState.COMPLETED


def _remote_rows(stack: Stack, saga_id: str) -> list[dict[str, Any]]:
    return [r for r in stack.store.audit_trail(saga_id) if r["step_name"] == "quote"]


def test_remote_failure_keeps_its_exception_type_and_message(stack: Stack) -> None:
    saga_id = stack.start("it_remote", {"qty": 1, "remote_decline": "retryable"})
    saga = stack.wait(saga_id)
    assert saga.state.value == "COMPENSATED"
    rows = _remote_rows(stack, saga_id)
    assert [r["event_type"] for r in rows] == [
        "step_start",
        "step_retry",
        "step_start",
        "step_failed",
    ]
    for row in (rows[1], rows[3]):
        assert "ValueError" in row["error_message"], row
        assert "card declined" in row["error_message"], row
        assert row["event_data"]["error_type"] == "ValueError"
        assert "Traceback" in row["error_stack_trace"]  # the remote worker's own
    assert "card declined" in (saga.error or "")
    stack.assert_chain_ok(saga_id)


def test_remote_failure_marked_non_retryable_fails_without_more_attempts(stack: Stack) -> None:
    saga_id = stack.start("it_remote", {"qty": 1, "remote_decline": "final"})
    saga = stack.wait(saga_id)
    assert saga.state.value == "COMPENSATED"
    rows = _remote_rows(stack, saga_id)
    assert [r["event_type"] for r in rows] == ["step_start", "step_failed"]
    assert rows[1]["event_data"]["retryable"] is False
    assert rows[1]["event_data"]["error_type"] == "CardReported"
    assert "reported stolen" in rows[1]["error_message"]
    assert saga.compensated_steps == ("reserve",)


def test_remote_failure_text_with_control_characters_is_stored_bounded(stack: Stack) -> None:
    saga_id = stack.start("it_remote", {"qty": 1, "remote_decline": "control"})
    saga = stack.wait(saga_id)
    assert saga.state.value == "COMPENSATED"
    rows = _remote_rows(stack, saga_id)
    assert [r["event_type"] for r in rows][-1] == "step_failed"
    message = rows[-1]["error_message"]
    assert "ValueError" in message and "card" in message and "declined" in message
    assert not any(ord(ch) < 32 and ch not in "\t\n\r" for ch in message), repr(message[:80])
    # The audit's Redactor applies to remote errors too.
    assert "hunter2" not in message and "hunter2" not in rows[-1]["error_stack_trace"]
    assert len(message) <= 4000
    assert len(rows[-1]["error_stack_trace"]) <= 20_000
    stack.assert_chain_ok(saga_id)


def test_forged_remote_failure_writes_nothing_of_its_own(stack: Stack) -> None:
    """A failure report with a wrong token: no retry, no failure, none of its text stored."""
    saga_id = stack.start("it_remote", {"qty": 2})
    saga = stack.wait(saga_id)
    before = stack.store.audit_trail(saga_id)
    task_id = uuid.uuid4().hex
    stack.producer.send_task(
        "saga.advance",
        args=("forged-task",),
        kwargs={
            "saga_id": saga_id,
            "step_index": 1,
            "direction": "forward",
            "attempt": 1,
            "token": "0" * 64,
            "outcome": "failure",
            "error_type": "ForgedError",
            "message": "forged decline\x00",
            "retryable": False,
        },
        queue=stack.queue,
        task_id=task_id,
    )
    # Celery logs a task's end after its return, so after anything it wrote.
    wait_for_tasks(stack.worker_logs(), [task_id])
    after = stack.store.audit_trail(saga_id)
    assert after == before  # an invalid token writes nothing (issue 14)
    assert not any("orged" in str(r) for r in after)
    final = stack.store.load(saga_id)
    assert final is not None
    assert (final.state, final.context, final.completed_steps, final.error, final.pending) == (
        saga.state,
        saga.context,
        saga.completed_steps,
        saga.error,
        saga.pending,
    )


def test_local_step_error_with_control_characters_is_recorded(stack: Stack) -> None:
    saga_id = stack.start("it_error_text", {})
    saga = stack.wait(saga_id, timeout=30)
    assert saga.state.value == "COMPENSATED"
    failed = next(r for r in stack.store.audit_trail(saga_id) if r["event_type"] == "step_failed")
    assert failed["error_message"].startswith("bad\\x00byte\\x1b[2J password=***REDACTED*** zz")
    # Capped at 4000 characters; the audit's masks, applied when the row is written, are
    # longer than the 7 characters of the password they replace.
    assert len(failed["error_message"]) == 4000 + len("***REDACTED***") - len("hunter2")
    assert "\x00" not in failed["error_stack_trace"]
    assert "hunter2" not in failed["error_stack_trace"]
    # The saga worker logs the failure after the commit the wait saw: poll for it. (The
    # remote service's worker logs its own exceptions unredacted: not ours to check.)
    saga_log = wait_for_log(stack.workers[0].log_path, "x00byte")
    assert "hunter2" not in saga_log
    stack.assert_chain_ok(saga_id)


def test_saga_anchor_appends_an_anchor_of_every_chain(stack: Stack) -> None:
    saga_id = stack.start("backtest_workflow", {"strategy_id": 1})
    stack.wait(saga_id)
    task_id = stack.send("saga.anchor", {})
    wait_for_tasks(stack.worker_logs(), [task_id])
    with stack.store.engine.connect() as conn:
        sagas, rows = conn.execute(
            text("SELECT sagas, rows FROM saga_audit_anchors ORDER BY id DESC LIMIT 1")
        ).one()
    assert sagas >= 1 and rows >= len(stack.store.audit_trail(saga_id))
