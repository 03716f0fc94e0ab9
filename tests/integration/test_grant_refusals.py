"""`saga-worker db grant` on real PostgreSQL refuses, before any GRANT, a --table that is a saga
table however it is spelled, and a role that could climb to the owner's privileges."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from saga_worker.cli._output import EXIT_REFUSED

from .conftest import fresh_postgres_database
from .test_operations import admin, cli, create_role, table_grants

pytestmark = pytest.mark.integration

SAGA_TABLES = ("saga_checkpoints", "saga_audit_logs", "saga_settings", "saga_alembic_version")


def privileges(url: str, role: str) -> set[tuple[str, str]]:
    """What `role` can do on the saga tables, as has_table_privilege sees it."""
    engine = admin(url)
    found: set[tuple[str, str]] = set()
    with engine.connect() as conn:
        for table in SAGA_TABLES:
            for privilege in ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE"):
                if conn.execute(
                    text("SELECT has_table_privilege(:r, to_regclass(:t), :p)"),
                    {"r": role, "t": f"public.{table}", "p": privilege},
                ).scalar():
                    found.add((table, privilege))
    engine.dispose()
    return found


@pytest.mark.parametrize(
    "spelling",
    [
        "public.saga_checkpoints",
        '"public"."saga_checkpoints"',
        "PUBLIC.SAGA_CHECKPOINTS",
        'Public."saga_checkpoints"',
        "public.saga_audit_logs",
        '"saga_audit_logs"',
        "public.saga_settings",
        "public.saga_alembic_version",
    ],
)
def test_grant_refuses_a_saga_table_given_as_table_in_any_spelling(
    pg_admin_url: str, spelling: str
) -> None:
    url = fresh_postgres_database(pg_admin_url)
    role = create_role(url)
    result = cli(["db", "grant", role, "--table", spelling], {"SAGA_DATABASE_URL": url})
    assert result.returncode == EXIT_REFUSED, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and "saga table" in line and "--table" in line
    assert privileges(url, role) == set()
    assert table_grants(url, role) == set()


def test_grant_refuses_a_saga_table_in_another_schema(pg_admin_url: str) -> None:
    """A second installation's saga tables (another schema) are saga tables too."""
    url = fresh_postgres_database(pg_admin_url)
    role = create_role(url)
    engine = admin(url)
    with engine.connect() as conn:
        conn.execute(text("CREATE SCHEMA other"))
        conn.execute(text("CREATE TABLE other.saga_audit_logs (id int)"))
    engine.dispose()
    env = {"SAGA_DATABASE_URL": url}
    result = cli(["db", "grant", role, "--table", "other.saga_audit_logs"], env)
    assert result.returncode == EXIT_REFUSED, result.stdout + result.stderr
    assert "saga table" in result.stderr
    assert table_grants(url, role) == set()


def test_grant_refuses_a_missing_table_in_any_spelling(pg_admin_url: str) -> None:
    url = fresh_postgres_database(pg_admin_url)
    role = create_role(url)
    for spelling in ('"public"."nope_x"', "nope_schema.nope_x", "a b"):
        result = cli(["db", "grant", role, "--table", spelling], {"SAGA_DATABASE_URL": url})
        assert result.returncode == EXIT_REFUSED, result.stdout + result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert "no table" in line and "create it first" in line, line
    assert table_grants(url, role) == set()


def test_grant_still_takes_mixed_case_and_quoted_application_tables(pg_admin_url: str) -> None:
    url = fresh_postgres_database(pg_admin_url)
    role = create_role(url)
    engine = admin(url)
    with engine.connect() as conn:
        conn.execute(text('CREATE TABLE "Orders" (id int)'))
        conn.execute(text("CREATE TABLE ledger (id int)"))
    engine.dispose()
    result = cli(
        ["db", "grant", role, "--table", "Orders", "--table", '"public"."ledger"', "--json"],
        {"SAGA_DATABASE_URL": url},
    )
    assert result.returncode == 0, result.stderr
    grants = table_grants(url, role)
    assert ("Orders", "DELETE") in grants and ("ledger", "DELETE") in grants


@pytest.mark.parametrize(
    ("attribute", "named"),
    [("CREATEROLE", "CREATEROLE"), ("REPLICATION", "REPLICATION"), ("BYPASSRLS", "BYPASSRLS")],
)
def test_grant_refuses_a_role_that_could_climb(
    pg_admin_url: str, attribute: str, named: str
) -> None:
    url = fresh_postgres_database(pg_admin_url)
    env = {"SAGA_DATABASE_URL": url}
    role = create_role(url)
    engine = admin(url)
    with engine.connect() as conn:
        conn.execute(text(f'ALTER ROLE "{role}" {attribute}'))
    engine.dispose()
    direct = cli(["db", "grant", role], env)
    assert direct.returncode == EXIT_REFUSED, direct.stdout + direct.stderr
    (line,) = direct.stderr.strip().splitlines()
    assert named in line and f"NO{named}" in line, line
    assert table_grants(url, role) == set()


def test_grant_refuses_a_member_of_a_createrole_or_superuser_role(pg_admin_url: str) -> None:
    url = fresh_postgres_database(pg_admin_url)
    env = {"SAGA_DATABASE_URL": url}
    for attribute in ("CREATEROLE", "SUPERUSER"):
        role = create_role(url)
        powerful = create_role(url, "it_pow")
        engine = admin(url)
        with engine.connect() as conn:
            conn.execute(text(f'ALTER ROLE "{powerful}" {attribute}'))
            conn.execute(text(f'GRANT "{powerful}" TO "{role}"'))
        engine.dispose()
        result = cli(["db", "grant", role], env)
        assert result.returncode == EXIT_REFUSED, result.stdout + result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert powerful in line and attribute in line, line
        assert table_grants(url, role) == set()
