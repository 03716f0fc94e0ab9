"""db upgrade: create or migrate the tables."""

from __future__ import annotations

import click


def register(main: click.Group) -> None:
    main.add_command(db)


@click.group()
def db() -> None:
    """Database schema commands."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Alembic revision.")
def db_upgrade(revision: str) -> None:
    """Create or migrate the tables in SAGA_DATABASE_URL (embedded SQLite when unset)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError

    from ..client import DatabaseUnavailable
    from ..config import Settings
    from ..store.migrate import upgrade
    from ..store.repository import create_db_engine

    settings = Settings.from_env()
    safe_url = make_url(settings.database_url).render_as_string(hide_password=True)
    try:
        upgrade(create_db_engine(settings.database_url, pool=False), revision)
    except OperationalError as exc:
        first = (str(exc.orig).strip().splitlines() or ["?"])[0]
        raise DatabaseUnavailable(f"cannot reach the database at {safe_url}: {first}") from None
    click.echo(f"database at {safe_url} is at revision {revision}")
