"""Business keys: what people search a saga by (an order id, a booking reference).

`saga_checkpoints.business_key` (NULL for sagas of definitions without one, and for sagas
started before), written once at start, with a partial index for exact lookups
(`saga-worker list --key`, the console's search): sagas without a key are not in it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("saga_checkpoints", sa.Column("business_key", sa.String(255)))
    op.create_index(
        "ix_saga_checkpoints_business_key",
        "saga_checkpoints",
        ["business_key"],
        postgresql_where=sa.text("business_key IS NOT NULL"),
        sqlite_where=sa.text("business_key IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_saga_checkpoints_business_key", table_name="saga_checkpoints")
    with op.batch_alter_table("saga_checkpoints") as batch:
        batch.drop_column("business_key")
