"""What the console (issue 17) builds on, with real workers on PostgreSQL and Redis:
`saga-worker list --key` finds a saga by its business key, and the Celery task id a
`step_start` / `compensation_start` row records is the id of the task the worker ran."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import event, text

from saga_worker.audit.redaction import Redactor
from saga_worker.core.decision import Decision
from saga_worker.core.events import StartRequested, StepSucceeded
from saga_worker.core.model import Direction, Saga
from saga_worker.core.transition import start, transition
from saga_worker.engine import utcnow
from saga_worker.examples import order_workflow
from saga_worker.store.connect import create_db_engine
from saga_worker.store.queries import SagaQuery
from saga_worker.store.repository import SagaStore
from tests.waiting import as_logged, read_logs, wait_for

from .conftest import WORKER_IMPORTS, Stack, fresh_postgres_database
from .test_operations import cli

pytestmark = pytest.mark.integration

STARTS = ("step_start", "compensation_start")
FWD = Direction.FORWARD


def cli_env(stack: Stack) -> dict[str, str]:
    return {
        "SAGA_DATABASE_URL": stack.database_url,
        "SAGA_BROKER_URL": stack.broker_url,
        "SAGA_QUEUE": stack.queue,
        "SAGA_IMPORTS": WORKER_IMPORTS,
    }


def start_rows(stack: Stack, saga_id: str) -> list[dict[str, Any]]:
    """The start rows of the attempts that were sent (a wait's has no task id)."""
    return [
        r
        for r in stack.store.audit_trail(saga_id)
        if r["event_type"] in STARTS and "task_id" in (r["event_data"] or {})
    ]


def received(task_name: str, task_id: str) -> str:
    """The worker log line of a task received under that name and id (logs mask digit runs
    that look like card numbers, hence `as_logged`)."""
    return f"Task {task_name}[{as_logged(task_id)}] received"


def assert_ran_under_their_ids(stack: Stack, saga_id: str, names: list[str]) -> None:
    rows = start_rows(stack, saga_id)
    assert [r["step_name"] + ("" if r["event_type"] == "step_start" else "*") for r in rows] == (
        names
    )
    ids = [r["event_data"]["task_id"] for r in rows]
    assert len(set(ids)) == len(ids)

    expected = [received(name, i) for name, i in zip(task_names(rows), ids, strict=True)]

    def missing() -> list[str]:
        text = read_logs(stack.worker_logs())
        return [line for line in expected if line not in text]

    wait_for(
        lambda: not missing(),
        30,
        f"the workers to log the tasks of {saga_id}",
        details=lambda: f"missing: {missing()}\n{stack.logs()}",
    )


def task_names(rows: list[dict[str, Any]]) -> list[str]:
    names = []
    for row in rows:
        if row["step_name"] == "quote":
            names.append("it_pricing.quote")  # the remote service's task
            continue
        suffix = ".compensate" if row["event_type"] == "compensation_start" else ""
        saga_type = "it_remote" if row["step_name"] in ("reserve", "confirm") else "order_workflow"
        names.append(f"saga.{saga_type}.{row['step_name']}{suffix}")
    return names


def waiting_for_approval(stack: Stack, saga_id: str) -> Saga:
    def check() -> Saga | None:
        saga = stack.store.load(saga_id)
        return saga if saga is not None and saga.waiting_for == "signal:approval" else None

    return wait_for(check, 60, f"{saga_id} to wait for its approval", details=stack.logs)


@pytest.mark.parametrize("stack", ["postgres"], indirect=True)
def test_list_key_finds_the_order_and_each_start_row_names_the_task_the_worker_ran(
    stack: Stack,
) -> None:
    ref = f"ORD-{uuid.uuid4().hex[:8]}"
    approved = stack.start("order_workflow", {"amount": 250, "order_ref": ref})
    over_limit = stack.start(
        "order_workflow", {"amount": 5000, "limit": 1000, "order_ref": f"{ref}-2"}
    )
    unkeyed = stack.start("order_workflow", {"amount": 1, "order_ref": 7, "limit": 0})
    remote = stack.start("it_remote", {"qty": 5})

    waiting_for_approval(stack, approved)
    stack.send(
        "saga.signal",
        {"saga_id": approved, "signal": "approval", "payload": {"approved": True}, "user_id": "it"},
    )
    final = stack.wait_all([approved, over_limit, unkeyed, remote], timeout=90)
    assert final[approved].state.value == "COMPLETED", final[approved]
    assert final[over_limit].state.value == "COMPENSATED", final[over_limit]
    assert final[remote].state.value == "COMPLETED", final[remote]
    assert final[approved].business_key == ref
    assert final[unkeyed].business_key is None  # order_ref 7 is not a string

    # -- list --key and status, through the real console script
    env = cli_env(stack)
    listed = cli(["list", "--key", ref, "--json"], env)
    assert listed.returncode == 0, listed.stderr
    items = json.loads(listed.stdout)["items"]
    assert [(i["saga_id"], i["business_key"], i["state"]) for i in items] == [
        (approved, ref, "COMPLETED")
    ]
    assert json.loads(listed.stdout)["total"] == 1
    shown = cli(["status", approved], env)
    assert shown.returncode == 0, shown.stderr
    assert any(line.split() == ["key", ref] for line in shown.stdout.splitlines()), shown.stdout
    none = cli(["list", "--key", "7", "--json"], env)
    assert json.loads(none.stdout)["items"] == []

    # -- the task ids of the start rows are the ids the workers received
    assert_ran_under_their_ids(
        stack, approved, ["validate_order", "reserve_funds", "check_limits", "book_trade"]
    )
    # check_limits fails at once (over the limit): validate_order's and reserve_funds'
    # compensations run under ids of their own.
    assert_ran_under_their_ids(
        stack,
        over_limit,
        [
            "validate_order",
            "reserve_funds",
            "check_limits",
            "reserve_funds*",
            "validate_order*",
        ],
    )
    # A remote step: the other service's worker ran it under the recorded id.
    assert_ran_under_their_ids(stack, remote, ["reserve", "quote", "confirm"])
    for saga_id in (approved, over_limit, remote):
        stack.assert_chain_ok(saga_id)


def test_postgresql_writes_the_key_at_start_and_never_updates_it(pg_admin_url: str) -> None:
    """A transition decided on a copy without the key (a step message's checkpoint signed
    by an older build) leaves the column as the start wrote it."""
    engine = create_db_engine(fresh_postgres_database(pg_admin_url))
    try:
        store = SagaStore(engine, Redactor([]))
        definition = order_workflow
        now = utcnow()
        request = StartRequested("pg-key", "order_workflow", {"amount": 1, "order_ref": "R-1"})
        created = store.create(start(definition, request, now), now)
        assert created is not None and created.saga.business_key == "R-1"

        def without_key(saga: Saga) -> Decision:
            stale = replace(saga, business_key=None)
            return transition(definition, stale, StepSucceeded(0, FWD, 1, {}), now)

        assert store.apply("pg-key", without_key, now) is not None
        saga = store.load("pg-key")
        assert saga is not None and saga.completed_steps == ("validate_order",)
        assert saga.business_key == "R-1"
    finally:
        engine.dispose()


# -- the business key index, by the EXPLAIN of the queries `list --key` runs ------------------

ROWS = 200_000
INSERT = """
INSERT INTO saga_checkpoints (
    saga_id, saga_type, state, current_step_index, completed_steps, compensated_steps,
    context, started_at, updated_at, total_steps, retries, version, pending, deadline,
    failed_compensations, abort_requested, audit_head, business_key)
SELECT 'bk-' || g, 'order_workflow', CASE WHEN g % 10 = 0 THEN 'FAILED' ELSE 'COMPLETED' END,
    4, CAST('[]' AS json), CAST('[]' AS json), CAST('{"amount": 1}' AS json),
    now() - g * interval '1 second', now(), 5, 0, 4, NULL, NULL, CAST('[]' AS json), false,
    repeat('0', 64),
    -- a quarter of the sagas have a key (definitions without one leave it NULL)
    CASE WHEN g % 4 = 0 THEN 'ORD-' || (g / 4) END
FROM generate_series(1, :rows) AS g
"""


def plan_nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    found = [node]
    for child in node.get("Plans", ()):
        found.extend(plan_nodes(child))
    return found


def test_list_key_reads_the_partial_business_key_index(pg_admin_url: str) -> None:
    engine = create_db_engine(fresh_postgres_database(pg_admin_url))
    try:
        with engine.begin() as conn:
            conn.execute(text(INSERT), {"rows": ROWS})
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE saga_checkpoints"))
        store = SagaStore(engine, Redactor([]))
        statements: list[tuple[str, Any]] = []

        def capture(*args: Any) -> None:
            statements.append((args[2], args[3]))

        event.listen(engine, "before_cursor_execute", capture)
        try:
            query = SagaQuery(business_key="ORD-7", states=("FAILED",))
            found = store.list_sagas(SagaQuery(business_key="ORD-7"), limit=20)
            counts = store.count_sagas_by_state(query)
        finally:
            event.remove(engine, "before_cursor_execute", capture)
        assert [s.saga_id for s in found] == ["bk-28"]
        assert counts == {"COMPLETED": 1}
        assert len(statements) == 2
        for statement, params in statements:
            with engine.connect() as conn:
                plan = conn.exec_driver_sql(
                    f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {statement}", params
                ).scalar_one()[0]
                readable = conn.exec_driver_sql(f"EXPLAIN ANALYZE {statement}", params).scalars()
                shown = "\n".join(readable)
            nodes = plan_nodes(plan["Plan"])
            print(f"\n[list --key] over {ROWS} checkpoints:\n{statement}\n{shown}")
            assert any(n.get("Index Name") == "ix_saga_checkpoints_business_key" for n in nodes), (
                shown
            )
            assert not any(n["Node Type"] == "Seq Scan" for n in nodes), shown
            touched = plan["Plan"].get("Shared Hit Blocks", 0) + plan["Plan"].get(
                "Shared Read Blocks", 0
            )
            assert touched < 20, shown
        # A prepared statement's generic plan (psycopg prepares a query run 5 times, and the
        # server may then plan it without the value) still proves the index's predicate.
        with engine.connect() as conn:
            conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
            conn.exec_driver_sql(
                "PREPARE by_key(varchar) AS SELECT saga_id FROM saga_checkpoints "
                "WHERE business_key = $1 ORDER BY started_at DESC, saga_id DESC LIMIT 20"
            )
            generic = "\n".join(conn.exec_driver_sql("EXPLAIN EXECUTE by_key('ORD-7')").scalars())
        print(f"\n[list --key] generic plan:\n{generic}")
        assert "ix_saga_checkpoints_business_key" in generic and "$1" in generic, generic
    finally:
        engine.dispose()
