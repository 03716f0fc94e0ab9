"""The CLI without a database: help, output modes, time options, errors and exit codes."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from saga_worker.audit.chain import GENESIS_HASH, row_hash
from saga_worker.audit.export import ExportWriter
from saga_worker.cli import main
from saga_worker.cli._output import (
    EXIT_NOT_FOUND,
    EXIT_PROBLEMS,
    EXIT_REFUSED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    Output,
    TimeType,
    exit_code_for,
)
from saga_worker.errors import (
    DatabaseUnavailable,
    InvalidFilter,
    OperationRefused,
    SagaNotFound,
    UnknownSagaType,
)

COMMANDS = [
    [],
    ["status"],
    ["list"],
    ["retry"],
    ["abort"],
    ["migrate"],
    ["audit"],
    ["audit", "show"],
    ["audit", "export"],
    ["audit", "verify"],
    ["db"],
    ["db", "upgrade"],
    ["worker"],
    ["beat"],
    ["demo"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "main")
def test_every_command_has_help(command: list[str]) -> None:
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output
    assert len(result.output.splitlines()) > 3


def test_console_script_points_at_the_package() -> None:
    text = Path(__file__).resolve().parents[2].joinpath("pyproject.toml").read_text()
    assert 'saga-worker = "saga_worker.cli:run"' in text
    assert '"saga_worker.cli"' in text  # packaged for non-editable installs


def test_plain_output_is_aligned_text_without_escape_codes() -> None:
    buffer = io.StringIO()
    out = Output(file=buffer)
    assert out.rich is False
    out.table(["A", "STATE"], [["x", "FAILED"], ["longer", "COMPLETED"]])
    out.fields([("saga", "s-1"), ("context", '{\n  "a": 1\n}')])
    text = buffer.getvalue()
    assert "\x1b[" not in text
    assert text.splitlines()[:3] == ["A       STATE", "x       FAILED", "longer  COMPLETED"]
    assert 'context  {\n           "a": 1\n         }' in text


def test_rich_output_on_a_terminal() -> None:
    buffer = io.StringIO()
    out = Output(rich=True, file=buffer)
    out.table(["SAGA", "STATE"], [["s-1", "FAILED"]], title="sagas")
    text = buffer.getvalue()
    assert "\x1b[" in text  # colours
    assert ("s-1" in text and "FAILED" in text and "┃" in text) or "│" in text


def test_json_output_is_one_document() -> None:
    buffer = io.StringIO()
    Output(True, file=buffer).json({"a": [1, "é"]})
    assert json.loads(buffer.getvalue()) == {"a": [1, "é"]}


def test_time_option_accepts_iso_now_and_ages() -> None:
    now = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    t = TimeType(lambda: now)
    assert t.convert("2026-11-27", None, None) == datetime(2026, 11, 27, tzinfo=UTC)
    assert t.convert("2026-11-27T08:00:00+02:00", None, None) == datetime(
        2026, 11, 27, 6, tzinfo=UTC
    )
    assert t.convert("2026-11-27T08:00:00Z", None, None).hour == 8
    assert t.convert("now", None, None) == now
    assert t.convert("90m", None, None) == now - timedelta(minutes=90)
    assert t.convert("7d", None, None) == now - timedelta(days=7)
    with pytest.raises(click.BadParameter, match="not a time"):
        t.convert("yesterday-ish", None, None)


def test_exit_codes_are_distinct_per_kind_of_error() -> None:
    assert exit_code_for(SagaNotFound("x")) == EXIT_NOT_FOUND
    assert exit_code_for(InvalidFilter("x")) == EXIT_USAGE
    assert exit_code_for(OperationRefused("x")) == EXIT_REFUSED
    assert exit_code_for(DatabaseUnavailable("x")) == EXIT_UNAVAILABLE
    assert exit_code_for(UnknownSagaType("t", [])) == EXIT_UNAVAILABLE


def test_bad_time_filter_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["list", "--since", "last tuesday"])
    assert result.exit_code == EXIT_USAGE
    assert "not a time" in result.output


def test_unreachable_database_is_one_line_without_password(tmp_path: Path) -> None:
    env = {"SAGA_DATABASE_URL": "postgresql+psycopg://ops:s3cretpw@127.0.0.1:1/sagas"}
    for args in (["status", "s-1"], ["list"], ["audit", "verify"], ["list", "--json"]):
        result = CliRunner().invoke(main, args, env=env)
        assert result.exit_code == EXIT_UNAVAILABLE, result.output
        assert "s3cretpw" not in result.output
        assert "Traceback" not in result.output
        assert "cannot reach the database at postgresql+psycopg://ops:***@127.0.0.1:1/sagas" in (
            result.stderr
        )
        assert len(result.stderr.strip().splitlines()) == 1
    assert json.loads(result.stdout)["error"]["code"] == "database_unavailable"


def test_database_without_tables_says_to_migrate(tmp_path: Path) -> None:
    env = {"SAGA_DATABASE_URL": f"sqlite:///{tmp_path / 'empty.sqlite3'}"}
    result = CliRunner().invoke(main, ["list"], env=env)
    assert result.exit_code == EXIT_UNAVAILABLE
    assert "saga-worker db upgrade" in result.stderr


def test_verify_file_offline_needs_no_database(tmp_path: Path) -> None:
    path = tmp_path / "export.jsonl"
    prev = GENESIS_HASH
    with path.open("wb") as stream:
        writer = ExportWriter(stream, "jsonl")
        for i in range(3):
            row = {
                "id": i + 1,
                "saga_id": "s",
                "event_type": "step_start",
                "timestamp": datetime(2026, 1, 1, tzinfo=UTC),
                "prev_hash": prev,
            }
            row["hash"] = prev = row_hash(row)
            writer.write(row)
    env = {"SAGA_DATABASE_URL": "postgresql+psycopg://x@127.0.0.1:1/none"}
    ok = CliRunner().invoke(main, ["audit", "verify", "--file", str(path)], env=env)
    assert ok.exit_code == 0, ok.output
    assert "OK: 3 rows of 1 sagas verified" in ok.stdout
    assert "no manifest" in ok.stdout
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[2]]) + "\n")
    bad = CliRunner().invoke(main, ["audit", "verify", "--file", str(path), "--json"], env=env)
    assert bad.exit_code == EXIT_PROBLEMS
    report = json.loads(bad.stdout)
    assert report["ok"] is False
    assert [(p["row_id"], p["kind"]) for p in report["problems"]] == [(3, "broken_link")]
