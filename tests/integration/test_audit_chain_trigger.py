"""Issue 14, item 7: the database itself refuses an audit row that does not extend its saga's
chain (a restart from 64 zeros, a fork, an out-of-order append), row by row, serialized per
saga, on PostgreSQL; SQLite refuses the same rows (its writers are serialized anyway)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, insert, text
from sqlalchemy.exc import DBAPIError

from saga_worker.audit.chain import GENESIS_HASH, build_rows
from saga_worker.audit.redaction import Redactor
from saga_worker.audit.verify import verify_chain
from saga_worker.core.rejection import rejected_start
from saga_worker.store.connect import create_db_engine
from saga_worker.store.repository import SagaStore
from saga_worker.store.tables import audit_logs
from saga_worker.store.write import CHAIN_SQLSTATE

from .conftest import migrated_database
from .test_write_path import _started

pytestmark = pytest.mark.integration

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
REDACTOR = Redactor(())


def _rows(saga_id: str, prev_hash: str, *reasons: str) -> list[dict[str, Any]]:
    events = tuple(rejected_start(reason) for reason in reasons)
    return build_rows(saga_id, {}, events, NOW, prev_hash, REDACTOR)


def _append(conn: Connection, rows: list[dict[str, Any]]) -> None:
    conn.execute(insert(audit_logs), rows)


def _refused(engine: Engine, rows: list[dict[str, Any]]) -> str:
    with pytest.raises(DBAPIError) as caught, engine.begin() as conn:
        _append(conn, rows)
    if engine.dialect.name == "postgresql":
        assert getattr(caught.value.orig, "sqlstate", None) == CHAIN_SQLSTATE
    message = str(caught.value.orig)
    assert "saga_audit_logs chain" in message, message
    return message


def test_a_chained_multi_row_insert_is_accepted(engine: Engine) -> None:
    store = SagaStore(engine, REDACTOR)
    assert store.create(_started("c-1"), NOW) is not None  # saga_start + step_start, one statement
    first = _rows("c-2", GENESIS_HASH, "a", "b", "c")
    with engine.begin() as conn:
        _append(conn, first)
        _append(conn, _rows("c-2", first[-1]["hash"], "d"))
    for saga_id in ("c-1", "c-2"):
        assert verify_chain(store.audit_trail(saga_id)) == []
    assert len(store.audit_trail("c-2")) == 4


def test_a_row_restarting_forking_or_skipping_the_chain_is_refused(engine: Engine) -> None:
    first = _rows("c-3", GENESIS_HASH, "a", "b")
    with engine.begin() as conn:
        _append(conn, first)
    _refused(engine, _rows("c-3", GENESIS_HASH, "restart"))  # the finding of issue 14
    _refused(engine, _rows("c-3", first[0]["hash"], "fork"))
    _refused(engine, _rows("c-4", "f" * 64, "first row not from genesis"))
    # One bad row in a multi-row statement refuses the whole statement.
    good = _rows("c-3", first[-1]["hash"], "ok")
    _refused(engine, [*good, *_rows("c-3", first[-1]["hash"], "same parent")])
    trail = SagaStore(engine, REDACTOR).audit_trail("c-3")
    assert [r["hash"] for r in trail] == [r["hash"] for r in first]


# -- PostgreSQL: serialized per saga, rows committed before the lock are seen -------------


@pytest.fixture
def pg(pg_admin_url: str, tmp_path: Path) -> Iterator[Engine]:
    db = create_db_engine(migrated_database("postgres", pg_admin_url, tmp_path))
    yield db
    db.dispose()


def _in_thread(engine: Engine, rows: list[dict[str, Any]]) -> tuple[threading.Thread, list[Any]]:
    """Insert `rows` in a thread (its own transaction); the outcome lands in the list."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            with engine.begin() as conn:
                _append(conn, rows)
            outcome.append("committed")
        except DBAPIError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def _waiting_on_a_lock(engine: Engine) -> bool:
    with engine.connect() as conn:
        return bool(
            conn.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
            ).scalar()
        )


