"""status, list, retry, abort: find a saga, see where it is, and act on it."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import click

from ._output import (
    EXIT_PROBLEMS,
    JSON_OPTION,
    TIME,
    Output,
    ago,
    dash,
    ts,
)


def register(main: click.Group) -> None:
    main.add_command(status)
    main.add_command(list_)
    main.add_command(retry)
    main.add_command(abort)


@click.command()
@click.argument("saga_id")
@JSON_OPTION
@click.pass_context
def status(ctx: click.Context, saga_id: str, json_mode: bool) -> None:
    """Show one saga: state, current step, attempts, deadline, error and (redacted) context.

    Exits 3 when no saga has this id.
    """
    from . import client_from

    client = client_from(ctx, json_mode)
    result = client.status(saga_id)
    out = Output(json_mode)
    if json_mode:
        out.json(result.as_dict())
        return
    data = result.as_dict()
    pending = data["pending"]
    now = datetime.now(UTC)
    step = f"{data['current_step_index'] + 1}/{data['total_steps']}"
    if data["current_step"]:
        step += f" {data['current_step']}"
    pairs = [
        ("saga", data["saga_id"]),
        ("type", data["saga_type"]),
        ("key", dash(data["business_key"])),
        ("state", data["state"]),
        ("version", dash(data["definition_version"])),
        ("step", step),
    ]
    if data["parked_at"]:
        parked = datetime.fromisoformat(data["parked_at"])
        pairs.append(
            (
                "parked",
                f"since {ts(parked)} ({ago(parked, now)}): no live worker has its version; "
                "see `saga-worker versions`",
            )
        )
    if data["waiting_for"]:
        since = datetime.fromisoformat(data["waiting_since"])
        kind, _, name = data["waiting_for"].partition(":")
        what = {"signal": f"signal {name!r}", "approval": f"approval {name!r}"}.get(
            kind, f"timer {name!r}"
        )
        due = f"; due {ts(pending['deadline'])}" if pending else ""
        pairs.append(("waiting for", f"{what} since {ts(since)} ({ago(since, now)}){due}"))
    if len(data["attempts"]) > 1:
        running = ", ".join(
            f"{a['step'] or a['step_index']} #{a['attempt']}" for a in data["attempts"]
        )
        pairs.append(("in flight", running))
    if pending:
        of = f" of {pending['max_attempts']}" if pending["max_attempts"] else ""
        attempt = f"{pending['attempt']}{of} ({pending['direction']})"
        if pending["held"] and not data["waiting_for"]:
            attempt += f", waiting until {ts(pending['not_before'])} (retry backoff)"
        pairs.append(("attempt", attempt))
        deadline = datetime.fromisoformat(pending["deadline"])
        flag = "  STALLED: `saga-worker retry` re-sends it" if data["stalled"] else ""
        pairs.append(("deadline", f"{ts(deadline)} ({ago(deadline, now)}){flag}"))
    else:
        pairs.append(("attempt", "-"))
        pairs.append(("deadline", "-"))
    pairs += [
        ("retries", str(data["retries"])),
        ("completed", dash(data["completed_steps"])),
        ("compensated", dash(data["compensated_steps"])),
        ("failed comp.", dash(data["failed_compensations"])),
        ("abort asked", "yes" if data["abort_requested"] else "no"),
        ("error", dash(data["error"])),
        (
            "user",
            dash(data["user_id"]) + (f" from {data['ip_address']}" if data["ip_address"] else ""),
        ),
        ("started", ts(data["started_at"])),
        ("updated", ts(data["updated_at"])),
        ("context", json.dumps(data["context"], indent=2, ensure_ascii=False, sort_keys=True)),
    ]
    out.fields(pairs, title=f"saga {saga_id}")


@click.command("list")
@click.option(
    "--state",
    "states",
    multiple=True,
    metavar="STATE",
    help="RUNNING, COMPENSATING, COMPLETED, COMPENSATED, ABORTED or FAILED (repeatable).",
)
@click.option("--saga-type", help="Only sagas of this type.")
@click.option("--user", "user_id", help="Only sagas started by this user_id.")
@click.option("--since", type=TIME, help="Started at or after: ISO time or an age (2h, 7d).")
@click.option("--until", type=TIME, help="Started before: ISO time or an age.")
@click.option(
    "--waiting", is_flag=True, help="Only sagas waiting for a signal, an approval or a timer."
)
@click.option(
    "--key",
    "business_key",
    metavar="VALUE",
    help="Only sagas with this business key (exact match), e.g. an order id.",
)
@click.option("--page", type=int, default=1, show_default=True, help="Page number (from 1).")
@click.option(
    "--page-size", type=int, default=20, show_default=True, help="Sagas per page (1-500)."
)
@JSON_OPTION
@click.pass_context
def list_(
    ctx: click.Context,
    states: tuple[str, ...],
    saga_type: str | None,
    user_id: str | None,
    since: datetime | None,
    until: datetime | None,
    waiting: bool,
    business_key: str | None,
    page: int,
    page_size: int,
    json_mode: bool,
) -> None:
    """List sagas, newest first, with how many of them are in each state."""
    from . import client_from

    client = client_from(ctx, json_mode)
    result = client.list_sagas(
        states=states,
        saga_type=saga_type,
        user_id=user_id,
        since=since,
        until=until,
        page=page,
        page_size=page_size,
        waiting=waiting,
        business_key=business_key,
    )
    out = Output(json_mode)
    if json_mode:
        out.json(result.as_dict())
        return
    counts = " · ".join(f"{state} {n}" for state, n in result.counts.items() if n)
    if not result.items:
        out.line(f"no sagas match (page {result.page} of {result.pages})")
    else:
        # The KEY column only when a saga on the page has one: most types define none.
        keyed = any(s.business_key is not None for s in result.items)
        key_column = ["KEY"] if keyed else []
        out.table(
            [
                "SAGA ID",
                "TYPE",
                *key_column,
                "STATE",
                "STEP",
                "USER",
                "STARTED (UTC)",
                "UPDATED (UTC)",
                "ERROR",
            ],
            [
                [
                    s.saga_id,
                    s.saga_type,
                    *([dash(s.business_key)] if keyed else []),
                    s.state
                    + (" (parked)" if s.parked_at else "")
                    + (
                        f" (waits {s.waiting_for} since {ts(s.waiting_since)})"
                        if s.waiting_since
                        else ""
                    ),
                    f"{s.current_step_index + 1}/{s.total_steps}",
                    dash(s.user_id),
                    ts(s.started_at),
                    ts(s.updated_at),
                    dash(s.error),
                ]
                for s in result.items
            ],
        )
    out.line(
        f"page {result.page} of {result.pages} · {result.total} sagas"
        + (f" · {counts}" if counts else "")
    )


USER_OPTION = click.option(
    "--user",
    "user_id",
    help="Who runs this, for the audit trail (default: the OS user, or SAGA_OPERATOR).",
)


@click.command()
@click.argument("saga_id")
@USER_OPTION
@click.option(
    "--force",
    is_flag=True,
    help="Re-send the pending attempt even though its deadline has not passed yet.",
)
@click.option("--reason", default="operator retry", show_default=True, help="Recorded in audit.")
@JSON_OPTION
@click.pass_context
def retry(
    ctx: click.Context,
    saga_id: str,
    user_id: str | None,
    force: bool,
    reason: str,
    json_mode: bool,
) -> None:
    """Re-run what is stuck: a FAILED saga's failed compensations, or a stalled saga's attempt.

    A FAILED saga re-runs the compensations that failed, highest step first, each from
    attempt 1. A stalled saga (its pending attempt passed its deadline, or waits in a retry
    backoff) has that attempt re-sent now, with the same idempotency key. Each retry writes
    an audit row naming who ran it. Exits 4 when the saga's state has nothing to retry.
    """
    from ..views import os_user
    from . import client_from

    client = client_from(ctx, json_mode)
    result = client.retry(saga_id, user_id or os_user(), force=force, reason=reason)
    print_action(Output(json_mode), result)


@click.command()
@click.argument("saga_id")
@click.option("--reason", required=True, help="Why; recorded in the audit trail.")
@USER_OPTION
@JSON_OPTION
@click.pass_context
def abort(
    ctx: click.Context, saga_id: str, reason: str, user_id: str | None, json_mode: bool
) -> None:
    """Abort a saga and roll it back, as the producer's saga.abort does.

    An attempt already running cannot be recalled: rollback starts when it reports (if it
    succeeded, it is compensated too). Exits 4 when the saga has already ended or is rolling
    back.
    """
    from ..views import os_user
    from . import client_from

    client = client_from(ctx, json_mode)
    result = client.abort(saga_id, reason, user_id or os_user())
    print_action(Output(json_mode), result)


def print_action(out: Output, result: Any) -> None:
    if out.json_mode:
        out.json(result.as_dict())
    else:
        out.fields(
            [
                ("saga", result.saga_id),
                ("state", f"{result.state_before} -> {result.state_after}"),
                ("audited", dash(result.audit_events)),
                ("sent", dash(result.sent)),
            ],
            title=f"{result.action} of {result.saga_id}",
        )
    for error in result.send_errors:
        click.echo(
            f"warning: not sent ({error}); the recovery sweep re-sends it after its deadline",
            err=True,
        )
    if result.send_errors:
        raise click.exceptions.Exit(EXIT_PROBLEMS)
