"""The write diet on PostgreSQL (issue 18, migrations 0008 and 0009).

Every index costs WAL on every row written, so each remaining one must serve a query, and
the queries must still find theirs: EXPLAIN of the very statements the CLI, the console,
the exports and the chain run, over 240,000 audit rows and 30,000 checkpoints. And a
saga's checkpoint updates between its start and its end are HOT: they change no indexed
column (the indexed deadline is rounded up, store/codec.py `scan_deadline`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text

from saga_worker import SagaDefinition, Step
from saga_worker.audit.redaction import Redactor
from saga_worker.engine import SagaEngine, utcnow
from saga_worker.store.connect import create_db_engine
from saga_worker.store.queries import AuditQuery, AuditReader, _audit_filter, stalled_query
from saga_worker.store.repository import SagaStore
from saga_worker.store.tables import audit_logs, checkpoints
from saga_worker.testing import SagaTestHarness

from .conftest import fresh_postgres_database
from .test_recovery_index import Explain, plan_nodes

pytestmark = pytest.mark.integration

SAGAS, ROWS = 30_000, 240_000
EVENTS = ("saga_start", "step_start", "step_complete", "step_start", "step_complete")

AUDIT_ROWS = """
INSERT INTO saga_audit_logs (saga_id, event_type, step_name, step_index, event_data,
    context_snapshot, timestamp, user_id, saga_state_after, prev_hash, hash)
SELECT 's-' || (g % :sagas),
    (ARRAY['saga_start', 'step_start', 'step_complete', 'step_start', 'step_complete',
           'saga_complete', 'step_retry', 'saga_compensated'])[1 + g % 8],
    'step', 0, CAST('{"attempt"\\:1}' AS json), NULL,
    now() - interval '2 days' + g * interval '700 milliseconds',
    CASE WHEN g % 2 = 0 THEN 'user-' || (g % 40) END,
    'RUNNING', repeat('0', 64), md5(g::text) || md5(g::text)
FROM generate_series(1, :rows) AS g
"""
CHECKPOINTS = """
INSERT INTO saga_checkpoints (saga_id, saga_type, state, current_step_index,
    completed_steps, compensated_steps, context, started_at, updated_at, total_steps,
    retries, version, failed_compensations, abort_requested, audit_head, user_id)
SELECT 's-' || g, 'order', CASE WHEN g % 100 = 0 THEN 'FAILED' ELSE 'COMPLETED' END, 2,
    CAST('[]' AS json), CAST('[]' AS json), CAST('{}' AS json),
    now() - interval '2 days' + g * interval '5 seconds', now(), 3, 0, 4,
    CAST('[]' AS json), false, repeat('0', 64), 'user-' || (g % 40)
