"""Waits: what a saga waits for (a signal, an approval, a timer) and since when.

`saga_checkpoints.waiting_for` ("signal:<name>", "approval:<wait>", "sleep:<wait>"; NULL when
the saga waits for none) and `waiting_since`, with a partial index for
`saga_waiting_current` and `saga-worker list --waiting` (docs/workflows.md). Inbox, votes
and the attempts of a group live in the `pending` JSON column: no column for them.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from saga_worker.store.tables import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("saga_checkpoints", sa.Column("waiting_for", sa.String(120)))
    op.add_column("saga_checkpoints", sa.Column("waiting_since", UTCDateTime))
    op.create_index(
        "ix_saga_checkpoints_waiting",
        "saga_checkpoints",
        ["saga_type", "waiting_since"],
        postgresql_where=sa.text("waiting_for IS NOT NULL"),
        sqlite_where=sa.text("waiting_for IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_saga_checkpoints_waiting", table_name="saga_checkpoints")
    with op.batch_alter_table("saga_checkpoints") as batch:
        batch.drop_column("waiting_since")
        batch.drop_column("waiting_for")
