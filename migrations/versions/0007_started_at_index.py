"""The search's order: an index on saga_checkpoints (started_at, saga_id).

`list_sagas` (the console's search, `saga-worker list`) returns sagas newest first, by
(started_at, saga_id) descending, and filters on a started_at range (since/until). Without
an index on them, each search page of 1,000,000 checkpoints sorted the whole table or the
whole filter's rows for the first 25 (170 ms at p95 for a one-hour range, 160 ms for the
biggest type and state; docs/benchmark.md, "Console at 1M sagas / 10M audit rows"); with it,
a page is a backward index scan that stops after 25 rows (under 1 ms).

Neither column changes after a saga's start, so the index does not stop checkpoint updates
from being HOT; it costs one more index entry per saga started.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_saga_checkpoints_started_at", "saga_checkpoints", ["started_at", "saga_id"])


def downgrade() -> None:
    op.drop_index("ix_saga_checkpoints_started_at", table_name="saga_checkpoints")
