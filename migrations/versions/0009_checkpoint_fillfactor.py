"""Checkpoint pages keep room for updates: fillfactor 85 on saga_checkpoints.

A saga's checkpoint is updated once per transition. An update is HOT (no index touched,
nothing for VACUUM to clean in the indexes) only if no indexed column changed and the new
row version fits on the row's own page. Inserts now fill a page to 85%, leaving room for
a few updated versions until pruning reclaims the old ones. Together with the rounded
`deadline` (store/codec.py, `scan_deadline`) and migration 0008 (no index on updated_at),
most checkpoint updates are HOT (`bash bench/run.sh wal` counts them).

Only pages written from now on are filled to 85%; existing ones keep their rows.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

FILLFACTOR = 85


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE saga_checkpoints SET (fillfactor = {FILLFACTOR})")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE saga_checkpoints RESET (fillfactor)")
