"""`saga-worker`: the operator's command line. Thin: it builds a `SagaClient`, calls it, and
prints what it returns (Rich on a terminal, plain text in a pipe, JSON with --json).

Command groups live in sibling modules: sagas.py (status, list, retry, abort), migrate.py
(migrate), versions.py (versions), start.py (start), audit.py (audit show/export/verify), db.py
(db upgrade/current/history/grant), processes.py (worker, beat, demo).
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

import click

from ._output import (
    EXIT_BROKEN_PIPE,
    EXIT_CODES_HELP,
    EXIT_INTERNAL,
    emit_error,
    error_message,
    exit_code_for,
    setup_logging,
)

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def exit_on_broken_pipe() -> NoReturn:
    """stdout's reader went away (`saga-worker db upgrade --sql | head`): end quietly, as
    https://docs.python.org/3/library/signal.html#note-on-sigpipe does it. stdout is pointed
    at /dev/null so that the flush at exit does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    sys.exit(EXIT_BROKEN_PIPE)


class SagaGroup(click.Group):
    """A group that turns any error of a command into one line and a meaningful exit code."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:  # --help and --version print while the arguments are parsed
            return super().make_context(info_name, args, parent, **extra)
        except BrokenPipeError:
            exit_on_broken_pipe()

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except BrokenPipeError:
            exit_on_broken_pipe()
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except Exception as exc:
            from ..errors import SagaError

            code = exit_code_for(exc)
            if code == EXIT_INTERNAL and os.environ.get("SAGA_CLI_DEBUG"):
                traceback.print_exc()
            kind = getattr(exc, "code", None) if isinstance(exc, SagaError) else None
            emit_error(
                bool(ctx.meta.get("saga_json")),
                code,
                error_message(exc),
                str(kind or type(exc).__name__),
            )
            ctx.exit(code)


@click.group(cls=SagaGroup, context_settings=CONTEXT_SETTINGS, epilog=EXIT_CODES_HELP)
@click.version_option(package_name="saga_worker", prog_name="saga-worker")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Durable sagas on Celery: run the demo, migrate the database, inspect and operate sagas.

    Configuration comes from SAGA_* environment variables (SAGA_DATABASE_URL,
    SAGA_BROKER_URL, SAGA_IMPORTS, ...), the same the workers use.
    """
    from ..audit.redaction import Redactor
    from ..config import DEFAULT_REDACT_KEYS

    setup_logging(Redactor(DEFAULT_REDACT_KEYS).text)


def client_from(ctx: click.Context, json_mode: bool = False) -> Any:
    """The `SagaClient` of this invocation (built once; tests pass a factory as `obj`)."""
    root = ctx.find_root()
    root.meta["saga_json"] = json_mode
    client = root.meta.get("saga_client")
    if client is None:
        factory: Callable[[], Any] | None = root.obj if callable(root.obj) else None
        if factory is None:
            from ..client import SagaClient
            from ..config import Settings
            from ..metrics.serve import operator_hooks

            settings = Settings.from_env()
            # Operator actions count on the workers' /metrics (when SAGA_METRICS_DIR is set).
            client = SagaClient(settings, hooks=operator_hooks(settings))
        else:
            client = factory()
        root.meta["saga_client"] = client
        if factory is None:
            root.call_on_close(client.close)
        setup_logging(client.redactor.text)
    return client


def _register() -> None:
    from . import audit, db, migrate, processes, sagas, start, versions, waits, web

    for module in (sagas, waits, migrate, versions, start, audit, db, processes, web):
        module.register(main)


_register()


def run() -> None:
    """Console entry point (`saga-worker`)."""
    try:
        main(prog_name="saga-worker")
    finally:
        # What is still buffered goes out now, where a closed pipe can be told apart.
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            exit_on_broken_pipe()
