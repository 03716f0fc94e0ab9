"""Issue 14, item 4: text PostgreSQL cannot store is refused once, never retried forever.

Python's ipaddress takes any scope id ("fe80::1%..."), so an ip_address holding a NUL or
longer than its varchar(45) column passed validation and reached the database as a DataError,
which DB_OUTAGE_RETRY re-published forever: the message never succeeded and no rejection
was recorded.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest

from tests.waiting import as_logged, read_logs, wait_for, wait_for_tasks

from .conftest import Stack

pytestmark = [
    pytest.mark.integration,
    pytest.mark.parametrize("stack", ["postgres"], indirect=True),
]

BASE: dict[str, Any] = {"saga_type": "backtest_workflow", "context": {"strategy_id": 1}}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ip_address", "fe80::1%a\x00b"),
        ("ip_address", "fe80::1%" + "x" * 60),
        ("saga_type", "backtest\x00workflow"),
        ("context", {"k": "nul\x00inside"}),
        ("context", {"nul\x00key": 1}),
    ],
)
def test_unstorable_text_in_a_start_is_rejected_once(stack: Stack, field: str, value: Any) -> None:
    saga_id = f"txt-{uuid.uuid4().hex[:12]}"
    task_id = stack.send("saga.start", {**BASE, "saga_id": saga_id, field: value})
    rows = wait_for(
        lambda: stack.store.audit_trail(saga_id),
        60,
        f"the rejection of {saga_id}",
        details=stack.logs,
    )
    wait_for_tasks(stack.worker_logs(), [task_id])
    assert [r["event_type"] for r in rows] == ["saga_rejected"]
    assert rows[0]["error_message"].startswith(f"{field}: "), rows[0]["error_message"]
    assert stack.store.load(saga_id) is None
    # Handled in one run: Celery logged no retry of this message.
    runs = re.findall(
        rf"\[{re.escape(as_logged(task_id))}\] (retry|succeeded)", read_logs(stack.worker_logs())
    )
    assert runs == ["succeeded"], runs
    assert stack.store.audit_trail(saga_id) == rows  # recorded once
