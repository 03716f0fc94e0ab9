"""The tables' owner, a role without SUPERUSER (the migration job's role), can disable the
append-only triggers and rewrite rows: PostgreSQL allows it, so the docs say so (review of
issue 14), and verification shows what was rewritten."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from saga_worker.audit.redaction import Redactor
from saga_worker.audit.verify import MODIFIED, verify_chain
from saga_worker.store.connect import create_db_engine
from saga_worker.store.repository import SagaStore

from .conftest import REPO, fresh_postgres_database
from .test_audit_trail import Driver

pytestmark = pytest.mark.integration


def test_the_owner_can_disable_the_triggers_and_verify_shows_the_rewrite(pg_admin_url: str) -> None:
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
        with as_owner.begin() as conn:
            conn.execute(text("ALTER TABLE saga_audit_logs DISABLE TRIGGER USER"))
            conn.execute(text("UPDATE saga_audit_logs SET error_message = 'rewritten'"))
            conn.execute(text("ALTER TABLE saga_audit_logs ENABLE TRIGGER USER"))
        rows = SagaStore(as_owner, Redactor(())).audit_trail("owner-1")
        problems = verify_chain(rows)
        assert problems and {p.kind for p in problems} == {MODIFIED}
        docs = (REPO / "docs" / "security.md").read_text() + (
            REPO / "docs" / "audit.md"
        ).read_text()
        assert "only a superuser can disable" not in docs
        assert "owner" in docs and "DISABLE TRIGGER" in docs
    finally:
        as_owner.dispose()
