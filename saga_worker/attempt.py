"""Running one attempt of a local step in this process, and its outcome as an event.

Shared by the worker's step tasks and `saga_worker.testing`'s harness, so that a unit test
runs a step exactly as a worker does: the same `StepInput`, the same timeout check, the same
output check, the same exception -> `StepFailed` mapping.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from typing import Any

from .config import Settings
from .core.definition import SagaDefinition, StepInput, idempotency_key
from .core.events import StepFailed, StepSucceeded
from .core.failure import (
    MAX_ERROR_CHARS,
    MAX_TRACE_CHARS,
    named_non_retryable,
    storable_text,
)
from .core.model import Direction, JSONObject
from .errors import InvalidRequest
from .requests import check_context


@dataclass(frozen=True)
class AttemptRun:
    """What one attempt did: the event to apply, and the exception the step raised, if any."""

    event: StepSucceeded | StepFailed
    error: Exception | None = None


def run_attempt(
    definition: SagaDefinition,
    saga_id: str,
    step_index: int,
    direction: Direction,
    attempt: int,
    context: JSONObject,
    settings: Settings,
    *,
    timeout_errors: tuple[type[BaseException], ...] = (),
) -> AttemptRun:
    """Call the step's local function for this attempt and describe what happened.

    `timeout_errors` are exceptions that mean the attempt was interrupted for running too long
    (Celery's SoftTimeLimitExceeded in a worker); a run past its timeout that returns anyway
    fails as a timeout too.
    """
    step = definition.steps[step_index]
    function = step.target(direction)
    if not callable(function):
        raise TypeError(f"{step.name} has no local {direction.value} function")
    timeout = definition.timeout(step_index, direction, settings.default_step_timeout_seconds)
    call = StepInput(
        saga_id=saga_id,
        saga_type=definition.saga_type,
        step_name=step.name,
        direction=direction,
        attempt=attempt,
        idempotency_key=idempotency_key(saga_id, step.name, direction),
        context=dict(context),
    )
    ref = (step_index, direction, attempt)
    started = time.monotonic()
    try:
        output = function(call)
    except timeout_errors:
        return AttemptRun(timed_out(*ref, timeout, (time.monotonic() - started) * 1000))
    except Exception as exc:
        event = StepFailed(
            *ref,
            error_type=type(exc).__name__,
            message=describe(exc),
            stack_trace=storable_text(traceback.format_exc(), MAX_TRACE_CHARS, keep_end=True),
            # saga_worker's NonRetryableStepError, or any class of that name: the convention
            # remote services follow without importing saga_worker.
            retryable=not any(named_non_retryable(c.__name__) for c in type(exc).__mro__),
            duration_ms=(time.monotonic() - started) * 1000,
        )
        return AttemptRun(event, exc)
    elapsed_ms = (time.monotonic() - started) * 1000
    if elapsed_ms > timeout * 1000:
        return AttemptRun(timed_out(*ref, timeout, elapsed_ms))
    problem = output_problem(output, settings)
    if problem is not None:
        return AttemptRun(StepFailed(*ref, "StepOutputError", problem, duration_ms=elapsed_ms))
    return AttemptRun(StepSucceeded(*ref, dict(output or {}), elapsed_ms))


def output_problem(output: Any, settings: Settings) -> str | None:
    """Why a step's output cannot be merged into the context (None: it can)."""
    if output is None:
        return None
    try:
        check_context(output, settings, "step output")
    except InvalidRequest as exc:
        return f"{exc} (a step must return a JSON object or None)"
    return None


def timed_out(
    step_index: int, direction: Direction, attempt: int, timeout: float, elapsed_ms: float
) -> StepFailed:
    """The failure of an attempt that ran past its timeout."""
    return StepFailed(
        step_index,
        direction,
        attempt,
        error_type="StepTimeout",
        message=f"attempt ran {elapsed_ms / 1000:.1f}s, past its {timeout:g}s timeout",
        timed_out=True,
        duration_ms=elapsed_ms,
    )


def describe(exc: BaseException) -> str:
    """An exception's message as storable text (its type name when it has none)."""
    try:
        text = str(exc)
    except Exception:
        text = f"<{type(exc).__name__} whose message cannot be rendered>"
    return storable_text(text or type(exc).__name__, MAX_ERROR_CHARS)
