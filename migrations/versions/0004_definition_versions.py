"""Definition versions: the version each saga started with, parking, worker heartbeats.

`saga_checkpoints.definition_version` and `definition_structure` (NULL for sagas started
before: they adopt the definition of their first transition), `saga_checkpoints.parked_at`
with a partial index, and
`saga_workers`, one row per live worker with the versions it has (docs/deploys.md).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from saga_worker.store.tables import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("saga_checkpoints", sa.Column("definition_version", sa.String(64)))
    op.add_column("saga_checkpoints", sa.Column("definition_structure", sa.String(16)))
    op.add_column("saga_checkpoints", sa.Column("parked_at", UTCDateTime))
    op.create_index(
        "ix_saga_checkpoints_parked",
        "saga_checkpoints",
        ["saga_type", "definition_version"],
        postgresql_where=sa.text("parked_at IS NOT NULL"),
        sqlite_where=sa.text("parked_at IS NOT NULL"),
    )
    op.create_table(
        "saga_workers",
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("queue", sa.String(255), nullable=False),
        sa.Column("versions", sa.JSON, nullable=False),
        sa.Column("started_at", UTCDateTime, nullable=False),
        sa.Column("seen_at", UTCDateTime, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("saga_workers")
    op.drop_index("ix_saga_checkpoints_parked", table_name="saga_checkpoints")
    with op.batch_alter_table("saga_checkpoints") as batch:
        batch.drop_column("parked_at")
        batch.drop_column("definition_structure")
        batch.drop_column("definition_version")
