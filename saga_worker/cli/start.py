"""start: send saga.start through the broker, as any producer does, and optionally wait."""

from __future__ import annotations

import json
from typing import Any

import click

from ._output import EXIT_PROBLEMS, JSON_OPTION, Output


def register(main: click.Group) -> None:
    main.add_command(start)


def _context(value: str) -> dict[str, Any]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise click.BadParameter(f"must be a JSON object, got {type(parsed).__name__}")
    return parsed


@click.command()
@click.argument("saga_type")
@click.option(
    "--context",
    "context_json",
    default="{}",
    show_default=True,
    metavar="JSON",
    help="The saga's initial context, a JSON object.",
)
@click.option("--saga-id", help="Idempotency key; default: the start message's task id.")
@click.option(
    "--user",
    "user_id",
    help="Who starts it, for the audit trail (default: the OS user, or SAGA_OPERATOR).",
)
@click.option(
    "--wait",
    "wait_seconds",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Wait up to SECONDS for the saga to end; exit 1 unless it ends COMPLETED.",
)
@JSON_OPTION
@click.pass_context
def start(
    ctx: click.Context,
    saga_type: str,
    context_json: str,
    saga_id: str | None,
    user_id: str | None,
    wait_seconds: float | None,
    json_mode: bool,
) -> None:
    """Start a saga: send saga.start on SAGA_BROKER_URL to the saga queue (SAGA_QUEUE).

    Prints the saga id. The workers validate the start; a rejected start (unknown saga type,
    bad context) is only seen with --wait, which also reads the database. Starting an
    existing saga id again starts nothing.
    """
    from ..requests import valid_saga_id
    from ..views import os_user
    from . import client_from

    context = _context(context_json)
    if saga_id is not None and not valid_saga_id(saga_id):
        raise click.BadParameter(
            "must be 1-255 characters of A-Z a-z 0-9 . _ : -", param_hint="--saga-id"
        )
    client = client_from(ctx, json_mode)
    user = user_id or os_user()
    rejected_before = len(client.rejections(saga_id)) if wait_seconds and saga_id else 0
    started = client.start(saga_type, context, saga_id=saga_id, user_id=user)
    out = Output(json_mode)
    result: dict[str, Any] = {
        "saga_id": started,
        "saga_type": saga_type,
        "queue": client.settings.queue,
        "user_id": user,
    }
    if wait_seconds is None:
        if json_mode:
            out.json(result)
        else:
            out.line(started)
        return
    if not json_mode:
        out.line(started)
    saga, rejection = client.wait_started(started, wait_seconds, rejected_before)
    state = saga.state.value if saga is not None else None
    # Shown as `status` shows it: secrets in the error text (a step's exception message,
    # say) masked, in the human and the JSON output alike.
    error = client.redactor.text(saga.error) if saga is not None else None
    rejection = client.redactor.text(rejection)
    result.update(state=state, error=rejection or error)
    result["rejected"] = rejection is not None
    if json_mode:
        out.json(result)
    if rejection is not None:
        click.echo(f"error: saga {started} was rejected: {rejection}", err=True)
    elif saga is None or not saga.state.is_terminal:
        click.echo(
            f"error: saga {started} is {state or 'not started'} after {wait_seconds:g}s "
            f"(is a worker consuming queue {client.settings.queue!r}?)",
            err=True,
        )
    elif state != "COMPLETED":
        click.echo(f"error: saga {started} ended {state}: {error or '-'}", err=True)
    else:
        if not json_mode:
            click.echo(f"saga {started} COMPLETED", err=True)
        return
    raise click.exceptions.Exit(EXIT_PROBLEMS)
