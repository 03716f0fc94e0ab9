"""Living beside another Celery application: its own queue, its own Alembic table, saga ids.

Real Celery worker and beat processes, real Redis and PostgreSQL.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from sqlalchemy import func, inspect, select, text

from saga_worker.audit.redaction import Redactor
from saga_worker.store.connect import create_db_engine
from saga_worker.store.migrate import upgrade
from saga_worker.store.repository import SagaStore
from saga_worker.store.tables import checkpoints
from tests.waiting import wait_for, wait_for_log

from .conftest import (
    empty_postgres_database,
    fresh_postgres_database,
    make_0_1_database,
    migrated_database,
    start_worker,
)
from .processes import start_beat

OTHER_APP_REVISION = "ae1027a6acf"


def test_upgrade_leaves_another_applications_alembic_history_untouched(
    pg_admin_url: str,
) -> None:
    url = empty_postgres_database(pg_admin_url)
    engine = create_db_engine(url, pool=False)
    try:
        with engine.begin() as conn:
            # What the application's own `alembic upgrade` left behind.
            conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)"))
            conn.execute(text(f"INSERT INTO alembic_version VALUES ('{OTHER_APP_REVISION}')"))
            conn.execute(text("CREATE TABLE orders (id serial PRIMARY KEY)"))
        upgrade(engine)
        upgrade(engine)  # idempotent
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).all() == [
                (OTHER_APP_REVISION,)
            ]
            ours = conn.execute(text("SELECT version_num FROM saga_alembic_version")).all()
        assert len(ours) == 1
        tables = set(inspect(engine).get_table_names())
        assert {"saga_checkpoints", "saga_audit_logs", "orders", "alembic_version"} <= tables
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_a_database_of_saga_worker_0_1_moves_its_revision_to_its_own_table(
    backend: str, pg_admin_url: str, tmp_path: Path
) -> None:
    url = migrated_database(backend, pg_admin_url, tmp_path)
    engine = create_db_engine(url, pool=False)
    try:
        head = make_0_1_database(url)  # 0.1 kept its revision in Alembic's default table
        upgrade(engine)
        with engine.connect() as conn:
            assert (
                conn.execute(text("SELECT version_num FROM saga_alembic_version")).scalar_one()
                == head
            )
        assert "alembic_version" not in inspect(engine).get_table_names()
    finally:
        engine.dispose()


@pytest.fixture()
def own_redis_db(broker_url: str) -> Iterator[str]:
    """A Redis database of its own, so Celery's default queue `celery` is observable."""
    base, _, _ = broker_url.rpartition("/")
    url = f"{base}/7"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


def test_all_saga_traffic_stays_on_the_saga_queue_and_start_ids_are_task_ids(
    pg_admin_url: str, own_redis_db: str, tmp_path: Path
) -> None:
    """Default SAGA_QUEUE: start, steps, abort and recover never touch the `celery` list.

    The producer is the README's: it routes `saga.*` with task_routes and names no queue.
    """
    database_url = fresh_postgres_database(pg_admin_url)
    env = {
        "SAGA_DATABASE_URL": database_url,
        "SAGA_BROKER_URL": own_redis_db,
        "SAGA_IMPORTS": "saga_worker.examples",
        "SAGA_HOME": str(tmp_path),
        "SAGA_RECOVERY_INTERVAL_SECONDS": "1",
        "SAGA_SIGNING_KEY": "k" * 40,
    }
    # No -Q: the worker consumes what the app declares, which must be `saga` alone.
    worker = start_worker("saga_worker.app", env, "saga", tmp_path / "worker.log")
    beat = start_beat(env, tmp_path, "beat")
    producer = Celery("producer", broker=own_redis_db, set_as_current=False)
    producer.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_routes={"saga.*": {"queue": "saga"}},
    )
    store = SagaStore(create_db_engine(database_url), Redactor([]))
    client = redis.Redis.from_url(own_redis_db)
    try:
        done = producer.send_task(
            "saga.start", kwargs={"saga_type": "backtest_workflow", "context": {"strategy_id": 1}}
        )
        slow = producer.send_task(
            "saga.start",
            kwargs={
                "saga_type": "backtest_workflow",
                "context": {"strategy_id": 2, "slow_step": {"step": "run_strategy", "seconds": 2}},
            },
        )
        _wait_state(store, slow.id, "RUNNING")
        producer.send_task("saga.abort", kwargs={"saga_id": slow.id, "reason": "test"})
        assert _wait_terminal(store, done.id) == "COMPLETED"
        assert _wait_terminal(store, slow.id) == "ABORTED"
        # The beat's saga.recover ran on `saga` too: the worker logged receiving it.
        wait_for_log(worker.log_path, "saga.recover[")
        # Nothing was ever left on Celery's default queue (no one here consumes it).
        assert client.llen("celery") == 0
        assert not client.exists("celery")
        assert client.exists("_kombu.binding.saga")
        assert not client.exists("_kombu.binding.celery")
    finally:
        beat.stop()
        worker.stop()
        producer.close()
        client.close()
        store.engine.dispose()


def test_a_start_redelivered_after_its_commit_starts_one_saga_under_its_task_id(
    pg_admin_url: str, broker_url: str, tmp_path: Path
) -> None:
    """The pool child dies after saga.start committed and before the ack: one saga only."""
    database_url = fresh_postgres_database(pg_admin_url)
    queue = f"co-{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "killed"
    env = {
        "SAGA_DATABASE_URL": database_url,
        "SAGA_BROKER_URL": broker_url,
        "SAGA_QUEUE": queue,
        "SAGA_IMPORTS": "saga_worker.examples,tests.fixtures.kill_after_start",
        "SAGA_HOME": str(tmp_path),
        "SAGA_SIGNING_KEY": "k" * 40,
        "IT_KILL_MARKER": str(marker),
    }
    worker = start_worker("saga_worker.app", env, queue, tmp_path / "worker.log")
    producer = Celery("producer", broker=broker_url, set_as_current=False)
    producer.conf.update(task_serializer="json", accept_content=["json"])
    store = SagaStore(create_db_engine(database_url), Redactor([]))
    strategy_id = int(uuid.uuid4().int % 1_000_000)
    try:
        result = producer.send_task(
            "saga.start",
            kwargs={"saga_type": "backtest_workflow", "context": {"strategy_id": strategy_id}},
            queue=queue,
        )
        assert _wait_terminal(store, result.id) == "COMPLETED"
        assert marker.exists(), "the pool child was never killed: the test proved nothing"
        # The redelivered message ran again and was recognised as the same saga.
        wait_for_log(worker.log_path, f"saga {result.id} already exists: duplicate start ignored")
        with store.engine.connect() as conn:
            count = conn.execute(select(func.count()).select_from(checkpoints)).scalar_one()
        assert count == 1
        kinds = [row["event_type"] for row in store.audit_trail(result.id)]
        assert kinds.count("saga_start") == 1
    finally:
        worker.stop()
        producer.close()
        store.engine.dispose()


def _wait_state(store: SagaStore, saga_id: str, state: str, timeout: float = 30) -> None:
    wait_for(
        lambda: (saga := store.load(saga_id)) is not None and saga.state.value == state,
        timeout,
        f"{saga_id} to reach {state}",
        details=lambda: store.load(saga_id),
    )


def _wait_terminal(store: SagaStore, saga_id: str, timeout: float = 60) -> str:
    saga = wait_for(
        lambda: saga if (saga := store.load(saga_id)) and saga.state.is_terminal else None,
        timeout,
        f"{saga_id} to be terminal",
        details=lambda: store.load(saga_id),
    )
    return saga.state.value
