"""saga_audit_anchors: append-only digests of every saga's chain head (`audit anchor`).

Each row holds a Merkle root over the sorted (saga_id, row count, head hash) of all sagas,
with the counts, chained to the previous anchor by `prev_hash`/`hash`. The same defences as
the audit table: UPDATE, DELETE and TRUNCATE refused by triggers for every role, and a row
whose prev_hash is not the latest anchor's hash refused (serialized by an advisory lock).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from saga_worker.store.tables import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

GENESIS = "0" * 64
#: Advisory lock key of the anchor chain ("anch" in ASCII), one chain for the whole table.
LOCK_KEY = 0x616E6368

_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "saga_audit_anchors",
        sa.Column("id", _BigId, primary_key=True, autoincrement=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("sagas", sa.Integer, nullable=False),
        sa.Column("rows", sa.BigInteger, nullable=False),
        sa.Column("root", sa.String(64), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    dialect = op.get_context().dialect.name
    if dialect == "postgresql":
        op.execute(
            """
            CREATE FUNCTION saga_audit_anchors_refuse_change() RETURNS trigger AS $$
            BEGIN
                RAISE EXCEPTION 'saga_audit_anchors is append-only: % refused', TG_OP
                    USING ERRCODE = 'insufficient_privilege';
            END
            $$ LANGUAGE plpgsql
            """
        )
        op.execute(
            "CREATE TRIGGER saga_audit_anchors_no_update_delete BEFORE UPDATE OR DELETE ON "
            "saga_audit_anchors FOR EACH ROW EXECUTE FUNCTION saga_audit_anchors_refuse_change()"
        )
        op.execute(
            "CREATE TRIGGER saga_audit_anchors_no_truncate BEFORE TRUNCATE ON saga_audit_anchors "
            "FOR EACH STATEMENT EXECUTE FUNCTION saga_audit_anchors_refuse_change()"
        )
        op.execute(
            f"""
            CREATE FUNCTION saga_audit_anchors_check_chain() RETURNS trigger AS $$
            DECLARE
                head text;
            BEGIN
                IF current_setting('transaction_isolation') <> 'read committed' THEN
                    -- Its snapshot predates the lock below: it would miss a row committed
                    -- meanwhile.
                    RAISE EXCEPTION 'saga_audit_anchors chain: anchors are appended in '
                        'READ COMMITTED transactions only, not %',
                        upper(current_setting('transaction_isolation')) USING ERRCODE = '23SW1';
                END IF;
                PERFORM pg_advisory_xact_lock({LOCK_KEY});
                SELECT a.hash INTO head FROM saga_audit_anchors a ORDER BY a.id DESC LIMIT 1;
                IF NEW.prev_hash IS DISTINCT FROM coalesce(head, '{GENESIS}') THEN
                    RAISE EXCEPTION 'saga_audit_anchors chain: prev_hash is not the hash of the '
                        'latest anchor (expected %, got %)', coalesce(head, '{GENESIS}'),
                        NEW.prev_hash USING ERRCODE = '23SW1';
                END IF;
                NEW.id := nextval(
                    pg_get_serial_sequence(TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'id'));
                RETURN NEW;
            END
            $$ LANGUAGE plpgsql SET search_path FROM CURRENT
            """
        )
        op.execute(
            "CREATE TRIGGER saga_audit_anchors_check_chain BEFORE INSERT ON saga_audit_anchors "
            "FOR EACH ROW EXECUTE FUNCTION saga_audit_anchors_check_chain()"
        )
    elif dialect == "sqlite":
        for op_name in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER saga_audit_anchors_no_{op_name.lower()} BEFORE {op_name} "
                "ON saga_audit_anchors BEGIN "
                f"SELECT RAISE(ABORT, 'saga_audit_anchors is append-only: {op_name} refused'); END"
            )
        op.execute(
            "CREATE TRIGGER saga_audit_anchors_check_chain BEFORE INSERT ON saga_audit_anchors "
            "WHEN NEW.prev_hash IS NOT coalesce((SELECT hash FROM saga_audit_anchors "
            f"ORDER BY id DESC LIMIT 1), '{GENESIS}') BEGIN SELECT RAISE(ABORT, "
            "'saga_audit_anchors chain: prev_hash is not the hash of the latest anchor'); END"
        )


def downgrade() -> None:
    raise RuntimeError("the audit anchors have no downgrade path: they are append-only by design")
