"""Output for the CLI: Rich on a terminal, plain aligned text otherwise, JSON with --json.

Also the exit codes, the one-line error reporting, and the time option type.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import IO, Any

import click

#: Exit codes, stable for scripts (also listed in `saga-worker --help`).
EXIT_OK = 0
EXIT_PROBLEMS = 1  # verify found problems, a demo saga ended wrong, a message was not sent
EXIT_USAGE = 2  # bad option, filter or argument (Click's own code for usage errors)
EXIT_NOT_FOUND = 3  # no saga with that id
EXIT_REFUSED = 4  # retry/abort/migrate does not apply to the saga; db grant refused
EXIT_UNAVAILABLE = 5  # database or broker unreachable, database not migrated
EXIT_CONFIG = 6  # a SAGA_* setting is malformed or names something that does not exist
EXIT_INTERNAL = 70  # a bug: reported in one line (SAGA_CLI_DEBUG=1 shows the traceback)
EXIT_BROKEN_PIPE = 141  # stdout's reader went away (`| head`): 128 + SIGPIPE, nothing printed

#: `--json` of every command that prints: JSON for scripts instead of tables.
JSON_OPTION = click.option("--json", "json_mode", is_flag=True, help="Print JSON for scripts.")

EXIT_CODES_HELP = (
    "Exit codes: 0 ok; 1 problems found (verify), action incomplete, or a waited-for saga "
    "did not complete; 2 bad usage or filter; 3 unknown saga; 4 action refused (the saga's "
    "state, or db grant to an unknown or owning role); 5 database or broker unreachable, "
    "or database not migrated; 6 configuration error (fix the SAGA_* variable named); "
    "70 internal error; 141 the reader of the output went away (`| head`)."
)

STATE_STYLES = {
    "RUNNING": "cyan",
    "COMPENSATING": "yellow",
    "COMPLETED": "green",
    "COMPENSATED": "magenta",
    "ABORTED": "magenta",
    "FAILED": "bold red",
}


class Output:
    """Prints tables, key/value blocks and lines; Rich only when stdout is a terminal."""

    def __init__(
        self, json_mode: bool = False, *, rich: bool | None = None, file: IO[str] | None = None
    ) -> None:
        self.file: IO[str] = file if file is not None else sys.stdout
        self.json_mode = json_mode
        self.rich = (not json_mode) and (_isatty(self.file) if rich is None else rich)
        self._console: Any = None
        if self.rich:
            from rich.console import Console

            self._console = Console(file=self.file, force_terminal=True, highlight=False)

    def json(self, data: Any) -> None:
        self.file.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
        self.file.flush()

    def line(self, text: str = "", style: str | None = None) -> None:
        if self._console is not None:
            from rich.text import Text

            self._console.print(Text(text, style=style or ""))
        else:
            self.file.write(text + "\n")

    def fields(self, pairs: Sequence[tuple[str, str]], title: str | None = None) -> None:
        """A block of `label  value` lines (a two-column grid on a terminal)."""
        if self._console is not None:
            from rich.table import Table

            grid = Table.grid(padding=(0, 2))
            grid.add_column(style="bold")
            grid.add_column(overflow="fold")
            for label, value in pairs:
                grid.add_row(label, _styled(value))
            if title:
                self._console.rule(title, align="left")
            self._console.print(grid)
            return
        width = max((len(label) for label, _ in pairs), default=0)
        for label, value in pairs:
            lines = value.splitlines() or [""]
            self.file.write(f"{label:<{width}}  {lines[0]}\n")
            for more in lines[1:]:
                self.file.write(f"{'':<{width}}  {more}\n")

    def table(
        self,
        columns: Sequence[str],
        rows: Sequence[Sequence[str]],
        *,
        title: str | None = None,
        max_width: int = 60,
    ) -> None:
        """Rows under a header; plain mode pads columns and shortens long cells."""
        if self._console is not None:
            from rich.table import Table

            table = Table(title=title, title_justify="left", header_style="bold")
            for column in columns:
                table.add_column(column, overflow="fold", max_width=max_width)
            for row in rows:
                table.add_row(*(_styled(cell) for cell in row))
            self._console.print(table)
            return
        cells = [[_clip(c.replace("\n", " "), max_width) for c in row] for row in rows]
        widths = [len(c) for c in columns]
        for row in cells:
            widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
        if title:
            self.file.write(title + "\n")
        self.file.write(_join(columns, widths) + "\n")
        for row in cells:
            self.file.write(_join(row, widths) + "\n")


def _join(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _styled(value: str) -> Any:
    from rich.text import Text

    style = STATE_STYLES.get(value)
    return Text(value, style=style) if style else Text(value)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


# ------------------------------------------------------------------- formatting ---


def ts(value: datetime | str | None, *, micro: bool = False) -> str:
    """A UTC timestamp for humans: `2026-11-27 07:44:31Z` (microseconds on request)."""
    if value is None:
        return "-"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%d %H:%M:%S.%f" if micro else "%Y-%m-%d %H:%M:%S") + "Z"


def ago(moment: datetime, now: datetime) -> str:
    """`in 12s` / `35s ago`, for deadlines."""
    seconds = (moment - now).total_seconds()
    text = _span(abs(seconds))
    return f"in {text}" if seconds >= 0 else f"{text} ago"


def _span(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def dash(value: Any) -> str:
    if value is None or value == "" or value == [] or value == ():
        return "-"
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return str(value)


# ------------------------------------------------------------------- time option ---

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$", re.IGNORECASE)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class TimeType(click.ParamType):  # type: ignore[type-arg]
    """ISO 8601 date or time (UTC unless it has an offset), `now`, or an age like 2h / 7d."""

    name = "TIME"

    def __init__(self, clock: Callable[[], datetime] | None = None) -> None:
        self.clock = clock or (lambda: datetime.now(UTC))

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, datetime):
            return value
        text = str(value).strip()
        if text.lower() == "now":
            return self.clock()
        match = _RELATIVE.match(text)
        if match:
            amount = float(match.group(1)) * _UNITS[match.group(2).lower()]
            return self.clock() - timedelta(seconds=amount)
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            self.fail(
                f"{text!r} is not a time: use ISO 8601 (2026-11-27, 2026-11-27T08:00:00Z), "
                "'now', or an age such as 30m, 2h, 7d",
                param,
                ctx,
            )
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


TIME = TimeType()


# ------------------------------------------------------------------------ errors ---


def exit_code_for(exc: BaseException) -> int:
    """The exit code of an exception that reached the top of a command."""
    from sqlalchemy.exc import DBAPIError, OperationalError

    from ..errors import (
        BrokerUnavailable,
        ConfigurationError,
        DatabaseUnavailable,
        GrantRefused,
        InvalidFilter,
        InvalidRequest,
        OperationRefused,
        SagaError,
        SagaNotFound,
        UnknownDefinitionVersion,
        UnknownSagaType,
    )

    if isinstance(exc, SagaNotFound):
        return EXIT_NOT_FOUND
    if isinstance(exc, InvalidFilter | InvalidRequest):
        return EXIT_USAGE
    if isinstance(exc, OperationRefused | GrantRefused):
        return EXIT_REFUSED
    if isinstance(exc, ConfigurationError):
        return EXIT_CONFIG
    if isinstance(
        exc, DatabaseUnavailable | BrokerUnavailable | UnknownSagaType | UnknownDefinitionVersion
    ):
        return EXIT_UNAVAILABLE
    if isinstance(exc, OperationalError | DBAPIError):
        return EXIT_UNAVAILABLE
    if isinstance(exc, SagaError):
        return EXIT_PROBLEMS
    return EXIT_INTERNAL


def error_message(exc: BaseException) -> str:
    """One line, no traceback; driver errors name the database without its password."""
    from sqlalchemy.exc import DBAPIError, OperationalError

    from ..errors import SagaError

    if isinstance(exc, SagaError):
        text = str(exc)
    elif isinstance(exc, OperationalError | DBAPIError):
        text = f"database error: {_first_line(str(exc.orig or exc))}"
    else:
        text = f"unexpected {type(exc).__name__}: {_first_line(str(exc))}"
    return _squash(text)


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else ""


def _squash(text: str) -> str:
    return "; ".join(line.strip(" -") for line in text.splitlines() if line.strip())


def emit_error(json_mode: bool, code: int, message: str, kind: str) -> None:
    click.echo(f"error: {message}", err=True)
    if json_mode:
        click.echo(json.dumps({"error": {"code": kind, "exit_code": code, "message": message}}))


# ----------------------------------------------------------------------- logging ---


class OneLineFormatter(logging.Formatter):
    """Log records as one redacted line: message, then the exception's type and first line."""

    def __init__(self, redact: Callable[[str | None], str | None]) -> None:
        super().__init__()
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            message = f"{message} ({type(exc).__name__}: {_first_line(str(exc))})"
        return f"saga-worker: {record.levelname.lower()}: {self.redact(message) or ''}"


def setup_logging(redact: Callable[[str | None], str | None]) -> None:
    """Warnings of the libraries reach stderr as one redacted line, never a traceback."""
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler.formatter, OneLineFormatter):
            handler.formatter.redact = redact
            return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(redact))
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)


# ----------------------------------------------------------------------- progress ---


@contextmanager
def progress_bar(label: str, enabled: bool) -> Iterator[Callable[[int, int | None], None] | None]:
    """A Rich progress bar on stderr when it is a terminal; None (no callback) otherwise."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def stderr_is_terminal() -> bool:
    return _isatty(sys.stderr)
