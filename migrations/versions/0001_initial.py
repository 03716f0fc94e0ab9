"""Checkpoint and audit tables, their indexes, and the append-only triggers.

Running the worker with a least-privilege role (PostgreSQL): the migration job owns the
tables; `saga-worker db grant ROLE` (saga_worker/store/grants.py) lets a run-time role read
and write checkpoints but only SELECT/INSERT audit rows.

The triggers below refuse UPDATE, DELETE and TRUNCATE of saga_audit_logs for every role,
including the owner; only a superuser disabling them can tamper, which the hash chain shows.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from saga_worker.store.tables import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "saga_checkpoints",
        sa.Column("saga_id", sa.String(255), primary_key=True),
        sa.Column("saga_type", sa.String(100), nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("current_step_index", sa.Integer, nullable=False),
        sa.Column("completed_steps", sa.JSON, nullable=False),
        sa.Column("compensated_steps", sa.JSON, nullable=False),
        sa.Column("context", sa.JSON, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("started_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("total_steps", sa.Integer, nullable=False),
        sa.Column("retries", sa.Integer, nullable=False),
        sa.Column("user_id", sa.String(255)),
        sa.Column("ip_address", sa.String(45)),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("pending", sa.JSON),
        sa.Column("deadline", UTCDateTime),
        sa.Column("failed_compensations", sa.JSON, nullable=False),
        sa.Column("abort_requested", sa.Boolean, nullable=False),
        sa.Column("audit_head", sa.String(64), nullable=False),
    )
    op.create_index("ix_saga_checkpoints_state", "saga_checkpoints", ["state"])
    op.create_index("ix_saga_checkpoints_updated_at", "saga_checkpoints", ["updated_at"])
    op.create_index(
        "ix_saga_checkpoints_saga_type_state", "saga_checkpoints", ["saga_type", "state"]
    )
    op.create_index("ix_saga_checkpoints_user_id", "saga_checkpoints", ["user_id"])
    op.create_index(
        "ix_saga_checkpoints_deadline_live",
        "saga_checkpoints",
        ["deadline"],
        postgresql_where=sa.text("deadline IS NOT NULL"),
        sqlite_where=sa.text("deadline IS NOT NULL"),
    )

    op.create_table(
        "saga_audit_logs",
        sa.Column("id", _BigId, primary_key=True, autoincrement=True),
        sa.Column("saga_id", sa.String(255), nullable=False),
        sa.Column("event_type", sa.String(50), nullable=False),
        sa.Column("step_name", sa.String(100)),
        sa.Column("step_index", sa.Integer),
        sa.Column("event_data", sa.JSON),
        sa.Column("context_snapshot", sa.JSON),
        sa.Column("error_message", sa.Text),
        sa.Column("error_stack_trace", sa.Text),
        sa.Column("timestamp", UTCDateTime, nullable=False),
        sa.Column("duration_ms", sa.Float),
        sa.Column("user_id", sa.String(255)),
        sa.Column("ip_address", sa.String(45)),
        sa.Column("saga_state_before", sa.String(20)),
        sa.Column("saga_state_after", sa.String(20)),
        sa.Column("retry_count", sa.Integer),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    for name, columns in (
        ("ix_saga_audit_logs_saga_id", ["saga_id"]),
        ("ix_saga_audit_logs_event_type", ["event_type"]),
        ("ix_saga_audit_logs_step_name", ["step_name"]),
        ("ix_saga_audit_logs_timestamp", ["timestamp"]),
        ("ix_saga_audit_logs_user_id", ["user_id"]),
        ("ix_saga_audit_logs_saga_id_timestamp", ["saga_id", "timestamp"]),
        ("ix_saga_audit_logs_event_type_timestamp", ["event_type", "timestamp"]),
        ("ix_saga_audit_logs_user_id_timestamp", ["user_id", "timestamp"]),
    ):
        op.create_index(name, "saga_audit_logs", columns)

    op.create_table(
        "saga_settings",
        sa.Column("key", sa.String(100), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )

    # The context's dialect, not get_bind()'s: offline (`db upgrade --sql`) there is no bind.
    dialect = op.get_context().dialect.name
    if dialect == "postgresql":
        op.execute(
            """
            CREATE FUNCTION saga_audit_logs_refuse_change() RETURNS trigger AS $$
            BEGIN
                RAISE EXCEPTION 'saga_audit_logs is append-only: % refused', TG_OP
                    USING ERRCODE = 'insufficient_privilege';
            END
            $$ LANGUAGE plpgsql
            """
        )
        op.execute(
            "CREATE TRIGGER saga_audit_logs_no_update_delete BEFORE UPDATE OR DELETE "
            "ON saga_audit_logs FOR EACH ROW EXECUTE FUNCTION saga_audit_logs_refuse_change()"
        )
        op.execute(
            "CREATE TRIGGER saga_audit_logs_no_truncate BEFORE TRUNCATE "
            "ON saga_audit_logs FOR EACH STATEMENT EXECUTE FUNCTION saga_audit_logs_refuse_change()"
        )
    elif dialect == "sqlite":
        for op_name in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER saga_audit_logs_no_{op_name.lower()} BEFORE {op_name} "
                "ON saga_audit_logs BEGIN "
                f"SELECT RAISE(ABORT, 'saga_audit_logs is append-only: {op_name} refused'); END"
            )


def downgrade() -> None:
    raise RuntimeError("the audit trail has no downgrade path: it is append-only by design")