FROM generate_series(1, :sagas) AS g
"""


@pytest.fixture(scope="module")
def loaded(pg_admin_url: str) -> Iterator[Engine]:
    engine = create_db_engine(fresh_postgres_database(pg_admin_url))
    with engine.begin() as conn:
        # Rows written as the loaders of bench/scale.py write them: the chain trigger off.
        conn.execute(text("SET LOCAL session_replication_role = replica"))
        conn.execute(text(AUDIT_ROWS), {"sagas": SAGAS, "rows": ROWS})
        conn.execute(text(CHECKPOINTS), {"sagas": SAGAS})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE saga_audit_logs"))
        conn.execute(text("VACUUM ANALYZE saga_checkpoints"))
    yield engine
    engine.dispose()


def explain(engine: Engine, statement: Any) -> tuple[list[dict[str, Any]], str]:
    with engine.connect() as conn:
        analysed = conn.execute(Explain(statement, "ANALYZE, FORMAT JSON")).scalar_one()[0]
        readable = "\n".join(conn.execute(Explain(statement, "ANALYZE")).scalars())
    print("\n" + readable)
    return list(plan_nodes(analysed["Plan"])), readable


def indexes_used(nodes: list[dict[str, Any]]) -> set[str]:
    return {str(n["Index Name"]) for n in nodes if "Index Name" in n}


def test_the_audit_table_has_the_indexes_of_design_section_4(loaded: Engine) -> None:
    with loaded.connect() as conn:
        found: dict[str, str] = dict(
            conn.execute(
                text(
                    "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'saga_audit_logs'"
                )
            ).all()
        )
    assert set(found) == {
        "saga_audit_logs_pkey",
        "ix_saga_audit_logs_saga_id_id",
        "ix_saga_audit_logs_event_type_timestamp",
        "ix_saga_audit_logs_user_id_timestamp_partial",
        "ix_saga_audit_logs_timestamp_brin",
    }, found
    assert "USING brin" in found["ix_saga_audit_logs_timestamp_brin"]
    assert "WHERE (user_id IS NOT NULL)" in found["ix_saga_audit_logs_user_id_timestamp_partial"]


def test_a_saga_trail_and_its_chain_head_read_saga_id_id(loaded: Engine) -> None:
    a = audit_logs.c
    trail = select(audit_logs).where(a.saga_id == "s-123").order_by(a.id)
    head = select(a.hash).where(a.saga_id == "s-123").order_by(a.id.desc()).limit(1)
    for statement in (trail, head):
        nodes, readable = explain(loaded, statement)
        assert indexes_used(nodes) == {"ix_saga_audit_logs_saga_id_id"}, readable
        # (8 rows on 8 pages: a bitmap scan and a sort of them is the planner's choice)
        assert not any(n["Node Type"] == "Seq Scan" for n in nodes), readable


def test_the_overview_counts_read_event_type_timestamp(loaded: Engine) -> None:
    a = audit_logs.c
    since = utcnow() - timedelta(hours=1)
    for event_type in ("saga_complete", "saga_compensated"):
        statement = select(func.count()).where(a.event_type == event_type, a.timestamp >= since)
        nodes, readable = explain(loaded, statement)
        assert indexes_used(nodes) == {"ix_saga_audit_logs_event_type_timestamp"}, readable


def removed(nodes: list[dict[str, Any]]) -> int:
    return sum(
        int(n.get("Rows Removed by Filter", 0)) + int(n.get("Rows Removed by Index Recheck", 0))
        for n in nodes
    )


def test_an_export_of_a_time_range_reads_only_that_range(loaded: Engine) -> None:
    """`audit export --since/--until`: the range's ids come from the BRIN index, then pages
    walk the primary key inside them. Without the id bounds the planner walked the primary
    key from the first row and filtered 92,000 rows for the first page of 2,000."""
    now = utcnow()
    query = AuditQuery(since=now - timedelta(hours=30), until=now - timedelta(hours=29))
    a = audit_logs.c
    bounds = _audit_filter(select(func.min(a.id + 0), func.max(a.id + 0)), query)
    nodes, readable = explain(loaded, bounds)
    assert "ix_saga_audit_logs_timestamp_brin" in indexes_used(nodes), readable
    assert removed(nodes) < 20_000, readable  # the recheck of the range's block ranges
    with loaded.connect() as conn:
        statement = AuditReader._by_id(conn, query)
        expected = conn.execute(_audit_filter(select(func.count()), query)).scalar_one()
    assert statement is not None
    nodes, readable = explain(loaded, statement.where(a.id > 0).limit(2000))
    assert not any(n["Node Type"] == "Seq Scan" for n in nodes), readable
    assert nodes[0]["Actual Rows"] == 2000 and removed(nodes) < 2000, readable
    # Every row of the range, in id order, page by page (the reader without a snapshot).
    ids = [row["id"] for row in AuditReader(loaded, None, 2000).rows(query)]
    assert len(ids) == expected > 2000 and ids == sorted(ids)
    empty = AuditQuery(since=now + timedelta(hours=1))
    assert list(AuditReader(loaded, None, 2000).rows(empty)) == []


def test_rows_of_one_user_read_the_partial_index_with_a_generic_plan(loaded: Engine) -> None:
    """`user_id = $1` implies `user_id IS NOT NULL` (the operator is strict): a prepared
    statement's generic plan can use the partial index."""
    with loaded.connect() as conn:
        conn.execute(text("SET plan_cache_mode = force_generic_plan"))
        conn.execute(
            text(
                "PREPARE by_user(text, timestamptz) AS SELECT id FROM saga_audit_logs "
                "WHERE user_id = $1 AND timestamp >= $2 ORDER BY timestamp"
            )
        )
        plan = "\n".join(
            conn.execute(
                text("EXPLAIN EXECUTE by_user('user-4', now() - interval '1 hour')")
            ).scalars()
        )
    print("\n" + plan)
    assert "$1" in plan and "ix_saga_audit_logs_user_id_timestamp_partial" in plan, plan


