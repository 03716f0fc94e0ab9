"""Run the Alembic migrations that ship inside the package; read the schema's revision."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from typing import TextIO

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

#: Alembic's revision table; its own name so that an application's Alembic history in the
#: same database (`alembic_version`) is untouched.
VERSION_TABLE = "saga_alembic_version"


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
    """The revision the database is at, or None before the first `upgrade`."""
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
