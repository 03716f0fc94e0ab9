"""Issue 14, item 7: a refused start cannot grow the audit table by more than a bounded
snapshot: at most 4 KiB of the submitted context is kept, plus the SHA-256 and size of
everything that was submitted (canonical JSON), which whoever holds the original can check."""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

import pytest

from tests.waiting import wait_for

from .conftest import Stack

pytestmark = pytest.mark.integration


def _digest(context: dict[str, Any]) -> dict[str, Any]:
    raw = json.dumps(context, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return {"sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}


def _rows(stack: Stack, saga_id: str) -> list[dict[str, Any]]:
    return wait_for(lambda: stack.store.audit_trail(saga_id), 60, f"the rejection of {saga_id}")


@pytest.mark.parametrize("stack", ["postgres"], indirect=True)
def test_a_rejected_start_keeps_4_kib_of_context_and_the_digest_of_all(stack: Stack) -> None:
    small = {"strategy_id": 1, "note": "é" * 100}
    large = {"strategy_id": 2, "blob": "x" * 20_000}  # within SAGA_MAX_CONTEXT_BYTES
    ids = {}
    for name, context in (("small", small), ("large", large)):
        ids[name] = f"rej-{name}-{uuid.uuid4().hex[:8]}"
        stack.send(
            "saga.start",
            {"saga_type": "no_such_saga", "saga_id": ids[name], "context": context},
        )
    rows = {name: _rows(stack, saga_id) for name, saga_id in ids.items()}
    (small_row,) = rows["small"]
    (large_row,) = rows["large"]
    assert small_row["event_type"] == large_row["event_type"] == "saga_rejected"
    assert small_row["context_snapshot"] == small
    assert small_row["event_data"]["submitted"] == _digest(small)
    assert not large_row["context_snapshot"]  # no snapshot: the digest stands for it
    assert large_row["event_data"]["submitted"] == _digest(large)
    assert len(json.dumps(large_row, default=str)) < 4096 + 2048
