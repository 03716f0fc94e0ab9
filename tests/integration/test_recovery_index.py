"""The recovery scan reads the partial deadline index, not the checkpoint table.

EXPLAIN ANALYZE on PostgreSQL of the very query `SagaStore.stalled` runs, over 100k terminal
checkpoints (no deadline), 50 live ones (deadline ahead) and 5 stalled ones (deadline passed):
its cost must follow the stalled sagas, not the table.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import ClauseElement, Engine, Executable, text
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler

from saga_worker.audit.redaction import Redactor
from saga_worker.engine import utcnow
from saga_worker.store.connect import create_db_engine
from saga_worker.store.queries import stalled_query
from saga_worker.store.repository import SagaStore

from .conftest import fresh_postgres_database

pytestmark = pytest.mark.integration

INDEX = "ix_saga_checkpoints_deadline_live"
TERMINAL, LIVE, STALLED = 100_000, 50, 5


class Explain(Executable, ClauseElement):
    """EXPLAIN of a statement, compiled with the statement's own bind processing."""

    inherit_cache = False

    def __init__(self, statement: Any, options: str) -> None:
        self.statement = statement
        self.explain_options = options


@compiles(Explain, "postgresql")
def _explain(element: Explain, compiler: SQLCompiler, **kw: Any) -> str:
    return f"EXPLAIN ({element.explain_options}) {compiler.process(element.statement, **kw)}"


INSERT = """
INSERT INTO saga_checkpoints (
    saga_id, saga_type, state, current_step_index, completed_steps, compensated_steps,
    context, started_at, updated_at, total_steps, retries, version, pending, deadline,
    failed_compensations, abort_requested, audit_head)
SELECT :prefix || g, 'backtest_workflow', :state, :step, CAST(:completed AS json),
    CAST('[]' AS json), CAST('{"strategy_id": 1}' AS json), now() - interval '1 day', now(),
    3, 0, 4, CAST(:pending AS json),
    now() + (CAST(:offset AS integer) + g) * interval '1 second', CAST('[]' AS json),
    false, repeat('0', 64)
FROM generate_series(1, :count) AS g
"""
PENDING = (
    '{"step_index": 1, "direction": "forward", "number": 1, "not_before": "2026-01-01T00:00:00'
    '+00:00", "deadline": "2026-01-01T00:01:00+00:00", "recoveries": 0, "held": false}'
)


@pytest.fixture(scope="module")
def engine(pg_admin_url: str) -> Iterator[Engine]:
    engine = create_db_engine(fresh_postgres_database(pg_admin_url))
    done = '["create_backtest", "run_strategy", "save_results"]'
    first = '["create_backtest"]'
    with engine.begin() as conn:
        rows = [
            # Terminal sagas: no pending attempt, no deadline (outside the partial index).
            ("done-", "COMPLETED", 2, done, None, TERMINAL, None),
            # Live sagas whose deadline is still ahead, and stalled ones whose deadline passed.
            ("live-", "RUNNING", 1, first, PENDING, LIVE, 600),
            ("stalled-", "RUNNING", 1, first, PENDING, STALLED, -600),
        ]
        names = ("prefix", "state", "step", "completed", "pending", "count", "offset")
        for values in rows:
            conn.execute(text(INSERT), dict(zip(names, values, strict=True)))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE saga_checkpoints"))
    yield engine
    engine.dispose()


def plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", ()):
        yield from plan_nodes(child)


@pytest.mark.parametrize("page", ["first page", "next page"])
def test_recovery_scan_uses_the_partial_deadline_index(engine: Engine, page: str) -> None:
    now = utcnow()
    after = None
    if page == "next page":
        # The keyset of a later page: after the second stalled saga.
        with engine.connect() as conn:
            row = conn.execute(stalled_query(now, 2)).all()[-1]
            after = (row.deadline, row.saga_id)
    query = stalled_query(now, 500, after)
    with engine.connect() as conn:
        analysed = conn.execute(Explain(query, "ANALYZE, BUFFERS, FORMAT JSON")).scalar_one()[0]
        readable = conn.execute(Explain(query, "ANALYZE, BUFFERS")).scalars().all()
        table_pages = conn.execute(
            text("SELECT relpages FROM pg_class WHERE relname = 'saga_checkpoints'")
        ).scalar_one()
        sizes = conn.execute(
            text(
                "SELECT pg_size_pretty(pg_relation_size('saga_checkpoints')), "
                f"pg_size_pretty(pg_relation_size('{INDEX}'))"
            )
        ).one()
    nodes = list(plan_nodes(analysed["Plan"]))
    print(
        f"\n[recovery scan, {page}] {TERMINAL} terminal + {LIVE} live + {STALLED} stalled "
        f"checkpoints; table {sizes[0]} ({table_pages} pages), {INDEX} {sizes[1]}\n"
        + "\n".join(readable)
    )
    assert any(n.get("Index Name") == INDEX for n in nodes), readable
    assert not any(n["Node Type"] == "Seq Scan" for n in nodes), readable
    top = analysed["Plan"]
    assert top["Actual Rows"] == (STALLED if after is None else STALLED - 2)
    # It touches a handful of index and heap pages, not the table's thousands.
    touched = top["Shared Hit Blocks"] + top["Shared Read Blocks"]
    assert table_pages > 1000 and touched < 50, (touched, table_pages)


def test_stalled_returns_only_passed_deadlines_in_order(engine: Engine) -> None:
    store = SagaStore(engine, Redactor([]))
    now = utcnow()
    found = store.stalled(now, 500)
    assert [row.saga_id for row in found] == [f"stalled-{g}" for g in range(1, STALLED + 1)]
    assert all(row.deadline < now - timedelta(seconds=500) for row in found)
    # Paging on (deadline, saga_id) goes on exactly where the previous page ended.
    first = store.stalled(now, 2)
    rest = store.stalled(now, 500, after=(first[-1].deadline, first[-1].saga_id))
    assert [row.saga_id for row in first + rest] == [row.saga_id for row in found]
    timings = []
    for _ in range(20):
        began = time.perf_counter()
        store.stalled(now, 500)
        timings.append((time.perf_counter() - began) * 1000)
    print(
        f"\n[recovery scan] SagaStore.stalled over {TERMINAL + LIVE + STALLED} checkpoints: "
        f"median {statistics.median(timings):.2f} ms, max {max(timings):.2f} ms (20 runs)"
    )
