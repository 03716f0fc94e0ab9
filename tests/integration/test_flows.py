"""Parallel groups, waits, signals, approvals and durable timers end to end (issue 16):
real Celery worker processes and beats, Redis, PostgreSQL, the real `saga-worker` CLI.

Each test runs its own workers and beat on its own queue against its own database.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from saga_worker.audit.verify import verify_chain
from saga_worker.core.model import Saga
from saga_worker.examples.tables import example_orders
from tests.fixtures.flow_sagas import SLEEP_SECONDS, WAIT_SECONDS
from tests.waiting import wait_for

from .conftest import fresh_postgres_database
from .processes import Rig, kill_group
from .test_operations import cli

pytestmark = pytest.mark.integration

IMPORTS = "saga_worker.examples,tests.fixtures.flow_sagas"


@pytest.fixture
def rig(pg_admin_url: str, broker_url: str, tmp_path: Path) -> Iterator[Rig]:
    rig = Rig.create(
        fresh_postgres_database(pg_admin_url),
        broker_url,
        tmp_path,
        SAGA_IMPORTS=IMPORTS,
        SAGA_STALL_GRACE_SECONDS="5",
        SAGA_RECOVERY_INTERVAL_SECONDS="0.5",
    )
    try:
        yield rig
    finally:
        rig.close()


def start(rig: Rig, saga_type: str, context: dict[str, Any], **fields: Any) -> str:
    saga_id = f"{saga_type}-{uuid.uuid4().hex[:10]}"
    rig.producer.send_task(
        "saga.start",
        kwargs={"saga_type": saga_type, "context": context, "saga_id": saga_id, **fields},
        queue=rig.queue,
    )
    return saga_id


def trail(rig: Rig, saga_id: str) -> list[dict[str, Any]]:
    return rig.store.audit_trail(saga_id)


def rows(rig: Rig, saga_id: str, event_type: str, step: str | None = None) -> list[dict[str, Any]]:
    return [
        r
        for r in trail(rig, saga_id)
        if r["event_type"] == event_type and (step is None or r["step_name"] == step)
    ]


def waiting(rig: Rig, saga_id: str, what: str, timeout: float = 30) -> Saga:
    def check() -> Saga | None:
        saga = rig.store.load(saga_id)
        return saga if saga is not None and saga.waiting_for == what else None

    return wait_for(
        check,
        timeout,
        f"{saga_id} to wait for {what}",
        details=lambda: str(rig.store.load(saga_id)),
    )


def cli_env(rig: Rig) -> dict[str, str]:
    return {
        k: rig.env[k]
        for k in ("SAGA_DATABASE_URL", "SAGA_BROKER_URL", "SAGA_QUEUE", "SAGA_IMPORTS")
    }


def branches_started(barrier: Path) -> bool:
    return all(Path(f"{barrier}.{name}.started").exists() for name in ("left", "right"))


def test_branches_overlap_in_time_and_join_once_when_they_finish_together(
    rig: Rig, tmp_path: Path
) -> None:
    # Two worker processes, one task at a time each: the branches of a saga run on both.
    rig.start_worker(concurrency=1)
    rig.start_worker(concurrency=1)
    barriers = {}
    for _ in range(4):
        # One saga at a time: each needs both worker processes until its barrier opens.
        barrier = tmp_path / f"barrier-{uuid.uuid4().hex[:6]}"
        saga_id = start(rig, "flow_pair", {"barrier": str(barrier)})
        barriers[saga_id] = barrier
        # Both branches are running (each on its own worker) before the barrier opens...
        wait_for(
            functools.partial(branches_started, barrier),
            30,
            f"both branches of {saga_id} to start",
            details=rig.worker_logs,
        )
        # ...and finish at the same instant: their two results race for the join.
        barrier.touch()
        saga = rig.wait_all([saga_id], timeout=30)[saga_id]
        assert saga.state.value == "COMPLETED", saga
        ctx = saga.context
        assert ctx["left_started"] < ctx["right_ended"] and ctx["right_started"] < ctx["left_ended"]
        starts = [r["step_name"] for r in rows(rig, saga_id, "step_start")]
        assert starts == ["prepare", "left", "right", "finish"], starts
        completes = sorted(r["step_name"] for r in rows(rig, saga_id, "step_complete"))
        assert completes == ["finish", "left", "prepare", "right"]
        # The two branch starts are one transition (the same commit time), the join another.
        left, right = (
            rows(rig, saga_id, "step_start", "left"),
            rows(rig, saga_id, "step_start", "right"),
        )
        assert left[0]["timestamp"] == right[0]["timestamp"]
    for saga_id in barriers:
        assert len(rows(rig, saga_id, "step_start", "finish")) == 1
        assert len(rows(rig, saga_id, "saga_complete")) == 1
        assert verify_chain(trail(rig, saga_id)) == []


def test_a_failed_branch_lets_the_other_finish_then_compensates_it(rig: Rig) -> None:
    rig.start_worker(concurrency=2)
    # check_limits fails at once (amount over the limit) while reserve_funds still runs.
    saga_id = start(
        rig,
        "order_workflow",
        {"amount": 5000, "limit": 1000, "slow_after_step": {"step": "reserve_funds", "seconds": 2}},
    )
    saga = rig.wait_all([saga_id], timeout=60)[saga_id]
    assert saga.state.value == "COMPENSATED", saga
    events = [(r["event_type"], r["step_name"]) for r in trail(rig, saga_id)]
    failed_at = events.index(("step_failed", "check_limits"))
    reserved_at = events.index(("step_complete", "reserve_funds"))
    assert failed_at < reserved_at, events  # the running branch finished after the failure
    assert events[reserved_at + 1] == ("compensation_start", "reserve_funds"), events
    compensated = [s for e, s in events if e == "compensation_complete"]
    assert compensated == ["reserve_funds", "validate_order"], events
    assert ("compensation_start", "check_limits") not in events  # it never took effect
    assert "check_limits" in (saga.error or "")
    with rig.store.engine.connect() as conn:
        status = conn.execute(
            select(example_orders.c.status).where(example_orders.c.saga_id == saga_id)
        ).scalar_one()
    assert status == "released"


def test_a_signal_that_arrives_early_is_kept_and_delivered_when_the_wait_begins(rig: Rig) -> None:
    rig.start_worker()
    saga_id = start(rig, "flow_wait", {"slow_step": {"step": "hold", "seconds": 2}}, user_id="u1")
    wait_for(lambda: rows(rig, saga_id, "step_start", "hold"), 30, "hold to start")
    # Twice: the second is a duplicate, recorded nowhere.
    for ref in ("X-7", "X-8"):
        rig.producer.send_task(
            "saga.signal",
            kwargs={
                "saga_id": saga_id,
                "signal": "go",
                "payload": {"go_ref": ref},
                "user_id": "desk-9",
            },
            queue=rig.queue,
        )
    saga = rig.wait_all([saga_id], timeout=30)[saga_id]
    assert saga.state.value == "COMPLETED", saga
    assert saga.context["go_ref"] == "X-7"
    received = rows(rig, saga_id, "signal_received")
    assert [r["event_data"].get("kept") for r in received] == [True, None], received
    kept, delivered = received
    assert kept["timestamp"] < rows(rig, saga_id, "step_complete", "hold")[0]["timestamp"]
    assert "kept_since" in delivered["event_data"] and delivered["user_id"] == "desk-9"
    assert delivered["context_snapshot"]["go_ref"] == "X-7"


def test_a_wait_that_times_out_fails_and_compensates(rig: Rig) -> None:
    rig.start_worker()
    rig.start_beat()
    began = time.monotonic()
    saga_id = start(rig, "flow_wait", {})
    waiting(rig, saga_id, "signal:go")
    saga = rig.wait_all([saga_id], timeout=30)[saga_id]
    assert saga.state.value == "COMPENSATED", saga
    assert time.monotonic() - began >= WAIT_SECONDS
    failed = rows(rig, saga_id, "step_failed", "await_go")
    assert failed and failed[0]["event_data"]["error_type"] == "WaitTimedOut", failed
    assert [r["step_name"] for r in rows(rig, saga_id, "compensation_complete")] == ["hold"]
    assert saga.waiting_for is None and saga.waiting_since is None


def test_an_approval_is_refused_for_the_starter_and_accepted_from_two_others(rig: Rig) -> None:
    rig.start_worker()
    saga_id = start(rig, "flow_approval", {}, user_id="alice")
    waiting(rig, saga_id, "approval:sign_off")
    env = cli_env(rig)
    refused = cli(["approve", saga_id, "--user", "alice"], env)
    assert refused.returncode == 4, refused.stderr
    assert "started the saga" in refused.stderr
    first = cli(["approve", saga_id, "--user", "bob", "--reason", "limits ok"], env)
    assert first.returncode == 0, first.stderr
    again = cli(["approve", saga_id, "--user", "bob"], env)
    assert again.returncode == 4 and "voted" in again.stderr, again.stderr
    assert rig.store.load(saga_id).waiting_for == "approval:sign_off"  # type: ignore[union-attr]
    second = cli(["approve", saga_id, "--user", "carol", "--json"], env)
    assert second.returncode == 0, second.stderr
    saga = rig.wait_all([saga_id], timeout=30)[saga_id]
    assert saga.state.value == "COMPLETED", saga
    votes = rows(rig, saga_id, "signal_received")
    assert [(v["user_id"], "refused" in v["event_data"]) for v in votes] == [
        ("alice", True),
        ("bob", False),
        ("bob", True),
        ("carol", False),
    ]
    done = rows(rig, saga_id, "step_complete", "sign_off")[0]
    assert done["event_data"]["approvers"] == ["bob", "carol"]


def test_a_sleep_survives_a_worker_killed_while_it_sleeps(rig: Rig) -> None:
    rig.start_worker()
    rig.start_beat()
    saga_id = start(rig, "flow_sleep", {})
    slept_from = waiting(rig, saga_id, "sleep:cool_off").waiting_since
    assert slept_from is not None
    kill_group(rig.worker.process)  # nothing holds the timer but the database
    time.sleep(1)
    rig.start_worker()
    saga = rig.wait_all([saga_id], timeout=30)[saga_id]
    assert saga.state.value == "COMPLETED", saga
    woke = rows(rig, saga_id, "step_complete", "cool_off")[0]
    assert (woke["timestamp"] - slept_from).total_seconds() >= SLEEP_SECONDS
    assert woke["event_data"]["slept_seconds"] == SLEEP_SECONDS
    assert [r["step_name"] for r in rows(rig, saga_id, "step_start")] == [
        "before",
        "cool_off",
        "after",
    ]
