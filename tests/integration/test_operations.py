"""Operations on real PostgreSQL and Redis: `db current`, `db grant ROLE` and a worker and the
CLI running as that run-time role, and `saga-worker start` through the broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from saga_worker.audit.redaction import Redactor
from saga_worker.store.connect import create_db_engine
from saga_worker.store.migrate import head_revision
from saga_worker.store.repository import SagaStore
from tests.waiting import wait_for, wait_for_tasks

from .conftest import REPO, SIGNING_KEY, Stack, WorkerProcess, fresh_postgres_database, start_worker

pytestmark = pytest.mark.integration

SAGA_WORKER = str(Path(sys.executable).with_name("saga-worker"))


def cli(
    args: list[str], env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """The real console script, with only the SAGA_* variables given."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    return subprocess.run(
        [SAGA_WORKER, *args],
        # The signing key every process of the test databases uses (required with PostgreSQL).
        env={**clean, "PYTHONPATH": str(REPO), "SAGA_SIGNING_KEY": SIGNING_KEY, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def admin(url: str) -> Engine:
    return create_db_engine(url, pool=False).execution_options(isolation_level="AUTOCOMMIT")


def as_role(url: str, role: str) -> str:
    return make_url(url).set(username=role, password=None).render_as_string(hide_password=False)


def create_role(url: str, prefix: str = "it_rt") -> str:
    role = f"{prefix}_{uuid.uuid4().hex[:8]}"
    engine = admin(url)
    with engine.connect() as conn:
        conn.execute(text(f'CREATE ROLE "{role}" LOGIN'))
    engine.dispose()
    return role


def table_grants(url: str, role: str) -> set[tuple[str, str]]:
    engine = admin(url)
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT table_name, privilege_type FROM information_schema.role_table_grants "
                "WHERE grantee = :role"
            ),
            {"role": role},
        ).all()
    engine.dispose()
    return {(str(t), str(p)) for t, p in rows}


EXPECTED = {
    ("saga_checkpoints", "SELECT"),
    ("saga_checkpoints", "INSERT"),
    ("saga_checkpoints", "UPDATE"),
    ("saga_audit_logs", "SELECT"),
    ("saga_audit_logs", "INSERT"),
    ("saga_settings", "SELECT"),
    ("saga_settings", "INSERT"),
    ("saga_workers", "SELECT"),
    ("saga_workers", "INSERT"),
    ("saga_workers", "UPDATE"),
    ("saga_workers", "DELETE"),
    ("saga_alembic_version", "SELECT"),
    ("saga_audit_anchors", "SELECT"),
    ("saga_audit_anchors", "INSERT"),
}
EXAMPLES = {
    (table, p)
    for table in ("example_backtests", "example_orders")
    for p in ("SELECT", "INSERT", "UPDATE", "DELETE")
}


def test_db_current_is_none_before_upgrade_and_head_after(pg_admin_url: str) -> None:
    name = f"it_{uuid.uuid4().hex[:12]}"
    engine = admin(pg_admin_url)
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    env = {"SAGA_DATABASE_URL": pg_admin_url.rsplit("/", 1)[0] + "/" + name}
    before = cli(["db", "current"], env)
    assert before.returncode == 0, before.stderr
    assert before.stdout.strip() == "none" and "db upgrade" in before.stderr
    assert cli(["db", "current", "--check"], env).returncode == 1
    upgraded = cli(["db", "upgrade"], env)
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"is at revision {head_revision()}" in upgraded.stdout
    after = cli(["db", "current", "--json", "--check"], env)
    assert after.returncode == 0, after.stderr
    assert json.loads(after.stdout) == {
        "revision": head_revision(),
        "head": head_revision(),
        "up_to_date": True,
    }
    assert cli(["db", "current"], env).stdout.strip() == f"{head_revision()} (head)"


