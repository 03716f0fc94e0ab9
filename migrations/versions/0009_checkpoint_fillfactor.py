"""Checkpoint pages keep room for updates: fillfactor 85 on saga_checkpoints.

A saga's checkpoint is updated once per transition. An update is HOT (no index touched,
nothing for VACUUM to clean in the indexes) only if no indexed column changed and the new
row version fits on the row's own page. Inserts now fill a page to 85%, leaving room for
a few updated versions until pruning reclaims the old ones. Together with the rounded
`deadline` (store/codec.py, `scan_deadline`) and migration 0008 (no index on updated_at),
most checkpoint updates are HOT (`bash bench/run.sh wal` counts them).

Only pages written from now on are filled to 85%; existing ones keep their rows.

The recovery scan's partial index gains saga_id: rounded deadlines are shared by many sagas
(every saga whose step was sent in the same 30 s has the same one), and the sweep pages by
(deadline, saga_id). With deadline alone, each page of a mass stall re-read every saga of
its deadline to find the ones after the previous page; with both, the page's row
comparison is an index condition. The index holds live sagas only: rebuilt in a moment.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

FILLFACTOR = 85


SCAN_INDEX = "ix_saga_checkpoints_deadline_live"
LIVE = sa.text("deadline IS NOT NULL")


def _scan_index(columns: list[str]) -> None:
    op.drop_index(SCAN_INDEX, table_name="saga_checkpoints")
    op.create_index(
        SCAN_INDEX, "saga_checkpoints", columns, postgresql_where=LIVE, sqlite_where=LIVE
    )


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE saga_checkpoints SET (fillfactor = {FILLFACTOR})")
    _scan_index(["deadline", "saga_id"])


def downgrade() -> None:
    _scan_index(["deadline"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE saga_checkpoints RESET (fillfactor)")
