"""The example sagas' demo tables (not part of saga_worker's schema): created when a
worker imports the examples, or by `saga-worker db grant ROLE --examples` as the owner."""

from __future__ import annotations

import os
import threading

from sqlalchemy import JSON, Column, Engine, Integer, MetaData, Numeric, String, Table

from ..config import Settings
from ..store.connect import create_db_engine
from ..store.tables import UTCDateTime

metadata = MetaData()
example_backtests = Table(
    "example_backtests",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("saga_id", String(255), nullable=False, unique=True),
    Column("strategy_id", Integer, nullable=False),
    Column("results", JSON),
    Column("created_at", UTCDateTime, nullable=False),
)
#: `order_workflow`'s orders: `reserved` by reserve_funds, `booked` by book_trade,
#: `released` by reserve_funds' compensation.
example_orders = Table(
    "example_orders",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("saga_id", String(255), nullable=False, unique=True),
    Column("amount", Numeric(18, 2, asdecimal=False), nullable=False),
    Column("status", String(20), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

_engine_lock = threading.Lock()
_engine: tuple[int, Engine] | None = None


def db() -> Engine:
    """This process's engine for the demo tables (prefork children each build their own)."""
    global _engine
    pid = os.getpid()
    if _engine is None or _engine[0] != pid:
        with _engine_lock:
            if _engine is None or _engine[0] != pid:
                # Pre-ping: each pool process would otherwise fail one step attempt on a
                # connection left from before a database restart, and a step has 3 attempts.
                engine = create_db_engine(Settings.from_env().database_url, pre_ping=True)
                metadata.create_all(engine, checkfirst=True)
                _engine = (pid, engine)
    return _engine[1]


def create_tables(engine: Engine) -> tuple[str, ...]:
    """Create the demo tables when missing; returns their names.

    Workers create them on first use too, but a run-time role without CREATE cannot: run
    this as the owner (`saga-worker db grant ROLE --examples` does) before such workers start.
    """
    metadata.create_all(engine, checkfirst=True)
    return tuple(metadata.tables)