def test_grant_is_exact_idempotent_and_refuses_unknown_or_owning_roles(
    pg_admin_url: str,
) -> None:
    url = fresh_postgres_database(pg_admin_url)
    env = {"SAGA_DATABASE_URL": url}
    role = create_role(url)
    first = cli(["db", "grant", role], env)
    assert first.returncode == 0, first.stderr
    assert table_grants(url, role) == EXPECTED
    again = cli(["db", "grant", role, "--examples", "--json"], env)
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert report["sequences"] == [
        "saga_audit_logs_id_seq",
        "saga_audit_anchors_id_seq",
        "example_backtests_id_seq",
        "example_orders_id_seq",
    ]
    assert report["excess"] == []
    assert table_grants(url, role) == EXPECTED | EXAMPLES
    # A grant made by hand beyond the run-time set is taken back by the next run.
    engine = admin(url)
    with engine.connect() as conn:
        conn.execute(text(f'GRANT DELETE, TRUNCATE ON saga_audit_logs TO "{role}"'))
    engine.dispose()
    assert cli(["db", "grant", role, "--examples"], env).returncode == 0
    assert table_grants(url, role) == EXPECTED | EXAMPLES

    unknown = cli(["db", "grant", "no_such_role_x"], env)
    assert unknown.returncode == 4
    assert unknown.stderr.strip().startswith("error: no PostgreSQL role 'no_such_role_x'")
    assert "CREATE ROLE" in unknown.stderr
    owner = make_url(url).username
    assert owner is not None
    refused = cli(["db", "grant", owner], env)  # the test server's owner is a superuser
    assert refused.returncode == 4 and "superuser" in refused.stderr
    member = create_role(url, "it_member")
    engine = admin(url)
    with engine.connect() as conn:
        conn.execute(text(f'ALTER TABLE saga_settings OWNER TO "{member}"'))
    engine.dispose()
    owning = cli(["db", "grant", member], env)
    assert owning.returncode == 4 and "owns public.saga_settings" in owning.stderr
    # Run as the role itself: it cannot grant, and says whose URL to use.
    self_grant = cli(["db", "grant", role], {"SAGA_DATABASE_URL": as_role(url, role)})
    assert self_grant.returncode == 4 and "owner's SAGA_DATABASE_URL" in self_grant.stderr
    assert table_grants(url, role) == EXPECTED | EXAMPLES


@dataclass
class RuntimeStack:
    owner_url: str
    role: str
    role_url: str
    env: dict[str, str]
    worker: WorkerProcess


@pytest.fixture(scope="module")
def runtime(
    pg_admin_url: str, broker_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RuntimeStack]:
    """A worker and the CLI connected as a run-time role that `db grant` set up."""
    folder = tmp_path_factory.mktemp("runtime-role")
    owner_url = fresh_postgres_database(pg_admin_url)
    role = create_role(owner_url)
    granted = cli(["db", "grant", role, "--examples"], {"SAGA_DATABASE_URL": owner_url})
    assert granted.returncode == 0, granted.stderr
    role_url = as_role(owner_url, role)
    env = {
        "SAGA_DATABASE_URL": role_url,
        "SAGA_BROKER_URL": broker_url,
        "SAGA_QUEUE": f"it-ops-{uuid.uuid4().hex[:8]}",
        "SAGA_IMPORTS": "saga_worker.examples",
        "SAGA_HOME": str(folder),
    }
    worker = start_worker("saga_worker.app", env, env["SAGA_QUEUE"], folder / "worker.log")
    try:
        # One saga through, so that every test finds audit rows, whichever runs alone.
        first = cli(
            ["start", "backtest_workflow", "--context", '{"strategy_id": 1}', "--wait", "60"], env
        )
        assert first.returncode == 0, first.stderr + worker.log_tail()
        yield RuntimeStack(owner_url, role, role_url, env, worker)
    finally:
        worker.stop()


