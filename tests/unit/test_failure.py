"""Failure reports: what a failed attempt (local or remote) leaves in the audit trail."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import saga_remote
from saga_worker.core.failure import (
    MAX_ERROR_CHARS,
    MAX_TRACE_CHARS,
    REMOTE_FAILED,
    reported_duration,
    reported_failure,
    storable_text,
)
from saga_worker.core.model import Direction

FWD = Direction.FORWARD


def test_storable_text_escapes_what_postgresql_or_a_terminal_cannot_take() -> None:
    text = storable_text("card\x00declined\x07\x1b[31m\ud800 ok\ttab\nline", 100)
    assert text == "card\\x00declined\\x07\\x1b[31m\\ud800 ok\ttab\nline"
    text.encode("utf-8")  # no lone surrogate left
    assert storable_text("x" * 10_000, 50) == "x" * 50
    assert storable_text("\x00" * 10_000, 50) == "\\x00" * 12 + "\\x"
    assert storable_text("head" + "y" * 100 + "tail", 10, keep_end=True) == "yyyyyytail"
    assert storable_text(b"\x00", 20) == "b'\\x00'"  # not text: its repr


def test_celerys_bare_errback_names_the_task_and_keeps_the_step_policy() -> None:
    event = reported_failure(1, FWD, 2, {"outcome": "failure"}, task_id="abc-123")
    assert event.error_type == REMOTE_FAILED
    assert event.message.startswith("remote task abc-123 failed: ")
    assert "saga_remote" in event.message
    assert event.retryable and not event.timed_out and event.stack_trace is None


def test_a_reported_exception_is_kept_bounded_and_storable() -> None:
    report = {
        "error_type": "ValueError",
        "message": "ValueError: card\x00declined " + "x" * 100_000,
        "stack_trace": "Traceback (most recent call last):\n" + "\x00" * 50_000 + "\nEND",
        "duration_ms": 12,
    }
    event = reported_failure(0, FWD, 1, report, task_id="t-1")
    assert event.error_type == "ValueError"
    assert event.message.startswith("ValueError: card\\x00declined xxx")
    assert len(event.message) == MAX_ERROR_CHARS
    assert event.stack_trace is not None and event.stack_trace.endswith("\nEND")
    assert len(event.stack_trace) <= MAX_TRACE_CHARS and "\x00" not in event.stack_trace
    assert event.retryable and event.duration_ms == 12.0


@pytest.mark.parametrize(
    ("report", "retryable"),
    [
        ({"error_type": "ValueError", "retryable": False}, False),
        ({"error_type": "NonRetryableStepError"}, False),
        ({"error_type": "billing.errors.NonRetryableStepError"}, False),
        ({"error_type": "NonRetryableStepErrorish"}, True),
        ({"error_type": "ValueError", "retryable": "no"}, True),  # only False says so
    ],
)
def test_non_retryable_reports(report: dict[str, Any], retryable: bool) -> None:
    assert reported_failure(0, FWD, 1, report).retryable is retryable


@pytest.mark.parametrize("error_type", ["", "Value Error", "x\x00", "a" * 101, 42, None])
def test_an_error_type_that_is_no_class_name_is_not_trusted(error_type: Any) -> None:
    event = reported_failure(0, FWD, 1, {"error_type": error_type, "message": "m\x00"}, "t")
    assert event.error_type == REMOTE_FAILED
    assert event.message == "remote task t failed: m\\x00"


# -- saga_remote: the helper a remote service may install --------------------------------------


class CardReported(saga_remote.NonRetryableStepError):
    pass


class NonRetryableStepError(Exception):  # a service's own class of the conventional name
    pass


class Declined(Exception):
    saga_retryable = False


def test_failure_report_of_the_remote_helper() -> None:
    report = saga_remote.failure_report(ValueError("card declined"), "Traceback ...\n")
    assert report == {
        "error_type": "ValueError",
        "message": "ValueError: card declined",
        "retryable": True,
        "timed_out": False,
        "stack_trace": "Traceback ...\n",
    }
    for exc in (CardReported("x"), NonRetryableStepError("y"), Declined("z")):
        assert saga_remote.failure_report(exc)["retryable"] is False
    huge = saga_remote.failure_report(RuntimeError("x" * 100_000), "t" * 100_000)
    assert len(huge["message"]) == saga_remote.MAX_MESSAGE_CHARS
    assert len(huge["stack_trace"]) == saga_remote.MAX_TRACE_CHARS
    json.dumps(huge)  # travels as JSON
    # What the saga side makes of it.
    event = reported_failure(0, FWD, 1, saga_remote.failure_report(CardReported("stolen")))
    assert (event.error_type, event.message, event.retryable) == (
        "CardReported",
        "CardReported: stolen",
        False,
    )


def test_saga_remote_needs_only_the_standard_library() -> None:
    code = (
        "import sys, saga_remote; "
        "assert not [m for m in sys.modules if m.split('.')[0] in "
        "('saga_worker', 'celery', 'kombu', 'sqlalchemy')], sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


@pytest.mark.parametrize(
    "value",
    [10**400, float("inf"), float("-inf"), float("nan"), -1, -0.5, True, False, "12", None],
    ids=lambda v: "10**400" if v == 10**400 else repr(v),
)
def test_unusable_reported_durations_are_ignored_never_raised(value: Any) -> None:
    assert reported_duration(value) is None
    event = reported_failure(0, FWD, 1, {"error_type": "ValueError", "duration_ms": value})
    assert event.duration_ms is None


@pytest.mark.parametrize("value, expected", [(0, 0.0), (12, 12.0), (3.5, 3.5), (10**20, 1e20)])
def test_finite_non_negative_durations_are_kept(value: Any, expected: float) -> None:
    assert reported_duration(value) == expected


def test_saga_remote_task_event_repr_hides_the_token_and_the_exception_text() -> None:
    kwargs = {
        "saga_id": "s1",
        "token": "a" * 64,
        "outcome": "failure",
        **saga_remote.failure_report(RuntimeError("password=hunter2"), "Traceback hunter2\n"),
    }
    shown = saga_remote.shown_kwargs(kwargs)
    assert "a" * 64 not in shown and "hunter2" not in shown
    assert "'error_type': 'RuntimeError'" in shown and "'saga_id': 's1'" in shown
