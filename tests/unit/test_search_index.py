"""The search's order has an index (migration 0007): a page of `list_sagas` newest first, and
a since/until range, read it instead of sorting the table (SQLite's plan here; PostgreSQL's
at 1M sagas in docs/benchmark.md, "Console at 1M sagas / 10M audit rows")."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Select, inspect, select

from saga_worker.client import SagaClient
from saga_worker.config import Settings
from saga_worker.store.migrate import upgrade
from saga_worker.store.queries import SagaQuery, _saga_filter
from saga_worker.store.tables import checkpoints

SINCE = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
UNTIL = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


def migrated(tmp_path: Path) -> SagaClient:
    client = SagaClient(Settings.from_env({"SAGA_HOME": str(tmp_path)}))
    upgrade(client.store.engine)
    return client


def page_query(q: SagaQuery) -> Select[tuple[str]]:
    """What OperatorQueries.list_sagas runs for the first page."""
    c = checkpoints.c
    return (
        _saga_filter(select(c.saga_id), q).order_by(c.started_at.desc(), c.saga_id.desc()).limit(25)
    )


def plan(client: SagaClient, query: Select[tuple[str]]) -> str:
    engine = client.store.engine
    compiled = query.compile(engine, compile_kwargs={"literal_binds": True})
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}").all()
    return " | ".join(str(r[-1]) for r in rows)


def test_the_migration_adds_the_index_of_the_search_order(tmp_path: Path) -> None:
    indexes = {
        i["name"]: i
        for i in inspect(migrated(tmp_path).store.engine).get_indexes("saga_checkpoints")
    }
    assert indexes["ix_saga_checkpoints_started_at"]["column_names"] == ["started_at", "saga_id"]


def test_the_first_page_and_a_time_range_read_the_index_without_sorting(tmp_path: Path) -> None:
    client = migrated(tmp_path)
    for q in (SagaQuery(), SagaQuery(started_after=SINCE, started_before=UNTIL)):
        found = plan(client, page_query(q))
        assert "ix_saga_checkpoints_started_at" in found, found
        assert "TEMP B-TREE" not in found, found  # no sort of the matching rows
