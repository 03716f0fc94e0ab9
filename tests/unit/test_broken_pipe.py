"""Output into a pipe whose reader is gone (`saga-worker db upgrade --sql | head`) ends the
command quietly: no traceback, no `error: unexpected BrokenPipeError`, exit 141 (128 +
SIGPIPE, what a shell reports for a command killed by SIGPIPE)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from saga_worker.cli._output import EXIT_BROKEN_PIPE

SAGA_WORKER = str(Path(sys.executable).with_name("saga-worker"))


def run_into_closed_pipe(args: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    """Run with stdout a real pipe whose read end is already closed."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [SAGA_WORKER, *args],
            env={
                **clean,
                "SAGA_HOME": str(home),
                "SAGA_DATABASE_URL": "postgresql+psycopg://u:pw-x1@127.0.0.1:1/db",
            },
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)


@pytest.mark.parametrize(
    "args",
    [
        ["db", "upgrade", "--sql"],
        ["db", "history"],
        ["db", "history", "--json"],
        ["--help"],
        ["db", "--help"],
        ["--version"],
    ],
)
def test_output_into_a_closed_pipe_exits_quietly(tmp_path: Path, args: list[str]) -> None:
    result = run_into_closed_pipe(args, tmp_path)
    assert result.stderr == ""
    assert result.returncode == EXIT_BROKEN_PIPE == 141


def test_reader_that_stops_early_like_head(tmp_path: Path) -> None:
    """A reader that takes the first line and closes: whatever the timing, no error line."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    process = subprocess.Popen(
        [SAGA_WORKER, "db", "upgrade", "--sql"],
        env={
            **clean,
            "SAGA_HOME": str(tmp_path),
            "SAGA_DATABASE_URL": "postgresql+psycopg://u@h/d",
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    assert process.stdout.readline()
    process.stdout.close()
    stderr = process.stderr.read()
    process.stderr.close()
    assert process.wait(timeout=60) in (0, EXIT_BROKEN_PIPE)
    assert stderr == b""
