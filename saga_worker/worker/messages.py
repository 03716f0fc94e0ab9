"""Parsing the messages of step and result tasks, strictly; describing what they report."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..attempt import describe
from ..core.model import MAX_ATTEMPT, Direction
from ..errors import InvalidRequest
from ..requests import valid_saga_id

ADVANCE_FIELDS = frozenset(
    {
        "token",
        "outcome",
        "output",
        "duration_ms",
        "error_type",
        "message",
        "stack_trace",
        "retryable",
        "timed_out",
        "start_by",
    }
)
STEP_FIELDS = frozenset({"token", "saga_type", "context", "checkpoint"})
AttemptRef = tuple[str, int, Direction, int]


def parse_attempt_ref(kwargs: Mapping[str, Any], *, extra: frozenset[str]) -> AttemptRef:
    """(saga_id, step_index, direction, attempt) from a result or step message, strictly."""
    allowed = extra | {"saga_id", "step_index", "direction", "attempt"}
    unknown = sorted(str(k) for k in kwargs if k not in allowed)
    if unknown:
        raise InvalidRequest(unknown[0][:60], "unknown argument")
    saga_id = kwargs.get("saga_id")
    if not valid_saga_id(saga_id):
        raise InvalidRequest("saga_id", "must be 1-255 characters of A-Z a-z 0-9 . _ : -")
    assert isinstance(saga_id, str)
    step_index, attempt = kwargs.get("step_index"), kwargs.get("attempt")
    if (
        isinstance(step_index, bool)
        or not isinstance(step_index, int)
        or not 0 <= step_index < 1000
    ):
        raise InvalidRequest("step_index", "must be an integer from 0 to 999")
    if isinstance(attempt, bool) or not isinstance(attempt, int) or not 1 <= attempt <= MAX_ATTEMPT:
        raise InvalidRequest("attempt", f"must be an integer from 1 to {MAX_ATTEMPT}")
    try:
        direction = Direction(str(kwargs.get("direction")))
    except ValueError:
        raise InvalidRequest("direction", "must be 'forward' or 'compensate'") from None
    return saga_id, step_index, direction, attempt


def short(exc: BaseException) -> str:
    return describe(exc)[:300]
