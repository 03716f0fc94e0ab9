"""audit show / export / verify / anchor: read, hand over, check and anchor the audit trail."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ._output import (
    EXIT_PROBLEMS,
    JSON_OPTION,
    TIME,
    Output,
    dash,
    progress_bar,
    stderr_is_terminal,
    ts,
)

if TYPE_CHECKING:
    from ..audit.archive import AuditArchive


def register(main: click.Group) -> None:
    main.add_command(audit)


@click.group()
def audit() -> None:
    """The audit trail: timeline of a saga, export for auditors, tamper check."""


@audit.command("show")
@click.argument("saga_id")
@JSON_OPTION
@click.pass_context
def show(ctx: click.Context, saga_id: str, json_mode: bool) -> None:
    """A saga's audit timeline as a table, and whether its hash chain is intact."""
    timeline = _archive(ctx, json_mode).timeline(saga_id)
    out = Output(json_mode)
    if json_mode:
        out.json(
            {
                "saga_id": saga_id,
                "chain_ok": not timeline.problems,
                "problems": [p.as_dict() for p in timeline.problems],
                "events": [_jsonable(r) for r in timeline.rows],
            }
        )
        return
    out.table(
        ["ID", "TIME (UTC)", "EVENT", "STEP", "STATE", "RETRY", "MS", "USER", "ERROR"],
        [
            [
                str(r["id"]),
                ts(r["timestamp"], micro=True),
                r["event_type"],
                "-" if r["step_name"] is None else f"{r['step_index']}:{r['step_name']}",
                f"{r['saga_state_before'] or '-'} -> {r['saga_state_after'] or '-'}",
                dash(r["retry_count"]),
                "-" if r["duration_ms"] is None else f"{r['duration_ms']:.1f}",
                dash(r["user_id"]),
                dash(r["error_message"]),
            ]
            for r in timeline.rows
        ],
        title=f"audit trail of {saga_id}",
        max_width=48,
    )
    if timeline.problems:
        out.line(
            f"hash chain: BROKEN ({len(timeline.problems)} problems); "
            f"see `saga-worker audit verify --saga-id {saga_id}`",
            style="bold red",
        )
    else:
        out.line(f"hash chain: intact ({len(timeline.rows)} rows)", style="green")


@audit.command("export")
@click.option("--since", type=TIME, help="Rows at or after this time (ISO, or an age: 30d).")
@click.option("--until", type=TIME, help="Rows before this time.")
@click.option("--saga-type", help="Only rows of sagas of this type.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "csv"]),
    default="jsonl",
    show_default=True,
    help="JSON Lines (lossless) or CSV (empty cell = NULL, JSON columns as JSON text).",
)
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    help="File to write ('-' for stdout). A FILE.manifest.json is written beside a file.",
)
@JSON_OPTION
@click.pass_context
def export(
    ctx: click.Context,
    since: datetime | None,
    until: datetime | None,
    saga_type: str | None,
    fmt: str,
    output: str,
    json_mode: bool,
) -> None:
    """Stream audit rows with every column and hash, in constant memory.

    The file verifies offline with `saga-worker audit verify --file FILE`. Shows a progress
    bar when stderr is a terminal.
    """
    archive = _archive(ctx, json_mode)
    to_stdout = output == "-"
    with progress_bar("exporting audit rows", stderr_is_terminal()) as progress:
        result = archive.export(
            fmt,
            path=None if to_stdout else Path(output),
            stream=sys.stdout.buffer if to_stdout else None,
            since=since,
            until=until,
            saga_type=saga_type,
            progress=progress,
        )
    summary = (
        f"exported {result.rows} rows of {result.sagas} sagas to {result.path} "
        f"({result.fmt}, sha256 {result.sha256})"
    )
    if to_stdout:
        click.echo(summary, err=True)
    elif json_mode:
        Output(True).json(result.as_dict())
    else:
        Output().line(summary)
        if result.manifest:
            Output().line(f"manifest: {result.manifest}")


@audit.command("anchor")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the anchor (JSON, heads included) to this file instead of stdout.",
)
@click.pass_context
def anchor(ctx: click.Context, output: Path | None) -> None:
    """Append a digest of every saga's chain head to saga_audit_anchors and print it.

    The anchor (a Merkle root over each saga's row count and last hash, with the counts)
    is JSON; keep it outside the database, on write-once storage: `audit verify --anchor
    FILE` then reports any saga or row missing since.
    """
    import json

    from ..audit.anchor import make_anchor
    from . import client_from

    client = client_from(ctx, False)
    made = make_anchor(client.store.engine, client.clock())
    text = json.dumps(made.as_dict(), ensure_ascii=False, indent=1) + "\n"
    if output is not None:
        output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    click.echo(
        f"anchor {made.id}: {made.sagas} sagas, {made.rows} rows, root {made.root}", err=True
    )


