"""The two tables of docs/contract.md (plus a small key/value table), as SQLAlchemy Core."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """TIMESTAMP WITH TIME ZONE that always stores and returns aware UTC datetimes.

    SQLite has no time zone type; values are written in UTC and tagged UTC on the way back.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column; pass an aware datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if not isinstance(value, datetime):
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


metadata = MetaData()

# SQLite only autoincrements an INTEGER PRIMARY KEY.
_BigId = BigInteger().with_variant(Integer(), "sqlite")

checkpoints = Table(
    "saga_checkpoints",
    metadata,
    Column("saga_id", String(255), primary_key=True),
    Column("saga_type", String(100), nullable=False),
    Column("state", String(20), nullable=False),
    Column("current_step_index", Integer, nullable=False),
    Column("completed_steps", JSON, nullable=False),
    Column("compensated_steps", JSON, nullable=False),
    Column("context", JSON, nullable=False),
    Column("error", Text),
    Column("started_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("total_steps", Integer, nullable=False),
    Column("retries", Integer, nullable=False),
    Column("user_id", String(255)),
    Column("ip_address", String(45)),
    # Engine columns: optimistic concurrency, the pending attempt and its stall deadline.
    Column("version", Integer, nullable=False),
    Column("pending", JSON),
    Column("deadline", UTCDateTime),
    Column("failed_compensations", JSON, nullable=False),
    Column("abort_requested", Boolean, nullable=False),
    Column("audit_head", String(64), nullable=False),
    # The definition version the saga started with (NULL: before 0004) and, while no live
    # worker has that version, when it was parked (docs/deploys.md).
    Column("definition_version", String(64)),
    Column("definition_structure", String(16)),
    Column("parked_at", UTCDateTime),
    # What the saga waits for (a signal, an approval, a timer) and since when (0005).
    Column("waiting_for", String(120)),
    Column("waiting_since", UTCDateTime),
    # What people search the saga by (core/business_key.py), written at start only
    # (codec.WRITE_ONCE_COLUMNS); 0006.
    Column("business_key", String(255)),
    Index("ix_saga_checkpoints_state", "state"),
    Index("ix_saga_checkpoints_saga_type_state", "saga_type", "state"),
    Index("ix_saga_checkpoints_user_id", "user_id"),
    # The search's order and time range (list_sagas: newest first, since/until); 0007.
    # Neither column changes after the start: checkpoint updates stay HOT.
    Index("ix_saga_checkpoints_started_at", "started_at", "saga_id"),
    # Terminal sagas have no deadline, so the recovery scan's index holds only live ones;
    # saga_id makes the sweep's (deadline, saga_id) paging an index condition (0009).
    Index(
        "ix_saga_checkpoints_deadline_live",
        "deadline",
        "saga_id",
        postgresql_where=text("deadline IS NOT NULL"),
        sqlite_where=text("deadline IS NOT NULL"),
    ),
    # Few rows: the sweep's resume pass and saga_parked_current read only parked sagas.
    Index(
        "ix_saga_checkpoints_parked",
        "saga_type",
        "definition_version",
        postgresql_where=text("parked_at IS NOT NULL"),
        sqlite_where=text("parked_at IS NOT NULL"),
    ),
    # Few rows: saga_waiting_current and the waiting list read only waiting sagas.
    Index(
        "ix_saga_checkpoints_waiting",
        "saga_type",
        "waiting_since",
        postgresql_where=text("waiting_for IS NOT NULL"),
        sqlite_where=text("waiting_for IS NOT NULL"),
    ),
    # Exact lookups by business key; sagas of definitions without one are not in it.
    Index(
        "ix_saga_checkpoints_business_key",
        "business_key",
        postgresql_where=text("business_key IS NOT NULL"),
        sqlite_where=text("business_key IS NOT NULL"),
    ),
    # fillfactor 85 (room on each page for updated row versions, so that updates can be
    # HOT) is set by migration 0009, not here: `postgresql_with` on a Table is SQLAlchemy
    # 2.1's, and 2.0 (which pyproject.toml allows) refuses it when this module is imported.
)

#: One row per live worker (process group), refreshed every few seconds: which definition
#: versions it has, for the sweep (park or resume) and `saga-worker versions`.
workers = Table(
    "saga_workers",
    metadata,
    Column("name", String(255), primary_key=True),
    Column("queue", String(255), nullable=False),
    Column("versions", JSON, nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("seen_at", UTCDateTime, nullable=False),
)

audit_logs = Table(
    "saga_audit_logs",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("saga_id", String(255), nullable=False),
    Column("event_type", String(50), nullable=False),
    Column("step_name", String(100)),
    Column("step_index", Integer),
    Column("event_data", JSON),
    Column("context_snapshot", JSON),
    Column("error_message", Text),
    Column("error_stack_trace", Text),
    Column("timestamp", UTCDateTime, nullable=False),
    Column("duration_ms", Float),
    Column("user_id", String(255)),
    Column("ip_address", String(45)),
    Column("saga_state_before", String(20)),
    Column("saga_state_after", String(20)),
    Column("retry_count", Integer),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    # What the CLI, the console and the chain read, measured (migration 0008): nothing more,
    # since every index entry is WAL written for every row.
    # The chain's head (latest row of a saga) and a saga's trail in order.
    Index("ix_saga_audit_logs_saga_id_id", "saga_id", "id"),
    # Events of one kind in a time range (the console's overview).
    Index("ix_saga_audit_logs_event_type_timestamp", "event_type", "timestamp"),
    # What one person did; rows without a user are not in it.
    Index(
        "ix_saga_audit_logs_user_id_timestamp_partial",
        "user_id",
        "timestamp",
        postgresql_where=text("user_id IS NOT NULL"),
        sqlite_where=text("user_id IS NOT NULL"),
    ),
    # Time-range scans (exports): rows arrive in time order in an append-only table, so a
    # BRIN summary of block ranges does what a B-tree of every row did (SQLite: a B-tree).
    Index("ix_saga_audit_logs_timestamp_brin", "timestamp", postgresql_using="brin"),
)

#: Digests of every saga's chain head (`saga-worker audit anchor`), chained, append-only.
anchors_table = Table(
    "saga_audit_anchors",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("sagas", Integer, nullable=False),
    Column("rows", BigInteger, nullable=False),
    Column("root", String(64), nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)

settings_table = Table(
    "saga_settings",
    metadata,
    Column("key", String(100), primary_key=True),
    Column("value", Text, nullable=False),
)
