"""The worker consumer's checks on task message headers (saga_worker/worker/consumer.py)."""

from __future__ import annotations

from typing import Any

import pytest

from saga_worker.worker.consumer import header_problem

GOOD = {"task": "saga.start", "id": "6f1c", "lang": "py"}


@pytest.mark.parametrize(
    ("headers", "encoding", "problem"),
    [
        (GOOD, "utf-8", None),
        (GOOD, "binary", None),
        (GOOD, None, None),
        ({"lang": "py"}, "utf-8", None),  # no task header: Celery's protocol 1 path decides
        (None, "utf-8", "headers are a NoneType"),
        (["task"], "utf-8", "headers are a list"),
        ({**GOOD, "task": ["saga.start"]}, "utf-8", "the task header is a list"),
        ({**GOOD, "task": None}, "utf-8", "the task header is a NoneType"),
        ({"task": "saga.start"}, "utf-8", "no id header"),
        ({**GOOD, "id": ""}, "utf-8", "no id header"),
        ({**GOOD, "id": 7}, "utf-8", "no id header"),
        (GOOD, "x-no-such-codec", "unknown content encoding"),
    ],
)
def test_header_problem(headers: Any, encoding: str | None, problem: str | None) -> None:
    found = header_problem(headers, encoding)
    if problem is None:
        assert found is None
    else:
        assert found is not None and found.startswith(problem), found