def test_start_waits_for_completion_as_the_runtime_role(runtime: RuntimeStack) -> None:
    result = cli(
        ["start", "backtest_workflow", "--context", '{"strategy_id": 7}', "--wait", "90"],
        runtime.env,
    )
    assert result.returncode == 0, result.stderr + runtime.worker.log_tail()
    saga_id = result.stdout.strip()
    assert saga_id and "COMPLETED" in result.stderr
    status = cli(["status", saga_id, "--json"], runtime.env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["state"] == "COMPLETED"
    verify = cli(["audit", "verify", "--saga-id", saga_id], runtime.env)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_start_json_with_saga_id_and_a_failing_saga(runtime: RuntimeStack) -> None:
    saga_id = f"ops-{uuid.uuid4().hex[:8]}"
    context = {"strategy_id": 8, "fail_step": "save_results"}
    result = cli(
        [
            "start",
            "backtest_workflow",
            "--context",
            json.dumps(context),
            "--saga-id",
            saga_id,
            "--user",
            "ops_1",
            "--wait",
            "120",
            "--json",
        ],
        runtime.env,
        timeout=180,
    )
    # Compensations (DELETE on the example table) ran as the role too.
    assert result.returncode == 1, result.stderr + runtime.worker.log_tail()
    data = json.loads(result.stdout)
    assert data["saga_id"] == saga_id and data["state"] == "COMPENSATED"
    assert data["rejected"] is False and data["user_id"] == "ops_1"
    assert "ended COMPENSATED" in result.stderr
    store = SagaStore(create_db_engine(runtime.owner_url, pool=False), Redactor([]))
    try:
        trail = store.audit_trail(saga_id)
    finally:
        store.engine.dispose()
    assert trail[0]["event_type"] == "saga_start" and trail[0]["user_id"] == "ops_1"


def test_start_without_wait_prints_the_task_id_and_rejections_are_reported(
    runtime: RuntimeStack,
) -> None:
    sent = cli(
        ["start", "backtest_workflow", "--context", '{"strategy_id": 9}', "--json"], runtime.env
    )
    assert sent.returncode == 0, sent.stderr
    data = json.loads(sent.stdout)
    uuid.UUID(data["saga_id"])  # Celery's task id of the start message
    assert data["queue"] == runtime.env["SAGA_QUEUE"]
    rejected = cli(["start", "no_such_saga", "--saga-id", "rej-1", "--wait", "60"], runtime.env)
    assert rejected.returncode == 1
    assert "rejected: unknown saga_type 'no_such_saga'" in rejected.stderr
    bad = cli(["start", "backtest_workflow", "--context", "[1]"], runtime.env)
    assert bad.returncode == 2 and "JSON object" in bad.stderr


def test_operator_abort_and_the_recovery_sweep_run_as_the_runtime_role(
    runtime: RuntimeStack, broker_url: str
) -> None:
    saga_id = f"ops-abort-{uuid.uuid4().hex[:8]}"
    # Slow enough that the CLI's abort (a process start on a loaded machine) finds it running.
    context = {"strategy_id": 4, "slow_step": {"step": "run_strategy", "seconds": 8}}
    sent = cli(
        ["start", "backtest_workflow", "--context", json.dumps(context), "--saga-id", saga_id],
        runtime.env,
    )
    assert sent.returncode == 0, sent.stderr
    store = SagaStore(create_db_engine(runtime.owner_url, pool=False), Redactor([]))
    try:
        wait_for(
            lambda: any(
                r["event_type"] == "step_start" and r["step_name"] == "run_strategy"
                for r in store.audit_trail(saga_id)
            ),
            30,
            "run_strategy to start",
            details=runtime.worker.log_tail,
        )
        aborted = cli(
            ["abort", saga_id, "--reason", "ops test", "--user", "ops_2", "--json"], runtime.env
        )
        assert aborted.returncode == 0, aborted.stderr

        def settled_state() -> str | None:
            state = str(json.loads(cli(["status", saga_id, "--json"], runtime.env).stdout)["state"])
            return state if state in ("ABORTED", "FAILED", "COMPENSATED") else None

        state = wait_for(settled_state, 60, "the aborted saga to settle", interval=0.2)
        assert state == "ABORTED", runtime.worker.log_tail()
        # The beat's job, as the workers run it: reads and updates checkpoints as the role.
        producer = Celery("it-ops", broker=broker_url, set_as_current=False)
        producer.conf.update(task_serializer="json", accept_content=["json"])
        try:
            result = producer.send_task("saga.recover", queue=runtime.env["SAGA_QUEUE"])
        finally:
            producer.close()
        wait_for_tasks(runtime.worker.log_path, [result.id])
    finally:
        store.engine.dispose()


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE saga_audit_logs SET error_message = 'x'",
        "DELETE FROM saga_audit_logs",
        "TRUNCATE saga_audit_logs",
        "ALTER TABLE saga_audit_logs DISABLE TRIGGER saga_audit_logs_no_update_delete",
        "ALTER TABLE saga_audit_logs DISABLE TRIGGER ALL",
        "DROP TRIGGER saga_audit_logs_no_update_delete ON saga_audit_logs",
        "DROP TABLE saga_audit_logs",
        "DROP TABLE saga_checkpoints",
        "DELETE FROM saga_checkpoints",
        "CREATE TABLE saga_sneaky (id int)",
        "ALTER TABLE saga_checkpoints ADD COLUMN sneaky int",
        "ALTER TABLE saga_audit_logs OWNER TO CURRENT_USER",
    ],
)
def test_runtime_role_is_refused_what_would_rewrite_history(
    runtime: RuntimeStack, statement: str
) -> None:
    engine = create_db_engine(runtime.role_url, pool=False)
    try:
        with engine.begin() as conn:
            # Rows exist (the fixture's saga), so the row triggers would fire too.
            assert conn.execute(text("SELECT count(*) FROM saga_audit_logs")).scalar()
        with pytest.raises(DBAPIError) as refused, engine.begin() as conn:
            conn.execute(text(statement))
        message = str(refused.value.orig)
        assert "permission denied" in message or "must be owner" in message, message
    finally:
        engine.dispose()