def test_a_concurrent_writer_waits_and_then_sees_the_committed_head(pg: Engine) -> None:
    first = _rows("p-1", GENESIS_HASH, "first")
    stale = _rows("p-1", GENESIS_HASH, "stale")  # built on the head before `first`
    fresh = _rows("p-1", first[-1]["hash"], "fresh")  # built on `first`
    with pg.connect() as holder:
        tx = holder.begin()
        _append(holder, first)  # holds the saga's lock until commit
        stale_thread, stale_outcome = _in_thread(pg, stale)
        fresh_thread, fresh_outcome = _in_thread(pg, fresh)
        deadline = time.monotonic() + 10
        while not _waiting_on_a_lock(pg) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        # Both wait (neither saw an empty chain and went ahead).
        assert stale_outcome == [] and fresh_outcome == []
        tx.commit()
    stale_thread.join(10)
    fresh_thread.join(10)
    # READ COMMITTED: the trigger's query, run after the lock is granted, sees `first`.
    assert fresh_outcome == ["committed"]
    (error,) = stale_outcome
    assert getattr(error.orig, "sqlstate", None) == CHAIN_SQLSTATE
    trail = SagaStore(pg, REDACTOR).audit_trail("p-1")
    assert [r["error_message"] for r in trail] == ["first", "fresh"]
    assert verify_chain(trail) == []


def test_ids_follow_the_chain_when_a_writer_drew_its_id_before_waiting(pg: Engine) -> None:
    # A BEFORE trigger that fires before the chain trigger (name order) sleeps after the id
    # default was drawn: the slow row drew the smaller id but is chained after the fast one.
    with pg.begin() as conn:
        conn.execute(
            text(
                "CREATE FUNCTION it_slow() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN PERFORM pg_sleep(1.0); RETURN NEW; END $$"
            )
        )
        conn.execute(
            text(
                "CREATE TRIGGER a_it_slow BEFORE INSERT ON saga_audit_logs FOR EACH ROW "
                "WHEN (NEW.error_message = 'slow') EXECUTE FUNCTION it_slow()"
            )
        )
    fast = _rows("p-2", GENESIS_HASH, "fast")
    slow = _rows("p-2", fast[-1]["hash"], "slow")
    slow_thread, slow_outcome = _in_thread(pg, slow)
    time.sleep(0.4)
    with pg.begin() as conn:
        _append(conn, fast)
    slow_thread.join(10)
    assert slow_outcome == ["committed"]
    trail = SagaStore(pg, REDACTOR).audit_trail("p-2")
    assert [r["error_message"] for r in trail] == ["fast", "slow"]
    assert verify_chain(trail) == []


@pytest.mark.parametrize("isolation", ["REPEATABLE READ", "SERIALIZABLE"])
def test_an_append_outside_read_committed_is_refused(pg: Engine, isolation: str) -> None:
    """Such a transaction reads with the snapshot it took before waiting on the saga's lock,
    so it would miss a row committed meanwhile and fork the chain."""
    with pg.begin() as conn:
        _append(conn, _rows("iso-1", GENESIS_HASH, "first"))
    with pytest.raises(DBAPIError) as caught, pg.connect() as raw:
        conn = raw.execution_options(isolation_level=isolation)
        with conn.begin():
            head = conn.execute(
                text("SELECT hash FROM saga_audit_logs WHERE saga_id = 'iso-1'")
            ).scalar_one()
            _append(conn, _rows("iso-1", str(head), "second"))
    assert getattr(caught.value.orig, "sqlstate", None) == CHAIN_SQLSTATE
    assert "READ COMMITTED" in str(caught.value.orig)
    assert len(SagaStore(pg, REDACTOR).audit_trail("iso-1")) == 1
