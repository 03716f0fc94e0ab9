"""Alembic environment: runs on the connection handed in by `saga_worker.store.migrate`, or
offline (`saga-worker db upgrade --sql`) to print the SQL for a DBA without connecting."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from saga_worker.store.migrate import VERSION_TABLE
from saga_worker.store.tables import metadata

config = context.config


def run_migrations_online() -> None:
    connection: Connection | None = config.attributes.get("connection")
    if connection is None:
        from saga_worker.config import Settings
        from saga_worker.store.repository import create_db_engine

        url = config.get_main_option("sqlalchemy.url") or Settings.from_env().database_url
        engine = create_db_engine(url, pool=False)
        with engine.connect() as conn:
            _run(conn)
        return
    _run(connection)


def run_migrations_offline() -> None:
    from saga_worker.config import Settings

    # The URL only picks the dialect (PostgreSQL or SQLite DDL); nothing connects to it.
    url = config.get_main_option("sqlalchemy.url") or Settings.from_env().database_url
    context.configure(
        url=url,
        target_metadata=metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        version_table=VERSION_TABLE,
    )
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