def password_hash(url: str, role: str) -> str | None:
    engine = admin(url)
    with engine.connect() as conn:
        value = conn.execute(
            text("SELECT rolpassword FROM pg_authid WHERE rolname = :r"), {"r": role}
        ).scalar()
    engine.dispose()
    return None if value is None else str(value)


def test_grant_create_and_password_env_create_rotate_and_never_touch_a_refused_role(
    pg_admin_url: str,
) -> None:
    url = fresh_postgres_database(pg_admin_url)
    role = f"it_new_{uuid.uuid4().hex[:8]}"
    env = {"SAGA_DATABASE_URL": url, "IT_ROLE_PW": "p:w'%s\"x 1"}
    created = cli(["db", "grant", role, "--create", "--password-env", "IT_ROLE_PW", "--json"], env)
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["created"] is True
    assert table_grants(url, role) == EXPECTED
    first = password_hash(url, role)
    assert first is not None and first.startswith("SCRAM-SHA-256$")
    engine = admin(url)
    with engine.connect() as conn:
        attributes = conn.execute(
            text(
                "SELECT rolcanlogin, rolsuper, rolcreaterole, rolcreatedb, rolinherit "
                "FROM pg_roles WHERE rolname = :r"
            ),
            {"r": role},
        ).one()
    engine.dispose()
    assert tuple(attributes) == (True, False, False, False, True)
    # Again with another password: the role exists, only its password changes.
    rotated = cli(
        ["db", "grant", role, "--create", "--password-env", "IT_ROLE_PW", "--json"],
        {**env, "IT_ROLE_PW": "rotated-secret"},
    )
    assert rotated.returncode == 0, rotated.stderr
    assert json.loads(rotated.stdout)["created"] is False
    assert password_hash(url, role) not in (None, first)
    assert "rotated-secret" not in rotated.stdout + rotated.stderr
    # A refused role keeps its password: the checks come first.
    owner = make_url(url).username
    assert owner is not None
    before = password_hash(url, owner)
    refused = cli(["db", "grant", owner, "--password-env", "IT_ROLE_PW"], env)
    assert refused.returncode == 4 and "superuser" in refused.stderr
    assert password_hash(url, owner) == before
    unset = cli(["db", "grant", role, "--password-env", "IT_UNSET_VAR"], env)
    assert unset.returncode == 6 and "IT_UNSET_VAR" in unset.stderr


def test_warm_shutdown_lets_the_running_step_finish(
    pg_admin_url: str, broker_url: str, tmp_path: Path
) -> None:
    """SIGTERM to the worker's main process only, as `docker stop` sends it: the step that is
    running finishes (it is not cut short and not run again), the worker then exits 0, and the
    next worker carries the saga on."""
    url = fresh_postgres_database(pg_admin_url)
    env = {
        "SAGA_DATABASE_URL": url,
        "SAGA_BROKER_URL": broker_url,
        "SAGA_QUEUE": f"it-stop-{uuid.uuid4().hex[:8]}",
        "SAGA_IMPORTS": "saga_worker.examples,tests.fixtures.recovery_sagas",
        "SAGA_HOME": str(tmp_path),
    }
    markers = tmp_path / "markers"
    markers.mkdir()
    store = SagaStore(create_db_engine(url, pool=False), Redactor([]))
    first = start_worker("saga_worker.app", env, env["SAGA_QUEUE"], tmp_path / "w1.log")
    second = None
    try:
        saga_id = f"stop-{uuid.uuid4().hex[:8]}"
        # Its first step writes a marker in the pool process, then sleeps 4 s.
        context = {"marker_dir": str(markers), "hold_seconds": 4}
        sent = cli(
            ["start", "rec_hold_first", "--context", json.dumps(context), "--saga-id", saga_id],
            env,
        )
        assert sent.returncode == 0, sent.stderr
        started = markers / f"{saga_id}.started"
        wait_for(started.exists, 30, "the first step to start running", details=first.log_tail)
        signalled = time.monotonic()
        os.kill(first.process.pid, signal.SIGTERM)
        assert first.process.wait(timeout=60) == 0, first.log_tail()
        assert time.monotonic() - signalled >= 2.5, "the worker left before its step ended"
        # The step finished under the first worker, before it exited.
        assert ("step_complete", "hold") in [
            (r["event_type"], r["step_name"]) for r in store.audit_trail(saga_id)
        ]
        second = start_worker("saga_worker.app", env, env["SAGA_QUEUE"], tmp_path / "w2.log")
        saga = wait_for(
            lambda: saga if (saga := store.load(saga_id)) and saga.state.is_terminal else None,
            90,
            f"{saga_id} to be terminal",
            details=second.log_tail,
        )
        assert saga.state.value == "COMPLETED", saga
        assert saga.context["held_runs"] == 1, "the interrupted step ran again"
        starts = [
            r
            for r in store.audit_trail(saga_id)
            if r["event_type"] == "step_start" and r["step_name"] == "hold"
        ]
        assert len(starts) == 1, "the interrupted step ran again"
    finally:
        first.stop()
        if second is not None:
            second.stop()
        store.engine.dispose()


