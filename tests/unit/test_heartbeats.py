"""Worker heartbeat rows (`saga_workers`): one per worker, live by one clock, pruned.

On the embedded SQLite database, with rows written as workers write them; what PostgreSQL
does differently (its own clock) is checked on the SQL it is sent.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, select

from saga_worker.client import SagaClient
from saga_worker.config import Settings
from saga_worker.store import workers
from saga_worker.store.migrate import upgrade
from saga_worker.store.port import LIVE_WINDOW
from saga_worker.store.tables import workers as workers_table
from saga_worker.worker.heartbeat import Heartbeat


@pytest.fixture
def client(tmp_path: Path) -> SagaClient:
    client = SagaClient(Settings.from_env({"SAGA_HOME": str(tmp_path)}))
    upgrade(client.store.engine)
    return client


def keys(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.execute(select(workers_table.c.name)).scalars())


def test_two_workers_with_one_node_name_both_count_as_live(client: SagaClient) -> None:
    """Review 15: rows were keyed by the Celery node name alone, so two workers sharing
    `celery@HOST` (a rolling deploy on one host) overwrote each other's row, and the old
    one's warm shutdown deleted the row the new one keeps."""
    engine = client.store.engine
    now = datetime.now(UTC)
    name = "celery@host-1"
    workers.beat(engine, name, "aaaa0001", "saga", {("order", "1")}, now)  # generation 1
    workers.beat(engine, name, "bbbb0002", "saga", {("order", "2")}, now)  # generation 2
    live = workers.live_versions(engine, LIVE_WINDOW, now)
    assert live == {("order", "1"), ("order", "2")}, f"live versions: {live}"
    rows = workers.live_workers(engine, LIVE_WINDOW, now)
    assert [(w.node, w.instance) for w in rows] == [(name, "aaaa0001"), (name, "bbbb0002")]

    # `saga-worker versions` names the node, with the instance where the node is shared.
    report = client.versions()
    serving = {x.version: x.workers for x in report.lines}
    assert serving == {"1": ("celery@host-1#aaaa0001",), "2": ("celery@host-1#bbbb0002",)}
    assert [(w["node"], w["instance"]) for w in report.workers] == [
        (name, "aaaa0001"),
        (name, "bbbb0002"),
    ]

    workers.forget(engine, name, "aaaa0001")  # generation 1's warm shutdown
    live = workers.live_versions(engine, LIVE_WINDOW, now)
    assert live == {("order", "2")}, "generation 2 is running, but its row was deleted"
    report = client.versions()
    assert {x.version: x.workers for x in report.lines} == {"2": ("celery@host-1",)}


def test_heartbeats_of_one_node_name_keep_a_row_each_and_delete_only_their_own(
    client: SagaClient,
) -> None:
    settings = client.settings
    old = Heartbeat(settings, "celery@host-1", {("order", "1")})
    new = Heartbeat(settings, "celery@host-1", {("order", "2")})
    assert old.instance != new.instance
    old.start()
    new.start()
    try:
        engine = client.store.engine
        now = datetime.now(UTC)
        assert workers.live_versions(engine, LIVE_WINDOW, now) == {("order", "1"), ("order", "2")}
        old.stop()
        assert keys(engine) == [f"celery@host-1#{new.instance}"]
    finally:
        new.stop()
    assert keys(client.store.engine) == []


def test_a_starting_worker_deletes_rows_not_refreshed_for_a_day(client: SagaClient) -> None:
    engine = client.store.engine
    now = datetime.now(UTC)
    workers.beat(engine, "killed@a", "1", "saga", {("t", "1")}, now - timedelta(days=2))
    workers.beat(engine, "killed@b", "2", "saga", {("t", "1")}, now - timedelta(hours=2))
    beat = Heartbeat(client.settings, "w@c", {("t", "1")})
    beat.start()
    try:
        # The two-hour-old row is not live, but kept: it may tell an operator something.
        assert keys(engine) == ["killed@b#2", f"w@c#{beat.instance}"]
    finally:
        beat.stop()


def test_a_row_from_before_instance_ids_reads_as_its_node_name() -> None:
    assert workers.split_key("celery@host") == ("celery@host", "")
    assert workers.split_key("a#b@host#00ff") == ("a#b@host", "00ff")
    assert workers.split_key(workers.row_key("celery@h", "1a2b")) == ("celery@h", "1a2b")


def test_on_sqlite_liveness_is_judged_by_the_callers_clock(client: SagaClient) -> None:
    """SQLite is one host: the clock the worker writes with is the sweep's."""
    engine = client.store.engine
    now = datetime.now(UTC)
    workers.beat(engine, "w@a", "1", "saga", {("order", "1")}, now - timedelta(seconds=19))
    workers.beat(engine, "w@b", "2", "saga", {("order", "2")}, now - timedelta(seconds=21))
    assert workers.live_versions(engine, LIVE_WINDOW, now) == {("order", "1")}


def test_on_postgresql_the_databases_clock_stamps_and_judges_heartbeats() -> None:
    """Review 15: seen_at was the worker host's clock, compared with the sweeping host's
    clock minus 20 s, so a worker whose clock lagged 30 s never counted as live (its sagas
    parked and resumed over and over) and one 30 s ahead kept counting 50 s after it was
    killed. On PostgreSQL both sides are the database's now(): the hosts' clocks do not enter.
    """
    pg = create_engine("postgresql+psycopg://u:p@db.invalid/saga")  # never connects
    sweeper_now = datetime.now(UTC)
    lagging_worker_now = sweeper_now - timedelta(seconds=30)
    stamp = workers.database_clock(pg, lagging_worker_now)
    assert not isinstance(stamp, datetime) and str(stamp.compile(dialect=pg.dialect)) == "now()"
    compiled = workers.live_query(pg, LIVE_WINDOW, sweeper_now).compile(dialect=pg.dialect)
    assert "saga_workers.seen_at >= now() - " in str(compiled)
    assert sweeper_now not in compiled.params.values()
    assert LIVE_WINDOW in compiled.params.values()
    # SQLite: the caller's clock.
    lite = create_engine("sqlite://")
    assert workers.database_clock(lite, lagging_worker_now) == lagging_worker_now
