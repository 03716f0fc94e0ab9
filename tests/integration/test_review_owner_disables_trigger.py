"""Review of issue 14: docs/security.md says "The append-only triggers refuse UPDATE, DELETE
and TRUNCATE of the audit table for the owner too; only a superuser can disable them", and
docs/audit.md "Only a superuser who disables the triggers can change rows". The table's
owner, a role without SUPERUSER (the migration job's role the docs recommend), can
`ALTER TABLE saga_audit_logs DISABLE TRIGGER USER` and then rewrite rows.
"""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from saga_worker.store.connect import create_db_engine

from .conftest import fresh_postgres_database
from .test_audit_trail import Driver

pytestmark = pytest.mark.integration


def test_only_a_superuser_can_disable_the_append_only_triggers(pg_admin_url: str) -> None:
    url = fresh_postgres_database(pg_admin_url)
    driver = Driver(url)
    try:
        driver.completed("owner-1")
    finally:
        driver.close()
    owner = f"it_owner_{uuid.uuid4().hex[:8]}"
    admin = create_db_engine(url, pool=False)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE ROLE "{owner}" LOGIN NOSUPERUSER'))
        for table in ("saga_audit_logs", "saga_checkpoints", "saga_audit_anchors"):
            conn.execute(text(f'ALTER TABLE {table} OWNER TO "{owner}"'))
    admin.dispose()
    as_owner = create_db_engine(
        make_url(url).set(username=owner, password=None).render_as_string(False), pool=False
    )
    try:
        with as_owner.begin() as conn:
            superuser = conn.execute(
                text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
            ).scalar()
            assert superuser is False
        # The docs: "for the owner too; only a superuser can disable them".
        with pytest.raises(DBAPIError), as_owner.begin() as conn:
            conn.execute(text("ALTER TABLE saga_audit_logs DISABLE TRIGGER USER"))
            conn.execute(text("UPDATE saga_audit_logs SET error_message = 'rewritten'"))
    finally:
        as_owner.dispose()