def test_grant_app_tables_and_report_privileges_left_through_public(pg_admin_url: str) -> None:
    url = fresh_postgres_database(pg_admin_url)
    env = {"SAGA_DATABASE_URL": url}
    role = create_role(url)
    engine = admin(url)
    with engine.connect() as conn:
        conn.execute(text("CREATE SCHEMA shop"))
        conn.execute(text("CREATE TABLE shop.orders (id bigserial PRIMARY KEY, note text)"))
        conn.execute(text("CREATE TABLE ledger (id int GENERATED ALWAYS AS IDENTITY, x int)"))
    engine.dispose()
    result = cli(
        ["db", "grant", role, "--table", "shop.orders", "--table", "ledger", "--json"], env
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["tables"]["shop.orders"] == ["SELECT", "INSERT", "UPDATE", "DELETE"]
    assert report["tables"]["public.ledger"] == ["SELECT", "INSERT", "UPDATE", "DELETE"]
    assert {"orders_id_seq", "ledger_id_seq"} <= set(report["sequences"])
    role_engine = create_db_engine(as_role(url, role), pool=False)
    try:
        with role_engine.begin() as conn:
            conn.execute(text("INSERT INTO shop.orders (note) VALUES ('a')"))
            conn.execute(text("INSERT INTO ledger (x) VALUES (1)"))
            conn.execute(text("DELETE FROM shop.orders"))
        with pytest.raises(DBAPIError), role_engine.begin() as conn:
            conn.execute(text("TRUNCATE shop.orders"))
    finally:
        role_engine.dispose()
    saga_table = cli(["db", "grant", role, "--table", "saga_audit_logs"], env)
    assert saga_table.returncode == 4 and "fixed" in saga_table.stderr
    missing = cli(["db", "grant", role, "--table", "no_such_table"], env)
    assert missing.returncode == 4 and "no table 'no_such_table'" in missing.stderr
    # Someone granted the audit table to PUBLIC: the grant itself is done, but it says what
    # the role can still do and exits 1.
    engine = admin(url)
    with engine.connect() as conn:
        conn.execute(text("GRANT UPDATE ON saga_audit_logs TO PUBLIC"))
    engine.dispose()
    leaky = cli(["db", "grant", role], env)
    assert leaky.returncode == 1, leaky.stderr
    assert "UPDATE on public.saga_audit_logs" in leaky.stderr
    assert "REVOKE UPDATE ON public.saga_audit_logs FROM PUBLIC" in leaky.stderr


@pytest.mark.parametrize("stack", ["postgres"], indirect=True)
def test_start_wait_shows_the_saga_error_redacted(stack: Stack, tmp_path: Path) -> None:
    env = {
        "SAGA_DATABASE_URL": stack.database_url,
        "SAGA_BROKER_URL": stack.broker_url,
        "SAGA_QUEUE": stack.queue,
        "SAGA_HOME": str(tmp_path),
    }
    secrets = ("4111111111111111", "hunter2", "sk-live-abc123")
    human = cli(["start", "it_secret_error", "--wait", "60"], env)
    assert human.returncode == 1, human.stderr + stack.workers[0].log_tail()
    # one step, nothing to compensate: the saga ends COMPENSATED with the step's error
    assert "ended COMPENSATED" in human.stderr, human.stderr
    assert "***REDACTED***" in human.stderr, human.stderr
    as_json = cli(["start", "it_secret_error", "--wait", "60", "--json"], env)
    assert as_json.returncode == 1, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["state"] == "COMPENSATED" and "***REDACTED***" in data["error"], data
    for secret in secrets:
        assert secret not in human.stdout + human.stderr
        assert secret not in as_json.stdout + as_json.stderr
    # `status` shows the same masked text
    status = cli(["status", data["saga_id"], "--json"], env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["error"] == data["error"]
