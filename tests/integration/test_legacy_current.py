"""`saga-worker db current` on a database of saga_worker 0.1 (its revision still in Alembic's
default `alembic_version`, the saga tables present) says so and what moves it, instead of
"no saga tables yet"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import text

from saga_worker.store.connect import create_db_engine
from saga_worker.store.migrate import head_revision

from .conftest import make_0_1_database, migrated_database
from .test_operations import cli

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_db_current_on_a_0_1_database_names_the_legacy_table_and_the_fix(
    backend: str, pg_admin_url: str, tmp_path: Path
) -> None:
    url = migrated_database(backend, pg_admin_url, tmp_path)
    revision = make_0_1_database(url)
    env = {"SAGA_DATABASE_URL": url, "SAGA_HOME": str(tmp_path)}
    current = cli(["db", "current"], env)
    assert current.returncode == 0, current.stderr
    assert current.stdout.strip() == "none"
    (line,) = current.stderr.strip().splitlines()
    assert "no saga tables yet" not in line
    assert f"revision {revision}" in line and "alembic_version" in line
    assert "saga-worker db upgrade" in line
    as_json = cli(["db", "current", "--json", "--check"], env)
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout) == {
        "revision": None,
        "head": head_revision(),
        "up_to_date": False,
        "legacy_revision": revision,
    }
    assert cli(["db", "upgrade"], env).returncode == 0
    after = cli(["db", "current"], env)
    assert after.stdout.strip() == f"{head_revision()} (head)" and after.stderr == ""


def test_db_current_with_another_applications_alembic_version_is_still_none(
    tmp_path: Path,
) -> None:
    """An `alembic_version` without the saga tables is someone else's: no legacy hint."""
    url = f"sqlite:///{tmp_path / 'other.sqlite3'}"
    engine = create_db_engine(url, pool=False)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)"))
        conn.execute(text("INSERT INTO alembic_version VALUES ('0001')"))
    engine.dispose()
    current = cli(["db", "current", "--json"], {"SAGA_DATABASE_URL": url})
    assert current.returncode == 0, current.stderr
    assert "legacy_revision" not in json.loads(current.stdout)
    plain = cli(["db", "current"], {"SAGA_DATABASE_URL": url})
    assert "no saga tables yet" in plain.stderr


def test_db_upgrade_sql_help_says_it_is_a_fresh_databases_sql(tmp_path: Path) -> None:
    result = cli(["db", "upgrade", "--help"], {"SAGA_HOME": str(tmp_path)})
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "SQL of a fresh install" in text
    assert "0.1 needs `db upgrade` run online once" in text
