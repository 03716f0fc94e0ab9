"""`saga-worker signal`, `approve` and `reject`: what a waiting saga waits for, sent by an
operator through the engine, with the operator's identity in the audit trail."""

from __future__ import annotations

import json

import click

from ._output import JSON_OPTION, Output
from .sagas import USER_OPTION, print_action


def register(main: click.Group) -> None:
    main.add_command(signal)
    main.add_command(approve)
    main.add_command(reject)


@click.command()
@click.argument("saga_id")
@click.argument("name")
@click.option(
    "--payload",
    default="{}",
    show_default=True,
    help="A JSON object merged into the saga's context when its wait takes the signal.",
)
@USER_OPTION
@JSON_OPTION
@click.pass_context
def signal(
    ctx: click.Context,
    saga_id: str,
    name: str,
    payload: str,
    user_id: str | None,
    json_mode: bool,
) -> None:
    """Send signal NAME to a saga, as a producer's saga.signal does.

    Its wait takes it now, or keeps it until the wait begins; a signal no wait of the saga
    takes, or a second one of the same name, is recorded once and ignored (exit 4).
    """
    from ..views import os_user
    from . import client_from

    try:
        data = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--payload") from None
    client = client_from(ctx, json_mode)
    print_action(Output(json_mode), client.signal(saga_id, name, data, user_id or os_user()))


def _vote_command(approve: bool) -> click.Command:
    verb = "approve" if approve else "reject"

    @click.command(name=verb)
    @click.argument("saga_id")
    @click.option("--wait", "wait", help="The approval step (default: the one in progress).")
    @click.option("--reason", default="", help="Why; recorded in the audit trail.")
    @USER_OPTION
    @JSON_OPTION
    @click.pass_context
    def vote(
        ctx: click.Context,
        saga_id: str,
        wait: str | None,
        reason: str,
        user_id: str | None,
        json_mode: bool,
    ) -> None:
        from ..views import os_user
        from . import client_from

        client = client_from(ctx, json_mode)
        result = client.vote(
            saga_id, user_id or os_user(), approve=approve, wait=wait, reason=reason
        )
        print_action(Output(json_mode), result)

    vote.help = (
        f"{verb.capitalize()} the approval SAGA_ID waits for, as an identified operator.\n\n"
        "Every vote is audited. A vote by the user who started the saga (when the approval "
        "excludes the starter) or a second vote by the same operator is recorded and refused "
        "(exit 4). "
        + (
            "The approval completes once it has its number of distinct approvers."
            if approve
            else "One rejection fails the approval: the saga rolls back."
        )
    )
    return vote


approve = _vote_command(True)
reject = _vote_command(False)
