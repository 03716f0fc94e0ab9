"""The database refuses an audit row that does not extend its saga's chain.

A BEFORE INSERT trigger on saga_audit_logs checks, row by row in insertion order, that
`prev_hash` is the `hash` of the saga's latest row (64 zeros for its first), and raises
SQLSTATE 23SW1 otherwise (store/write.py maps it to "the head moved").

PostgreSQL: the trigger first takes a transaction-level advisory lock on the saga_id, so two
writers of one saga are serialized: the second waits until the first commits or rolls back,
and its check, a new statement under READ COMMITTED, then sees the first one's rows. It also
draws the row's id again under that lock, so ids follow the chain even when a writer drew its
default id before waiting. The function belongs to the migration's role (the table owner);
the run-time role cannot drop or disable it (not an owner).

SQLite: a trigger refuses the same rows; its writers are serialized by the database lock.

Also an index on (saga_id, id), which the trigger and every chain read use.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

GENESIS = "0" * 64
#: First key of the two-key advisory lock (an arbitrary constant: "saga" in ASCII); the
#: second is hashtext(saga_id). Two sagas colliding on it only wait for each other.
LOCK_SPACE = 0x73616761

PG_FUNCTION = f"""
CREATE FUNCTION saga_audit_logs_check_chain() RETURNS trigger AS $$
DECLARE
    head text;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        -- Its snapshot predates the lock below: a row committed meanwhile would be missed.
        RAISE EXCEPTION 'saga_audit_logs chain: audit rows are appended in READ COMMITTED '
            'transactions only, not %', upper(current_setting('transaction_isolation'))
            USING ERRCODE = '23SW1';
    END IF;
    PERFORM pg_advisory_xact_lock({LOCK_SPACE}, hashtext(NEW.saga_id));
    -- A new statement, so a new snapshot: it sees what the previous holder committed, and the
    -- rows this statement inserted before this one.
    SELECT a.hash INTO head FROM saga_audit_logs a
        WHERE a.saga_id = NEW.saga_id ORDER BY a.id DESC LIMIT 1;
    IF NEW.prev_hash IS DISTINCT FROM coalesce(head, '{GENESIS}') THEN
        RAISE EXCEPTION 'saga_audit_logs chain: the row''s prev_hash is not the hash of the '
            'latest row of saga % (expected %, got %)',
            NEW.saga_id, coalesce(head, '{GENESIS}'), NEW.prev_hash
            USING ERRCODE = '23SW1',
                  HINT = 'read the saga''s latest audit row and chain the new rows from it';
    END IF;
    NEW.id := nextval(pg_get_serial_sequence(TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'id'));
    RETURN NEW;
END
$$ LANGUAGE plpgsql SET search_path FROM CURRENT
"""

SQLITE_TRIGGER = f"""
CREATE TRIGGER saga_audit_logs_check_chain BEFORE INSERT ON saga_audit_logs
WHEN NEW.prev_hash IS NOT coalesce(
    (SELECT hash FROM saga_audit_logs WHERE saga_id = NEW.saga_id ORDER BY id DESC LIMIT 1),
    '{GENESIS}'
)
BEGIN
    SELECT RAISE(ABORT, 'saga_audit_logs chain: the row''s prev_hash is not the hash of the latest row of its saga');
END
"""  # noqa: E501


def upgrade() -> None:
    op.create_index("ix_saga_audit_logs_saga_id_id", "saga_audit_logs", ["saga_id", "id"])
    dialect = op.get_context().dialect.name
    if dialect == "postgresql":
        op.execute(PG_FUNCTION)
        # "saga_audit_logs_check_chain" fires after any trigger named before it: it must be
        # the last to look at prev_hash and the one that draws the id.
        op.execute(
            "CREATE TRIGGER saga_audit_logs_check_chain BEFORE INSERT ON saga_audit_logs "
            "FOR EACH ROW EXECUTE FUNCTION saga_audit_logs_check_chain()"
        )
    elif dialect == "sqlite":
        op.execute(SQLITE_TRIGGER)


def downgrade() -> None:
    raise RuntimeError("the audit trail has no downgrade path: it is append-only by design")
