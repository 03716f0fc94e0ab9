"""Database engines for this workload, and retrying the errors a restart or failover causes."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.pool import NullPool

log = logging.getLogger(__name__)
T = TypeVar("T")


def create_db_engine(url: str, *, pool: bool = True, pre_ping: bool = False) -> Engine:
    """An engine tuned for this workload: WAL + immediate transactions on SQLite.

    `pre_ping` tests each pooled connection before use, for callers that do not retry a
    connection the server closed (a step's own writes after a database restart).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            from pathlib import Path

            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"timeout": 30, "check_same_thread": False},
            poolclass=NullPool,
            hide_parameters=True,
            json_serializer=compact_json,
        )
        _sqlite_immediate_transactions(engine)
        return engine
    # Errors quote SQL parameters, which hold saga contexts: keep them out of messages.
    # No pool_pre_ping: it costs a round trip per checkout, and a connection found dead by
    # the real statement raises OperationalError, which retry_transient retries anyway.
    kwargs: dict[str, Any] = {
        "hide_parameters": True,
        "pool_pre_ping": pre_ping,
        "json_serializer": compact_json,
    }
    if not pool:
        kwargs["poolclass"] = NullPool
    else:
        kwargs.update(pool_size=5, max_overflow=5, pool_recycle=1800)
    return create_engine(url, **kwargs)


def compact_json(value: Any) -> str:
    """JSON without whitespace: JSON columns store the text as sent, whitespace included."""
    return json.dumps(value, separators=(",", ":"))


def _sqlite_immediate_transactions(engine: Engine) -> None:
    # pysqlite's implicit BEGIN is deferred: a read that later writes then fails with
    # "database is locked" instead of waiting. BEGIN IMMEDIATE takes the write lock up front.
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def is_transient(exc: BaseException) -> bool:
    """A database error worth retrying: connection lost, server restarting, lock timeout."""
    if isinstance(exc, OperationalError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def retry_transient(
    operation: Callable[[], T], *, max_wait_seconds: float = 60.0, what: str = "database call"
) -> T:
    """Run `operation`, retrying transient database errors with capped exponential backoff."""
    delay = 0.1
    waited = 0.0
    while True:
        try:
            return operation()
        except (OperationalError, DBAPIError) as exc:
            if not is_transient(exc) or waited >= max_wait_seconds:
                raise
            log.warning("%s failed (%s); retrying in %.1fs", what, type(exc.orig).__name__, delay)
            time.sleep(delay)
            waited += delay
            delay = min(delay * 2, 5.0)
