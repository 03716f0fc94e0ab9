"""Issue 14, item 7: connected as the run-time role that `saga-worker db grant` set up, no
statement rewrites or unguards the audit trail, and a full saga runs.

Each statement of REFUSED runs in its own transaction as that role and must raise; the
audit table is unchanged afterwards. The owner's own UPDATE/DELETE/TRUNCATE are refused by
the triggers (tests/integration/test_audit_trail.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

from saga_worker.audit.redaction import Redactor
from saga_worker.audit.verify import verify_chain
from saga_worker.examples.backtest import create_tables
from saga_worker.store.connect import create_db_engine
from saga_worker.store.grants import grant_runtime
from saga_worker.store.repository import SagaStore

from .conftest import fresh_postgres_database
from .test_operations import as_role, create_role

pytestmark = pytest.mark.integration

#: (statement, what the refusal says). Every one must raise as the run-time role.
REFUSED: tuple[tuple[str, str], ...] = (
    ("UPDATE saga_audit_logs SET error_message = 'x'", "permission denied"),
    ("DELETE FROM saga_audit_logs", "permission denied"),
    ("TRUNCATE saga_audit_logs", "permission denied"),
    (
        "ALTER TABLE saga_audit_logs DISABLE TRIGGER saga_audit_logs_check_chain",
        "must be owner",
    ),
    ("ALTER TABLE saga_audit_logs DISABLE TRIGGER ALL", "must be owner"),
    ("ALTER TABLE saga_audit_logs DISABLE TRIGGER USER", "must be owner"),
    ("DROP TRIGGER saga_audit_logs_no_update_delete ON saga_audit_logs", "must be owner"),
    ("DROP TRIGGER saga_audit_logs_no_truncate ON saga_audit_logs", "must be owner"),
    ("DROP TRIGGER saga_audit_logs_check_chain ON saga_audit_logs", "must be owner"),
    ("DROP FUNCTION saga_audit_logs_check_chain() CASCADE", "must be owner"),
    (
        "CREATE OR REPLACE FUNCTION saga_audit_logs_check_chain() RETURNS trigger "
        "LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$",
        "permission denied",  # for schema public: no CREATE there, and not its owner
    ),
    (
        "CREATE TRIGGER it_sneak BEFORE INSERT ON saga_audit_logs FOR EACH ROW "
        "EXECUTE FUNCTION saga_audit_logs_check_chain()",
        "permission denied",
    ),
    ("ALTER TABLE saga_audit_logs ADD COLUMN it_x int", "must be owner"),
    ("ALTER TABLE saga_audit_logs RENAME TO it_old", "must be owner"),
    ("DROP TABLE saga_audit_logs", "must be owner"),
    ("CREATE TABLE it_new (x int)", "permission denied"),
    ("SET session_replication_role = replica", "permission denied"),
    # A chain restarted from 64 zeros for a saga that has rows: the chain trigger.
    ("RESTART", "saga_audit_logs chain"),
    ("UPDATE saga_audit_anchors SET rows = 0", "permission denied"),
    ("DELETE FROM saga_audit_anchors", "permission denied"),
    ("TRUNCATE saga_audit_anchors", "permission denied"),
    ("ALTER TABLE saga_audit_anchors DISABLE TRIGGER ALL", "must be owner"),
    ("UPDATE saga_settings SET value = 'x'", "permission denied"),
    ("DELETE FROM saga_checkpoints", "permission denied"),
    ("TRUNCATE saga_checkpoints", "permission denied"),
)


@dataclass(frozen=True)
class Role:
    owner_url: str
    name: str
    url: str


@pytest.fixture(scope="module")
def role(pg_admin_url: str) -> Role:
    owner_url = fresh_postgres_database(pg_admin_url)
    name = create_role(owner_url, "it_app")
    engine = create_db_engine(owner_url, pool=False)
    report = grant_runtime(engine, name, create_tables(engine))
    engine.dispose()
    assert report.excess == [], report.excess
    return Role(owner_url, name, as_role(owner_url, name))


@pytest.fixture(scope="module")
def app(role: Role) -> Iterator[Engine]:
    engine = create_db_engine(role.url, pool=False)
    yield engine
    engine.dispose()


def _restart_row(app: Engine) -> str:
    """An INSERT of a copy of the first row of a saga, so prev_hash is 64 zeros again."""
    with app.connect() as conn:
        saga_id = conn.execute(text("SELECT saga_id FROM saga_audit_logs LIMIT 1")).scalar_one()
    columns = (
        "saga_id, event_type, step_name, step_index, event_data, context_snapshot, "
        "error_message, error_stack_trace, timestamp, duration_ms, user_id, ip_address, "
        "saga_state_before, saga_state_after, retry_count, prev_hash, hash"
    )
    return (
        f"INSERT INTO saga_audit_logs ({columns}) SELECT {columns} FROM saga_audit_logs "
        f"WHERE saga_id = '{saga_id}' ORDER BY id LIMIT 1"
    )


@pytest.mark.parametrize(("statement", "says"), REFUSED, ids=[s for s, _ in REFUSED])
def test_the_runtime_role_is_refused(
    role: Role, app: Engine, statement: str, says: str, stack_as_role: RoleStack
) -> None:
    before = stack_as_role.store.audit_trail(stack_as_role.saga_ids[0])
    sql = _restart_row(app) if statement == "RESTART" else statement
    with pytest.raises(DBAPIError) as caught, app.begin() as conn:
        conn.execute(text(sql))
    assert says in str(caught.value.orig), str(caught.value.orig)
    assert stack_as_role.store.audit_trail(stack_as_role.saga_ids[0]) == before


@dataclass
class RoleStack:
    store: SagaStore
    saga_ids: list[str]


@pytest.fixture(scope="module")
def stack_as_role(role: Role) -> Iterator[RoleStack]:
    """A saga run through the store connected as the role: its start, steps and end."""
    from .test_audit_trail import Driver

    driver = Driver(role.url)
    try:
        saga_id = driver.completed("role-1")
        owner = SagaStore(create_db_engine(role.owner_url, pool=False), Redactor([]))
        yield RoleStack(owner, [saga_id])
        owner.engine.dispose()
    finally:
        driver.close()


def test_a_full_saga_runs_as_the_runtime_role(stack_as_role: RoleStack) -> None:
    trail = stack_as_role.store.audit_trail(stack_as_role.saga_ids[0])
    assert trail[-1]["event_type"] == "saga_complete"
    assert verify_chain(trail) == []
