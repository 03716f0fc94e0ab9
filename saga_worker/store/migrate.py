"""Run the Alembic migrations that ship inside the package; read the schema's revision."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.resources import files
from typing import TextIO

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

log = logging.getLogger(__name__)

#: Alembic's revision table of saga_worker. Not Alembic's default `alembic_version`, so an
#: application's own Alembic history in the same database stays untouched.
VERSION_TABLE = "saga_alembic_version"
LEGACY_VERSION_TABLE = "alembic_version"


@dataclass(frozen=True)
class Revision:
    """One migration script, for `saga-worker db history`."""

    revision: str
    down_revision: str | None
    description: str
    is_head: bool


def alembic_config(engine: Engine | None = None, *, output: TextIO | None = None) -> Config:
    # The scripts live in the top-level migrations/ folder, installed as saga_worker.migrations,
    # so `saga-worker db upgrade` works from any directory.
    cfg = Config(output_buffer=output)
    cfg.set_main_option("script_location", str(files("saga_worker.migrations")))
    if engine is not None:
        cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the database schema to `revision`."""
    cfg = alembic_config(engine)
    with engine.begin() as conn:
        adopt_legacy_version_table(conn, cfg)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def upgrade_sql(database_url: str, output: TextIO, revision: str = "head") -> None:
    """Write the SQL that `upgrade` would run to `output`, without connecting: the URL only
    selects the dialect. For a DBA to review or run by hand."""
    cfg = alembic_config(output=output)
    # ConfigParser interpolation: a literal % in a password must be doubled.
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    command.upgrade(cfg, revision, sql=True)


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None before the first `upgrade` (a 0.1 database
    whose revision is still in `alembic_version` shows None until `upgrade` moves it: see
    `legacy_revision`)."""
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        heads = context.get_current_heads()
    return ",".join(heads) if heads else None


def head_revision() -> str:
    """The newest revision the installed package ships."""
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    return ",".join(heads)


def history() -> list[Revision]:
    """Every shipped migration, newest first."""
    script = ScriptDirectory.from_config(alembic_config())
    heads = set(script.get_heads())
    found = []
    for rev in script.walk_revisions():
        down = rev.down_revision
        found.append(
            Revision(
                revision=rev.revision,
                down_revision=down if isinstance(down, str) or down is None else ",".join(down),
                description=(rev.doc or "").strip().splitlines()[0] if rev.doc else "",
                is_head=rev.revision in heads,
            )
        )
    return found


def adopt_legacy_version_table(conn: Connection, cfg: Config) -> None:
    """Move saga_worker 0.1's revision out of `alembic_version` into VERSION_TABLE.

    0.1 kept its revision in Alembic's default table. It is moved only when that table holds
    one of our revisions and our tables exist: a revision id alone (such as "0001") could be
    another application's.
    """
    held = _legacy_revision(conn, cfg)
    if held is None:
        return
    conn.execute(
        text(
            f"CREATE TABLE {VERSION_TABLE} (version_num VARCHAR(32) NOT NULL, "
            f"CONSTRAINT {VERSION_TABLE}_pkc PRIMARY KEY (version_num))"
        )
    )
    conn.execute(text(f"INSERT INTO {VERSION_TABLE} (version_num) VALUES (:v)"), {"v": held})
    conn.execute(text(f"DELETE FROM {LEGACY_VERSION_TABLE} WHERE version_num = :v"), {"v": held})
    if conn.execute(text(f"SELECT count(*) FROM {LEGACY_VERSION_TABLE}")).scalar_one() == 0:
        conn.execute(text(f"DROP TABLE {LEGACY_VERSION_TABLE}"))
    log.warning(
        "moved saga_worker's schema revision %s from %s to %s",
        held,
        LEGACY_VERSION_TABLE,
        VERSION_TABLE,
    )


def _legacy_revision(conn: Connection, cfg: Config) -> str | None:
    """saga_worker 0.1's revision in `alembic_version`, when our tables exist and that table
    holds exactly one of our revisions (and VERSION_TABLE does not exist yet)."""
    tables = set(inspect(conn).get_table_names())
    if VERSION_TABLE in tables or LEGACY_VERSION_TABLE not in tables:
        return None
    if "saga_checkpoints" not in tables or "saga_audit_logs" not in tables:
        return None
    ours = {rev.revision for rev in ScriptDirectory.from_config(cfg).walk_revisions()}
    held = [
        str(row[0])
        for row in conn.execute(text(f"SELECT version_num FROM {LEGACY_VERSION_TABLE}"))
        if row[0] in ours
    ]
    return held[0] if len(held) == 1 else None


def legacy_revision(engine: Engine) -> str | None:
    """The revision a saga_worker 0.1 database still keeps in `alembic_version` (which
    `upgrade` moves to VERSION_TABLE), or None. None too when that table cannot be read (a
    run-time role without SELECT on another application's `alembic_version`)."""
    from sqlalchemy.exc import DBAPIError

    try:
        with engine.connect() as conn:
            return _legacy_revision(conn, alembic_config())
    except DBAPIError:
        return None
