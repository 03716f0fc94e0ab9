"""Run the Alembic migrations that ship inside the package."""

from __future__ import annotations

import logging
from importlib.resources import files

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

log = logging.getLogger(__name__)

#: Alembic's revision table of saga_worker. Not Alembic's default `alembic_version`, so an
#: application's own Alembic history in the same database stays untouched.
VERSION_TABLE = "saga_alembic_version"
LEGACY_VERSION_TABLE = "alembic_version"


def alembic_config(engine: Engine | None = None) -> Config:
    # The scripts live in the top-level migrations/ folder, installed as saga_worker.migrations,
    # so `saga-worker db upgrade` works from any directory.
    cfg = Config()
    cfg.set_main_option("script_location", str(files("saga_worker.migrations")))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the database schema to `revision`."""
    cfg = alembic_config(engine)
    with engine.begin() as conn:
        adopt_legacy_version_table(conn, cfg)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def adopt_legacy_version_table(conn: Connection, cfg: Config) -> None:
    """Move saga_worker 0.1's revision out of `alembic_version` into VERSION_TABLE.

    0.1 kept its revision in Alembic's default table. It is moved only when that table holds
    one of our revisions and our tables exist: a revision id alone (such as "0001") could be
    another application's.
    """
    tables = set(inspect(conn).get_table_names())
    if VERSION_TABLE in tables or LEGACY_VERSION_TABLE not in tables:
        return
    if "saga_checkpoints" not in tables or "saga_audit_logs" not in tables:
        return
    ours = {rev.revision for rev in ScriptDirectory.from_config(cfg).walk_revisions()}
    held = [
        row[0]
        for row in conn.execute(text(f"SELECT version_num FROM {LEGACY_VERSION_TABLE}"))
        if row[0] in ours
    ]
    if len(held) != 1:
        return
    conn.execute(
        text(
            f"CREATE TABLE {VERSION_TABLE} (version_num VARCHAR(32) NOT NULL, "
            f"CONSTRAINT {VERSION_TABLE}_pkc PRIMARY KEY (version_num))"
        )
    )
    conn.execute(text(f"INSERT INTO {VERSION_TABLE} (version_num) VALUES (:v)"), {"v": held[0]})
    conn.execute(text(f"DELETE FROM {LEGACY_VERSION_TABLE} WHERE version_num = :v"), {"v": held[0]})
    if conn.execute(text(f"SELECT count(*) FROM {LEGACY_VERSION_TABLE}")).scalar_one() == 0:
        conn.execute(text(f"DROP TABLE {LEGACY_VERSION_TABLE}"))
    log.warning(
        "moved saga_worker's schema revision %s from %s to %s",
        held[0],
        LEGACY_VERSION_TABLE,
        VERSION_TABLE,
    )
