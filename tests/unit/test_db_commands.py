"""`saga-worker db upgrade --sql` and `db history` need no server; the run-time grants cover
every table the migrations create, and never let the audit trail be rewritten."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from saga_worker.store.grants import APP_TABLE_GRANTS, RUNTIME_GRANTS
from saga_worker.store.migrate import VERSION_TABLE, head_revision
from saga_worker.store.tables import metadata
from tests.console_script import run_cli


def run(args: list[str], env: dict[str, str], home: Path) -> subprocess.CompletedProcess[str]:
    return run_cli(args, env, home)


def test_upgrade_sql_prints_postgresql_ddl_without_a_server(tmp_path: Path) -> None:
    # Port 1 on loopback: nothing listens there, so any connection attempt would fail.
    url = "postgresql+psycopg://owner:pw@127.0.0.1:1/sagas"
    result = run(["db", "upgrade", "--sql"], {"SAGA_DATABASE_URL": url}, tmp_path)
    assert result.returncode == 0, result.stderr
    sql = result.stdout
    assert "CREATE TABLE saga_checkpoints (" in sql
    assert "CREATE TABLE saga_audit_logs (" in sql
    assert "id BIGSERIAL NOT NULL" in sql  # PostgreSQL DDL, not SQLite's
    assert "TIMESTAMP WITH TIME ZONE" in sql
    assert "CREATE TRIGGER saga_audit_logs_no_update_delete" in sql
    assert "CREATE TRIGGER saga_audit_logs_no_truncate" in sql
    assert f"CREATE TABLE {VERSION_TABLE} (" in sql
    # The first revision is inserted, each later one updates it, ending at the head.
    assert f"INSERT INTO {VERSION_TABLE} (version_num) VALUES ('0001')" in sql
    assert f"SET version_num='{head_revision()}' WHERE" in sql.rsplit("UPDATE", 1)[-1]
    assert "CREATE TRIGGER saga_audit_logs_check_chain" in sql
    assert sql.lstrip().startswith("BEGIN;") and sql.rstrip().endswith("COMMIT;")
    assert "pw" not in result.stderr


def test_upgrade_sql_follows_the_dialect_of_the_url(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'never-created.sqlite3'}"
    result = run(["db", "upgrade", "--sql"], {"SAGA_DATABASE_URL": url}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "CREATE TABLE saga_checkpoints (" in result.stdout
    assert "BIGSERIAL" not in result.stdout and "RAISE(ABORT" in result.stdout
    assert not (tmp_path / "never-created.sqlite3").exists()


def test_history_lists_the_shipped_revisions(tmp_path: Path) -> None:
    result = run(["db", "history", "--json"], {}, tmp_path)
    assert result.returncode == 0, result.stderr
    revisions = json.loads(result.stdout)
    assert revisions[0]["revision"] == head_revision() and revisions[0]["is_head"]
    assert revisions[-1]["down_revision"] is None
    text = run(["db", "history"], {}, tmp_path).stdout
    assert f"{head_revision()} (head)" in text


def test_every_table_has_a_runtime_grant_decision() -> None:
    assert set(RUNTIME_GRANTS) == set(metadata.tables) | {VERSION_TABLE}


def test_runtime_grants_never_allow_rewriting_history_or_ddl() -> None:
    assert RUNTIME_GRANTS["saga_audit_logs"] == ("SELECT", "INSERT")
    for table, privileges in RUNTIME_GRANTS.items():
        # A worker deletes its own heartbeat row when it stops: not history.
        assert not {"TRUNCATE", "TRIGGER", "REFERENCES"} & set(privileges), table
        if table != "saga_workers":
            assert "DELETE" not in privileges, table
    assert "TRUNCATE" not in APP_TABLE_GRANTS and "TRIGGER" not in APP_TABLE_GRANTS


def test_db_current_and_grant_name_an_unreachable_database_in_one_line(tmp_path: Path) -> None:
    url = "postgresql+psycopg://owner:pw-x2@127.0.0.1:1/sagas"
    for args in (["db", "current", "--json"], ["db", "grant", "saga_app", "--json"]):
        result = run(args, {"SAGA_DATABASE_URL": url}, tmp_path)
        assert result.returncode == 5, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(
            "error: cannot reach the database at postgresql+psycopg://owner:***@127.0.0.1:1/sagas"
        )
        assert json.loads(result.stdout)["error"]["code"] == "database_unavailable"
        assert "pw-x2" not in result.stdout + result.stderr


def test_db_grant_needs_postgresql(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.sqlite3'}"
    assert run(["db", "upgrade"], {"SAGA_DATABASE_URL": url}, tmp_path).returncode == 0
    result = run(["db", "grant", "saga_app"], {"SAGA_DATABASE_URL": url}, tmp_path)
    assert result.returncode == 6 and "needs PostgreSQL" in result.stderr
