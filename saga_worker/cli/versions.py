"""versions: what each definition version has in flight, and which live workers have it."""

from __future__ import annotations

import click

from ._output import JSON_OPTION, Output, dash, ts

#: Exit code of `versions --drained` while a named version still has sagas in flight.
EXIT_NOT_DRAINED = 1


def register(main: click.Group) -> None:
    main.add_command(versions)


def _version_arg(value: str) -> tuple[str, str]:
    saga_type, sep, version = value.partition("=")
    if not sep or not saga_type or not version:
        raise click.BadParameter(f"{value!r} is not TYPE=VERSION")
    return saga_type, version


@click.command()
@click.option(
    "--drained",
    "drained",
    multiple=True,
    metavar="TYPE=VERSION",
    help="Exit 1 unless this version has no saga in flight (repeatable): for deploy scripts.",
)
@JSON_OPTION
@click.pass_context
def versions(ctx: click.Context, drained: tuple[str, ...], json_mode: bool) -> None:
    """Per saga type and definition version: sagas running, parked and failed, the oldest,
    and the live workers that have the version (docs/deploys.md).

    A deploy waits until `saga-worker versions --drained TYPE=OLD` exits 0 before it stops
    the last worker of the old version. A version that no saga in flight and no live worker
    has exits 0 too, with a warning on stderr (a mistyped name?).
    """
    from . import client_from

    wanted = [_version_arg(value) for value in drained]
    report = client_from(ctx, json_mode).versions()
    busy = [
        f"{t}={v}"
        for t, v in wanted
        if (line := report.line(t, v)) is not None and line.in_flight > 0
    ]
    for t, v in wanted:
        if report.line(t, v) is None:
            # Drained, as far as anyone can tell; but a typo would pass a deploy script too.
            click.echo(
                f"warning: no saga in flight and no live worker has {t}={v}: drained and "
                "gone, or mistyped? (`saga-worker versions` lists the versions known)",
                err=True,
            )
    out = Output(json_mode)
    if json_mode:
        out.json({**report.as_dict(), "not_drained": busy})
    else:
        out.table(
            ["TYPE", "VERSION", "RUNNING", "PARKED", "FAILED", "OLDEST (UTC)", "LIVE WORKERS"],
            [
                [
                    x.saga_type,
                    dash(x.version),
                    str(x.running),
                    str(x.parked),
                    str(x.failed),
                    ts(x.oldest) if x.oldest else "-",
                    ", ".join(x.workers) or "none",
                ]
                for x in report.lines
            ],
        )
        for name in busy:
            out.line(f"{name} is not drained")
    if busy:
        ctx.exit(EXIT_NOT_DRAINED)
