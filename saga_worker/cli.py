"""`saga-worker`: thin command line over the client; no SQL here."""

from __future__ import annotations

import sys

import click
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from .config import Settings
from .errors import SagaError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Durable sagas on Celery: run the demo, migrate the database, inspect sagas."""


@main.group()
def db() -> None:
    """Database schema commands."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Alembic revision.")
def db_upgrade(revision: str) -> None:
    """Create or migrate the tables in SAGA_DATABASE_URL (embedded SQLite when unset)."""
    from .store.migrate import upgrade
    from .store.repository import create_db_engine

    settings = Settings.from_env()
    safe_url = make_url(settings.database_url).render_as_string(hide_password=True)
    try:
        upgrade(create_db_engine(settings.database_url, pool=False), revision)
    except OperationalError as exc:
        raise click.ClickException(
            f"cannot reach the database at {safe_url}: {str(exc.orig).splitlines()[0]}"
        ) from None
    click.echo(f"database at {safe_url} is at revision {revision}")


@main.command()
@click.option("--keep", is_flag=True, help="Keep the demo's data folder and show worker logs.")
def demo(keep: bool) -> None:
    """Run example sagas on SQLite and a serverless broker with a real Celery worker."""
    from .demo import run_demo

    if not run_demo(click.echo, keep=keep):
        click.echo("demo: a saga did not end as expected", err=True)
        sys.exit(1)


def run() -> None:
    """Console entry point: known errors become one line and exit code 2, not a traceback."""
    try:
        main(standalone_mode=True)
    except SagaError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
