"""migrate: move sagas in flight to another version of their definition (DESIGN section 9)."""

from __future__ import annotations

from collections.abc import Iterable

import click

from ..views import MigrationResult
from ._output import EXIT_PROBLEMS, EXIT_REFUSED, JSON_OPTION, Output, dash
from .sagas import USER_OPTION


def register(main: click.Group) -> None:
    main.add_command(migrate)


@click.command()
@click.argument("saga_id", required=False)
@click.option("--type", "saga_type", help="With --from: every saga in flight of this type.")
@click.option("--from", "from_version", metavar="VERSION", help="The version to move sagas off.")
@click.option("--to", "to_version", metavar="VERSION", required=True, help="The target version.")
@click.option(
    "--map",
    "pairs",
    multiple=True,
    metavar="OLD=NEW",
    help="Old step OLD is step NEW in the target version (repeatable; others keep their name).",
)
@click.option("--dry-run", is_flag=True, help="Show what each saga would become; change nothing.")
@click.option("--reason", default="operator migration", show_default=True, help="For the audit.")
@USER_OPTION
@JSON_OPTION
@click.pass_context
def migrate(
    ctx: click.Context,
    saga_id: str | None,
    saga_type: str | None,
    from_version: str | None,
    to_version: str,
    pairs: tuple[str, ...],
    dry_run: bool,
    reason: str,
    user_id: str | None,
    json_mode: bool,
) -> None:
    """Move a saga in flight (SAGA_ID), or every saga in flight of --type at version --from,
    to version --to of its definition.

    Completed steps keep their results under their new names (--map OLD=NEW); the saga
    resumes at its next step, or its pending compensation, with a fresh attempt number, on
    the target version's queue. A migration that would skip or re-run a completed step, or
    skip a compensation, is refused with the reason. The target version (and, for sagas
    whose audit trail lacks it, the old one) must be registered by SAGA_IMPORTS. Each
    migration writes a `saga_migrated` audit row naming who ran it. Exits 4 when a saga was
    refused (a batch migrates the others), 1 when a next attempt could not be sent.
    """
    from ..views import os_user
    from . import client_from

    if saga_id is not None and (saga_type or from_version):
        raise click.UsageError("give SAGA_ID, or --type and --from, not both")
    if saga_id is None and not (saga_type and from_version):
        raise click.UsageError("give SAGA_ID, or --type and --from (the version to move off)")
    client = client_from(ctx, json_mode)
    who = user_id or os_user()
    options = {"mapping": list(pairs), "reason": reason, "dry_run": dry_run}
    out = Output(json_mode)
    if saga_id is not None:
        result = client.migrate(saga_id, to_version, who, **options)
        _finish(out, [result], single=True)
        return
    assert saga_type is not None and from_version is not None
    results = client.migrate_version(saga_type, from_version, to_version, who, **options)
    _finish(out, results, single=False)


def _finish(out: Output, results: Iterable[MigrationResult], *, single: bool) -> None:
    """Print each result as it comes (a line each), then the refusals and a summary; JSON
    is one document at the end."""
    kept: list[MigrationResult] = []  # for JSON only: text goes out saga by saga
    refused: list[MigrationResult] = []
    migrated = send_errors = 0
    dry_run = False
    for result in results:
        dry_run = result.dry_run
        migrated += result.migrated
        send_errors += len(result.send_errors)
        if not result.migrated:
            refused.append(result)
        if out.json_mode:
            kept.append(result)
        else:
            out.line(_line(result))
        for error in result.send_errors:
            click.echo(
                f"warning: {result.saga_id}: not sent ({error}); the recovery sweep re-sends "
                "it after its deadline",
                err=True,
            )
    if out.json_mode and single:
        out.json(kept[0].as_dict())
    elif out.json_mode:
        out.json(
            {
                "migrated": migrated,
                "refused": len(refused),
                "dry_run": dry_run,
                "results": [r.as_dict() for r in kept],
            }
        )
    elif not single:
        verb = "would migrate" if dry_run else "migrated"
        out.line(f"{verb} {migrated} saga(s), refused {len(refused)}")
        for result in refused:
            out.line(f"refused {result.saga_id}: {result.refused}")
    if refused:
        raise click.exceptions.Exit(EXIT_REFUSED)
    if send_errors:
        raise click.exceptions.Exit(EXIT_PROBLEMS)


def _line(r: MigrationResult) -> str:
    if not r.migrated:
        return f"{r.saga_id}  {r.state}  refused"
    verb = "would resume" if r.dry_run else "resumes"
    return (
        f"{r.saga_id}  {r.state}  {r.from_version} -> {r.to_version}  {verb} at {r.resume_step} "
        f"({r.direction}, attempt {r.attempt})  completed: {dash(r.completed_steps)}"
        + (f"  compensated: {dash(r.compensated_steps)}" if r.compensated_steps else "")
    )