def test_the_failed_list_and_the_recovery_scan_keep_their_indexes(loaded: Engine) -> None:
    c = checkpoints.c
    failed = select(c.saga_id).where(c.state == "FAILED").order_by(c.updated_at.desc()).limit(50)
    nodes, readable = explain(loaded, failed)
    assert "ix_saga_checkpoints_state" in indexes_used(nodes), readable
    stalled = (
        select(c.saga_id)
        .where(c.deadline.is_not(None), c.deadline < utcnow())
        .order_by(c.deadline, c.saga_id)
        .limit(500)
    )
    nodes, readable = explain(loaded, stalled)
    assert indexes_used(nodes) == {"ix_saga_checkpoints_deadline_live"}, readable


def test_checkpoint_updates_between_start_and_end_are_hot(pg_admin_url: str) -> None:
    """Three local steps, each sent 5 ms after the one before: the two updates between the
    start and the COMPLETED one change no indexed column, so PostgreSQL makes them HOT."""
    url = fresh_postgres_database(pg_admin_url)
    engine = create_db_engine(url)
    definition = SagaDefinition(
        "hot_saga",
        [Step(name, lambda call: {"x": 1}) for name in ("reserve", "compute", "record")],
    )
    harness = SagaTestHarness(definition)
    harness.store = SagaStore(engine, Redactor([]))  # type: ignore[assignment]
    harness.engine = SagaEngine(
        harness.store,
        harness.dispatcher,
        harness.limits,
        clock=harness.clock,
        definitions=lambda saga_type, version: definition,
    )
    sagas = 20
    for _ in range(sagas):
        harness.start({"n": 1})
        while harness.queued:
            harness.advance_clock(0.005)
            harness.run_next()
        assert harness.saga.state.value == "COMPLETED"
    engine.dispose()  # backends flush their statistics when they end
    probe = create_db_engine(url, pool=False)
    deadline = time.monotonic() + 10
    while True:
        with probe.connect() as conn:
            updates, hot = conn.execute(
                text(
                    "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
                    "WHERE relname = 'saga_checkpoints'"
                )
            ).one()
        if updates >= 3 * sagas or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    probe.dispose()
    assert updates == 3 * sagas, updates
    # The two updates in the middle of each saga, barring a grain boundary between steps.
    assert hot >= 2 * sagas - 2, (hot, updates)


def test_a_mass_stall_pages_through_one_shared_deadline_by_index(pg_admin_url: str) -> None:
    """5,000 live sagas whose rounded deadline is the same second: each page of the sweep
    starts where the last one ended, by (deadline, saga_id) in the index, instead of reading
    the sagas of that deadline again."""
    engine = create_db_engine(fresh_postgres_database(pg_admin_url))
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO saga_checkpoints (saga_id, saga_type, state, current_step_index,"
                " completed_steps, compensated_steps, context, started_at, updated_at,"
                " total_steps, retries, version, failed_compensations, abort_requested,"
                " audit_head, deadline) SELECT 'stalled-' || lpad(g::text, 5, '0'), 'order',"
                " 'RUNNING', 0, CAST('[]' AS json), CAST('[]' AS json), CAST('{}' AS json),"
                " now(), now(), 3, 0, 1, CAST('[]' AS json), false, repeat('0', 64),"
                " date_trunc('minute', now()) - interval '1 hour'"
                " FROM generate_series(1, 5000) AS g"
            )
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE saga_checkpoints"))
        shared = conn.execute(text("SELECT min(deadline) FROM saga_checkpoints")).scalar_one()
    page = stalled_query(utcnow(), 500, (shared, "stalled-04000"))
    nodes, readable = explain(engine, page)
    engine.dispose()
    assert indexes_used(nodes) == {"ix_saga_checkpoints_deadline_live"}, readable
    assert nodes[0]["Actual Rows"] == 500, readable
    assert removed(nodes) == 0, readable
    scanned = [n for n in nodes if n.get("Index Name") == "ix_saga_checkpoints_deadline_live"]
    assert scanned[0]["Actual Rows"] <= 1000, readable  # not the 4,000 before the page
