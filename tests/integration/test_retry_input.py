"""Review of issue 13: `saga-worker retry` takes --user and --reason unchecked.

`abort` parses its operator fields like a producer's saga.abort (parse_abort: 1-255
characters, no control characters, UTF-8), and a bad one is a usage error (exit 2) before
anything is written. `retry` builds RetryRequested from them as given: a --user over 255
characters reaches PostgreSQL and comes back as "cannot reach the database" (exit 5), a
--reason holding a byte that is not UTF-8 (argv decodes it to a lone surrogate) is an
internal error (exit 70), and an ANSI escape in --user is stored in the audit trail.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from .conftest import fresh_postgres_database
from .test_audit_trail import Driver
from .test_cli import Cli, _driver_saga, _events

pytestmark = pytest.mark.integration


def _stalled(d: Driver, saga_id: str) -> None:
    d.now = datetime.now(UTC) - timedelta(minutes=10)
    d.start(saga_id)


@pytest.mark.parametrize(
    "options",
    [
        ["--user", "u" * 300],
        ["--user", "ops\x1b[2J\x1b[31mroot"],
        ["--user", "ops", "--reason", "ledger \udcff fixed"],
    ],
    ids=["user-too-long", "user-control-chars", "reason-not-utf8"],
)
def test_retry_refuses_operator_fields_that_abort_refuses(
    pg_admin_url: str, options: list[str]
) -> None:
    url = fresh_postgres_database(pg_admin_url)
    cli = Cli(url)
    saga_id = _driver_saga(url, _stalled)
    before = len(_events(url, saga_id))
    result = cli("retry", saga_id, *options)
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert len(_events(url, saga_id)) == before  # nothing audited
