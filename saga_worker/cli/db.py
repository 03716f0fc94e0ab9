"""db upgrade / current / history / grant: the schema and the run-time role's privileges."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from ._output import EXIT_PROBLEMS, JSON_OPTION, Output


def register(main: click.Group) -> None:
    main.add_command(db)


@click.group()
def db() -> None:
    """Database schema commands: upgrade, current, history, grant, move-key."""


@contextmanager
def _database(safe_url: str) -> Iterator[None]:
    """Driver errors as one line naming the database (password hidden)."""
    from sqlalchemy.exc import OperationalError, ProgrammingError

    from ..errors import DatabaseUnavailable

    try:
        yield
    except OperationalError as exc:
        first = (str(exc.orig).strip().splitlines() or ["?"])[0]
        raise DatabaseUnavailable(f"cannot reach the database at {safe_url}: {first}") from None
    except ProgrammingError as exc:
        first = (str(exc.orig).strip().splitlines() or ["?"])[0]
        raise DatabaseUnavailable(f"the database at {safe_url} refused: {first}") from None


def _json_errors(json_mode: bool) -> None:
    """Errors of this command as JSON too when --json was given (see SagaGroup.invoke)."""
    click.get_current_context().find_root().meta["saga_json"] = json_mode


def _engine() -> tuple[Any, str]:
    from sqlalchemy.engine import make_url

    from ..config import Settings
    from ..store.connect import create_db_engine

    settings = Settings.from_env()
    safe_url = make_url(settings.database_url).render_as_string(hide_password=True)
    return create_db_engine(settings.database_url, pool=False), safe_url


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Alembic revision.")
@click.option(
    "--sql",
    is_flag=True,
    help="Print the SQL of a fresh install instead of running it (no connection: the URL only "
    "picks the dialect). Not for a database that already has saga tables; one of saga_worker "
    "0.1 needs `db upgrade` run online once.",
)
def db_upgrade(revision: str, sql: bool) -> None:
    """Create or migrate the tables in SAGA_DATABASE_URL (embedded SQLite when unset).

    Run it as the role that owns (or will own) the tables. With --sql, nothing connects:
    the DDL, the append-only triggers and the version table's update are printed for a DBA
    to review and run. That SQL is a fresh database's (from no revision to --revision): it
    does not know what the database already has. A database of saga_worker 0.1 (revision
    still in alembic_version) needs `saga-worker db upgrade` run online once, which moves
    the revision to saga_alembic_version.
    """
    from ..config import Settings
    from ..store.migrate import current_revision, upgrade, upgrade_sql

    if sql:
        upgrade_sql(Settings.from_env().database_url, sys.stdout, revision)
        return
    engine, safe_url = _engine()
    with _database(safe_url):
        upgrade(engine, revision)
        now = current_revision(engine)
    engine.dispose()
    click.echo(f"database at {safe_url} is at revision {now or 'none'}")


@db.command("current")
@click.option("--check", is_flag=True, help="Exit 1 unless the database is at the head revision.")
@JSON_OPTION
def db_current(check: bool, json_mode: bool) -> None:
    """Show the revision the database is at (`none` before the first upgrade)."""
    from ..store.migrate import (
        LEGACY_VERSION_TABLE,
        VERSION_TABLE,
        current_revision,
        head_revision,
        legacy_revision,
    )

    _json_errors(json_mode)
    engine, safe_url = _engine()
    with _database(safe_url):
        current = current_revision(engine)
        legacy = legacy_revision(engine) if current is None else None
    engine.dispose()
    head = head_revision()
    if json_mode:
        data: dict[str, object] = {"revision": current, "head": head, "up_to_date": current == head}
        if legacy is not None:
            data["legacy_revision"] = legacy
        Output(True).json(data)
    elif legacy is not None:
        click.echo("none")
        click.echo(
            f"the saga tables at {safe_url} are at revision {legacy}, still recorded in "
            f"{LEGACY_VERSION_TABLE} (saga_worker 0.1): run `saga-worker db upgrade`, which "
            f"moves it to {VERSION_TABLE}",
            err=True,
        )
    elif current is None:
        click.echo("none")
        click.echo(f"no saga tables yet at {safe_url}: run `saga-worker db upgrade`", err=True)
    elif current == head:
        click.echo(f"{current} (head)")
    else:
        click.echo(f"{current} (head is {head}: run `saga-worker db upgrade`)")
    if check and current != head:
        raise click.exceptions.Exit(EXIT_PROBLEMS)


@db.command("history")
@JSON_OPTION
def db_history(json_mode: bool) -> None:
    """List the migrations this version ships, newest first (no database needed)."""
    from ..store.migrate import history

    _json_errors(json_mode)
    revisions = history()
    out = Output(json_mode)
    if json_mode:
        out.json([vars(r) for r in revisions])
        return
    out.table(
        ["REVISION", "REVISES", "DESCRIPTION"],
        [
            [
                r.revision + (" (head)" if r.is_head else ""),
                r.down_revision or "-",
                r.description,
            ]
            for r in revisions
        ],
        max_width=80,
    )


@db.command("grant")
@click.argument("role")
@click.option(
    "--table",
    "tables",
    multiple=True,
    metavar="TABLE",
    help="Also let ROLE SELECT/INSERT/UPDATE/DELETE this existing application table that "
    "local steps write (repeatable; `table`, `schema.table` or quoted SQL names).",
)
@click.option(
    "--examples",
    is_flag=True,
    help="Create the example sagas' tables when missing and let ROLE use them.",
)
@click.option(
    "--create",
    is_flag=True,
    help="Create ROLE (LOGIN, nothing more) when it does not exist, instead of refusing.",
)
@click.option(
    "--password-env",
    metavar="VAR",
    help="Set ROLE's password from environment variable VAR (never on the command line).",
)
@JSON_OPTION
def db_grant(
    role: str,
    tables: tuple[str, ...],
    examples: bool,
    create: bool,
    password_env: str | None,
    json_mode: bool,
) -> None:
    """Give an existing PostgreSQL ROLE exactly what workers, beat, console and CLI need.

    SELECT/INSERT/UPDATE on saga_checkpoints; SELECT/INSERT on saga_audit_logs (and USAGE
    on its id sequence) and saga_settings; SELECT on saga_alembic_version; USAGE on the
    schema. Nothing else: no UPDATE, DELETE or TRUNCATE of the audit trail, no DDL, so the
    role cannot disable or drop the append-only triggers. Run it as the tables' owner (the
    migration's SAGA_DATABASE_URL), after `db upgrade`; running it again is harmless.
    Refused (exit 4), before any GRANT, for an unknown role (unless --create), a superuser,
    the owner, a role with (or a member of one with) CREATEROLE, REPLICATION or BYPASSRLS,
    and a --table that is missing or is a saga table. Exits 1 when the role can still do
    more through PUBLIC or a role membership (it says what to revoke).
    """
    import os

    from ..errors import ConfigurationError
    from ..store.grants import grant_runtime

    _json_errors(json_mode)
    password = None
    if password_env is not None:
        password = os.environ.get(password_env)
        if not password:
            raise ConfigurationError(
                f"environment variable {password_env} (named by --password-env) is not set or "
                "empty; set it to the run-time role's password"
            )
    engine, safe_url = _engine()
    extra = tables
    with _database(safe_url):
        if examples and engine.dialect.name == "postgresql":
            from ..examples.tables import create_tables

            extra = (*extra, *create_tables(engine))
        report = grant_runtime(
            engine, role, tuple(dict.fromkeys(extra)), create=create, password=password
        )
    engine.dispose()
    out = Output(json_mode)
    if json_mode:
        out.json(report.as_dict())
    else:
        out.table(
            ["TABLE", "PRIVILEGES"],
            [[t, ", ".join(p)] for t, p in report.tables.items()]
            + [[f"{report.schema}.{s}", "USAGE (sequence)"] for s in report.sequences],
            title=f"role {role}{' (created)' if report.created else ''} at {safe_url}",
        )
    for line in report.excess:
        click.echo(f"warning: {role} can still use {line}", err=True)
    if report.excess:
        raise click.exceptions.Exit(EXIT_PROBLEMS)


@db.command("move-key")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@JSON_OPTION
def db_move_key(path: Path, json_mode: bool) -> None:
    """Move the signing key an earlier saga_worker kept in the database into PATH.

    saga_worker 0.2 and earlier generated the key into saga_settings, where the run-time
    role can read it. This writes it to PATH (mode 600; an existing file is refused), keeps
    only its fingerprint in the database and deletes the key. Run it once as the tables'
    owner, then give every worker, beat and CLI SAGA_SIGNING_KEY_FILE=PATH.
    """
    from ..audit.redaction import Redactor
    from ..store.keyring import move_stored_key
    from ..store.repository import SagaStore

    _json_errors(json_mode)
    engine, safe_url = _engine()
    with _database(safe_url):
        fingerprint = move_stored_key(SagaStore(engine, Redactor(())), path)
    engine.dispose()
    out = Output(json_mode)
    if json_mode:
        out.json({"path": str(path), "fingerprint": fingerprint})
    else:
        click.echo(
            f"moved the signing key to {path} (fingerprint {fingerprint[:12]}...); "
            f"set SAGA_SIGNING_KEY_FILE={path} for every worker, beat and CLI"
        )
