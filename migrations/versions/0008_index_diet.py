"""Index diet: each index is there because a query reads it (DESIGN section 4).

Every audit row paid for nine secondary indexes and every checkpoint write for eight; an
index entry costs about 130 bytes of WAL, so indexes were most of what a saga wrote
(`bash bench/run.sh wal`). Kept, with their readers:

- saga_audit_logs (saga_id, id): a saga's trail in order, its chain head (the write path,
  the chain trigger, `audit show`, the console's timeline, anchors);
- (event_type, timestamp): events of one kind in a time range (the console's overview);
- (user_id, timestamp), partial on user_id IS NOT NULL: what one person did; rows of
  sagas started without a user are not in it;
- timestamp as BRIN: time-range scans (`audit export --since/--until`). The table is
  append-only and rows arrive in time order, so a block range summary of a few kilobytes
  replaces a B-tree of the whole table. SQLite gets a B-tree.

Dropped, each covered by a kept index's leading column or read by nothing: the audit
indexes on saga_id, (saga_id, timestamp), event_type, step_name, user_id and timestamp
(B-tree), and the checkpoint index on updated_at, a column every transition changes.

On a big table the two CREATE INDEX statements read the audit table once each and hold
its writes meanwhile (a SHARE lock; reads go on): run the upgrade in a quiet window. They
come first, under new names: a plain DROP INDEX locks the table against reads too (ACCESS
EXCLUSIVE) until the upgrade's transaction ends, so the drops come last and are brief.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

AUDIT = "saga_audit_logs"
BRIN = "ix_saga_audit_logs_timestamp_brin"
BY_USER = "ix_saga_audit_logs_user_id_timestamp_partial"
#: The audit indexes dropped, by name, with their columns (a downgrade builds them again).
DROPPED_AUDIT = {
    "ix_saga_audit_logs_saga_id": ["saga_id"],
    "ix_saga_audit_logs_saga_id_timestamp": ["saga_id", "timestamp"],
    "ix_saga_audit_logs_event_type": ["event_type"],
    "ix_saga_audit_logs_step_name": ["step_name"],
    "ix_saga_audit_logs_user_id": ["user_id"],
    "ix_saga_audit_logs_timestamp": ["timestamp"],
    "ix_saga_audit_logs_user_id_timestamp": ["user_id", "timestamp"],
}


def upgrade() -> None:
    op.create_index(BRIN, AUDIT, ["timestamp"], postgresql_using="brin")
    op.create_index(
        BY_USER,
        AUDIT,
        ["user_id", "timestamp"],
        postgresql_where=sa.text("user_id IS NOT NULL"),
        sqlite_where=sa.text("user_id IS NOT NULL"),
    )
    for name in DROPPED_AUDIT:
        op.drop_index(name, table_name=AUDIT)
    op.drop_index("ix_saga_checkpoints_updated_at", table_name="saga_checkpoints")


def downgrade() -> None:
    op.create_index("ix_saga_checkpoints_updated_at", "saga_checkpoints", ["updated_at"])
    for name, columns in DROPPED_AUDIT.items():
        op.create_index(name, AUDIT, columns)
    op.drop_index(BY_USER, table_name=AUDIT)
    op.drop_index(BRIN, table_name=AUDIT)