@audit.command("verify")
@click.option("--saga-id", help="Verify this saga only.")
@click.option(
    "--file",
    "file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Verify an export file offline instead of the database.",
)
@click.option(
    "--anchor",
    "anchor_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Report every saga or row missing since this anchor (from `audit anchor`).",
)
@JSON_OPTION
@click.pass_context
def verify(
    ctx: click.Context,
    saga_id: str | None,
    file: Path | None,
    anchor_file: Path | None,
    json_mode: bool,
) -> None:
    """Recompute every hash and link; report each modified, deleted, inserted or moved row.

    Against the database, each saga's last row is also compared with the head its
    checkpoint recorded (a deleted last row leaves no broken link). With --anchor, each
    saga and row the anchor recorded must still be there. Exits 1 when anything is wrong.
    """
    if file is not None and saga_id is not None:
        raise click.UsageError("give --saga-id or --file, not both")
    if anchor_file is not None:
        if file is not None or saga_id is not None:
            raise click.UsageError("give --anchor alone")
        _verify_anchor(ctx, anchor_file, json_mode)
        return
    with progress_bar("verifying audit rows", stderr_is_terminal() and saga_id is None) as bar:
        if file is not None:
            ctx.find_root().meta["saga_json"] = json_mode
            from ..audit.archive import verify_export_file

            report = verify_export_file(file, bar)
        else:
            report = _archive(ctx, json_mode).verify(saga_id, bar)
    out = Output(json_mode)
    if json_mode:
        out.json(report.as_dict())
    else:
        for p in report.problems:
            where = f"row {p.row_id}" if p.row_id is not None else "file"
            what = f" ({p.event_type})" if p.event_type else ""
            saga = f" of saga {p.saga_id}" if p.saga_id else ""
            out.line(f"{where}{saga}{what}: {p.kind}: {p.problem}", style="red")
        for note in report.notes:
            out.line(f"note: {note}", style="yellow")
        if report.ok:
            out.line(
                f"OK: {report.rows} rows of {report.sagas} sagas verified ({report.source})",
                style="bold green",
            )
        else:
            out.line(
                f"TAMPERED: {len(report.problems)} problems in {report.rows} rows of "
                f"{report.sagas} sagas ({report.source})",
                style="bold red",
            )
    if not report.ok:
        raise click.exceptions.Exit(EXIT_PROBLEMS)


def _verify_anchor(ctx: click.Context, path: Path, json_mode: bool) -> None:
    import json

    from ..audit.anchor import AnchorFileError, parse_anchor, verify_anchor
    from . import client_from

    try:
        anchored = parse_anchor(json.loads(path.read_text(encoding="utf-8")))
    except (AnchorFileError, ValueError) as exc:
        raise click.UsageError(f"--anchor {path}: {exc}") from exc
    client = client_from(ctx, json_mode)
    problems = verify_anchor(client.store.engine, anchored)
    out = Output(json_mode)
    if json_mode:
        out.json(
            {
                "ok": not problems,
                "anchor": anchored.hash,
                "sagas": anchored.sagas,
                "rows": anchored.rows,
                "problems": [p.as_dict() for p in problems],
            }
        )
    else:
        for p in problems:
            out.line(f"{p.kind}: {p.problem}", style="red")
        if problems:
            out.line(
                f"MISSING: {len(problems)} problems against anchor {anchored.id} "
                f"({anchored.sagas} sagas, {anchored.rows} rows)",
                style="bold red",
            )
        else:
            out.line(
                f"OK: all {anchored.rows} rows of {anchored.sagas} sagas of anchor "
                f"{anchored.id} are there",
                style="bold green",
            )
    if problems:
        raise click.exceptions.Exit(EXIT_PROBLEMS)


def _archive(ctx: click.Context, json_mode: bool) -> AuditArchive:
    """The audit archive of this invocation's database, read through its client's store."""
    from ..audit.archive import AuditArchive
    from . import client_from

    client = client_from(ctx, json_mode)
    return AuditArchive(client.store, client.safe_url, client.clock)


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    from ..audit.export import export_record

    return export_record(row)
