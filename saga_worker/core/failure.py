"""Failed attempts as the engine records them: storable, bounded text and the retry flag.

Pure: the step task and saga.advance build their `StepFailed` here, from an exception of a
local step or from a failure report that reached saga.advance (a remote step's errback, or
a local result deferred while the database was down).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from .events import StepFailed
from .model import Direction

MAX_ERROR_CHARS = 4000
MAX_TRACE_CHARS = 20_000
MAX_TYPE_CHARS = 100
#: An exception class of this name (in any module) fails its step without further attempts;
#: a remote service can follow the convention without importing anything.
NON_RETRYABLE_NAME = "NonRetryableStepError"
REMOTE_FAILED = "RemoteTaskFailed"

# C0 controls but tab, newline and carriage return, and DEL: PostgreSQL refuses NUL in text
# and JSON, and the others garble terminals and log viewers that show the audit row.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_TYPE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


def storable_text(value: Any, limit: int, *, keep_end: bool = False) -> str:
    """`value` as text any database stores, at most `limit` characters.

    Controls are escaped as ``\\xNN`` and lone surrogates (valid in a JSON string, not in
    UTF-8) as ``\\udNNN``. `keep_end` keeps the last characters (a stack trace's useful end).
    """
    text = value if isinstance(value, str) else repr(value)
    # Bound the work before escaping: escapes only lengthen the text.
    text = text[-limit:] if keep_end else text[:limit]
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text[-limit:] if keep_end else text[:limit]


def error_type_name(value: Any) -> str | None:
    """A reported error type when it looks like a (dotted) class name, else None."""
    if isinstance(value, str) and len(value) <= MAX_TYPE_CHARS and _TYPE_NAME.fullmatch(value):
        return value
    return None


def named_non_retryable(error_type: str) -> bool:
    return error_type.rsplit(".", 1)[-1] == NON_RETRYABLE_NAME


def reported_duration(value: Any) -> float | None:
    """A reported duration_ms when it is a finite number >= 0 (not a bool), else None.

    It comes from a message: an integer too large for a float (10**400), Infinity, NaN or a
    negative number is ignored, never an error, so the result it comes with still applies.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def reported_failure(
    step_index: int,
    direction: Direction,
    attempt: int,
    report: Mapping[str, Any],
    task_id: Any = None,
) -> StepFailed:
    """The failed attempt a failure report describes.

    A report without an error type is Celery's own errback call for a remote task: the
    failing worker did not have saga.advance registered, so Celery sent it only the task's
    id (celery/backends/base.py, _call_task_errbacks). Whether the error is worth another
    attempt is then unknown, and the step's policy decides. A report from saga_remote's
    errback (or a deferred local result) carries type, message, trace and retryable.
    """
    duration_ms = reported_duration(report.get("duration_ms"))
    stack = report.get("stack_trace")
    stack_trace = (
        storable_text(stack, MAX_TRACE_CHARS, keep_end=True)
        if isinstance(stack, str) and stack
        else None
    )
    error_type = error_type_name(report.get("error_type"))
    message = report.get("message")
    if error_type is None:
        task = storable_text(task_id, 100) if task_id is not None else "of this attempt"
        detail = (
            storable_text(message, MAX_ERROR_CHARS)
            if isinstance(message, str) and message
            else "Celery passes an errback only the task id: its exception is in the remote "
            "worker's log (saga_remote.install(app) in that service carries it here)"
        )
        text = f"remote task {task} failed: {detail}"
        error_type = REMOTE_FAILED
    else:
        text = message if isinstance(message, str) and message else error_type
    retryable = report.get("retryable", True) is not False and not named_non_retryable(error_type)
    return StepFailed(
        step_index,
        direction,
        attempt,
        error_type=error_type,
        message=storable_text(text, MAX_ERROR_CHARS),
        stack_trace=stack_trace,
        retryable=retryable,
        timed_out=report.get("timed_out") is True,
        duration_ms=duration_ms,
    )
