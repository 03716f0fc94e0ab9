"""worker, beat, demo: start the processes (thin wrappers around Celery) or the demo."""

from __future__ import annotations

import os
import sys

import click

from ._output import EXIT_PROBLEMS

PASS_THROUGH = {
    "ignore_unknown_options": True,
    "allow_extra_args": True,
    "help_option_names": ["-h", "--help"],
}


def register(main: click.Group) -> None:
    main.add_command(worker)
    main.add_command(beat)
    main.add_command(demo)


def _exec_celery(*argv: str) -> None:
    from ..config import Settings, check_broker_url
    from ..registry import check_modules

    # A malformed SAGA_* setting, a missing SAGA_IMPORTS module, an unknown broker transport
    # or a SAGA_CELERY_CONFIG module that cannot be imported or sets a pinned setting is one
    # line here (exit 6), not a traceback of Celery's after the exec.
    settings = Settings.from_env()
    check_modules(settings.imports)
    check_broker_url(settings.broker_url)
    if settings.celery_config:
        from ..worker.app import celery_config_settings

        celery_config_settings(settings.celery_config)
    command = [sys.executable, "-m", "celery", "-A", "saga_worker.app", *argv]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)


@click.command(context_settings=PASS_THROUGH)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(celery_args: tuple[str, ...]) -> None:
    """Start a Celery worker running every saga of SAGA_IMPORTS.

    Same as `celery -A saga_worker.app worker CELERY_ARGS...`; options such as
    --concurrency, --pool, --loglevel, -Q go to Celery (`saga-worker worker -- --help`
    shows Celery's own help).
    """
    _exec_celery("worker", *celery_args)


@click.command(context_settings=PASS_THROUGH)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def beat(celery_args: tuple[str, ...]) -> None:
    """Start Celery beat, which runs the recovery sweep (saga.recover) periodically.

    Same as `celery -A saga_worker.app beat CELERY_ARGS...`, with the schedule file kept in
    SAGA_HOME unless you pass -s/--schedule.
    """
    from ..config import Settings

    args = list(celery_args)
    if not any(a in ("-s", "--schedule") or a.startswith("--schedule=") for a in args):
        home = Settings.from_env().home
        home.mkdir(parents=True, exist_ok=True)
        args += ["--schedule", str(home / "celerybeat-schedule")]
    _exec_celery("beat", *args)


@click.command()
@click.option("--keep", is_flag=True, help="Keep the demo's data folder and show worker logs.")
def demo(keep: bool) -> None:
    """Run example sagas on SQLite and a serverless broker with a real Celery worker."""
    from ..demo import run_demo

    if not run_demo(click.echo, keep=keep):
        click.echo("demo: a saga did not end as expected", err=True)
        raise click.exceptions.Exit(EXIT_PROBLEMS)
