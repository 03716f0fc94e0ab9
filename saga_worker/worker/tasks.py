"""The Celery tasks: saga.start, saga.abort, saga.advance, saga.recover and step wrappers."""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Mapping
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import DBAPIError, OperationalError

from .. import registry
from ..core.definition import SagaDefinition, StepInput, idempotency_key
from ..core.events import StepFailed, StepSucceeded
from ..core.model import Direction
from ..errors import InvalidRequest, NonRetryableStepError, SagaError, SagaNotFound
from ..requests import check_context, parse_abort, parse_start, valid_saga_id
from ..store.repository import retry_transient
from ..tokens import token_valid
from .runtime import RuntimeFactory

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 4000

# While the database is down, a task whose in-process retries ran out is re-published with
# backoff rather than dropped: the broker keeps the transition until the database is back.
DB_OUTAGE_RETRY: dict[str, Any] = {
    "acks_late": True,
    "autoretry_for": (OperationalError, DBAPIError),
    "retry_backoff": 1,
    "retry_backoff_max": 30,
    "retry_jitter": True,
    "max_retries": None,
}


def register_core_tasks(app: Any, runtimes: RuntimeFactory) -> None:
    """Register the stable task names of DESIGN.md §2 on `app`."""

    @app.task(name="saga.start", **DB_OUTAGE_RETRY)  # type: ignore[untyped-decorator]
    def saga_start(*args: Any, **kwargs: Any) -> dict[str, Any]:
        rt = runtimes.get()
        raw_id = kwargs.get("saga_id")
        try:
            request = parse_start(args, kwargs, rt.settings)
            registry.get(request.saga_type)
        except SagaError as exc:
            return _reject_start(rt, raw_id, kwargs, exc)
        result = rt.engine.start(request)
        return {"saga_id": result.saga_id, "created": result.created}

    @app.task(name="saga.abort", **DB_OUTAGE_RETRY)  # type: ignore[untyped-decorator]
    def saga_abort(*args: Any, **kwargs: Any) -> dict[str, Any]:
        rt = runtimes.get()
        try:
            saga_id, event = parse_abort(args, kwargs)
            decision = rt.engine.handle(saga_id, event)
        except SagaError as exc:
            log.warning("saga.abort refused: %s", exc)
            return {"accepted": False, "error": str(exc)}
        return {"accepted": decision.changed, "ignored": decision.ignored}

    @app.task(name="saga.advance", **DB_OUTAGE_RETRY)  # type: ignore[untyped-decorator]
    def saga_advance(result: Any = None, **kwargs: Any) -> dict[str, Any]:
        """Results of remote steps (via link/link_error) and of local steps sent late."""
        rt = runtimes.get()
        try:
            saga_id = kwargs["saga_id"]
            step_index = int(kwargs["step_index"])
            direction = Direction(kwargs["direction"])
            attempt = int(kwargs["attempt"])
            outcome = kwargs["outcome"]
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("saga.advance refused: malformed arguments (%s)", type(exc).__name__)
            return {"accepted": False, "error": "malformed arguments"}
        if not valid_saga_id(saga_id) or not token_valid(
            rt.signing_key, kwargs.get("token"), saga_id, step_index, direction.value, attempt
        ):
            log.warning("saga.advance refused for %r: invalid token", saga_id)
            return {"accepted": False, "error": "invalid token"}
        if outcome == "success":
            output = kwargs.get("output", result)
            problem = _output_problem(output, rt.settings)
            event: StepSucceeded | StepFailed
            if problem is None:
                event = StepSucceeded(
                    step_index,
                    direction,
                    attempt,
                    dict(output or {}),
                    duration_ms=kwargs.get("duration_ms"),
                )
            else:
                event = StepFailed(step_index, direction, attempt, "StepOutputError", problem)
        else:
            event = StepFailed(
                step_index,
                direction,
                attempt,
                error_type=str(kwargs.get("error_type") or "RemoteTaskFailed"),
                message=str(
                    kwargs.get("message") or f"remote task {result} failed (see its worker's log)"
                )[:MAX_ERROR_CHARS],
                stack_trace=kwargs.get("stack_trace"),
                retryable=bool(kwargs.get("retryable", True)),
                timed_out=bool(kwargs.get("timed_out", False)),
                duration_ms=kwargs.get("duration_ms"),
            )
        try:
            decision = rt.engine.handle(saga_id, event)
        except SagaNotFound as exc:
            log.warning("saga.advance refused: %s", exc)
            return {"accepted": False, "error": str(exc)}
        return {"accepted": decision.changed, "ignored": decision.ignored}


def register_step_tasks(app: Any, runtimes: RuntimeFactory, definition: SagaDefinition) -> None:
    """One task per local action and compensation, named saga.<type>.<step>[.compensate]."""
    for index, step in enumerate(definition.steps):
        for direction in (Direction.FORWARD, Direction.COMPENSATE):
            target = step.target(direction)
            if target is None or not callable(target):
                continue
            name = definition.task_name(index, direction)
            if name in app.tasks:
                continue
            app.task(name=name, **DB_OUTAGE_RETRY)(_step_task(app, runtimes, name))


def _step_task(app: Any, runtimes: RuntimeFactory, task_name: str) -> Any:
    def run_step(
        *,
        saga_id: str,
        saga_type: str,
        step_index: int,
        direction: str,
        attempt: int,
        token: str,
        context: Mapping[str, Any],
    ) -> dict[str, Any]:
        rt = runtimes.get()
        dir_ = Direction(direction)
        if not token_valid(rt.signing_key, token, saga_id, step_index, dir_.value, attempt):
            log.warning("%s refused for %r: invalid token", task_name, saga_id)
            return {"ran": False, "reason": "invalid token"}
        pending = retry_transient(lambda: rt.store.pending_key(saga_id), what="pending check")
        if pending != (step_index, dir_.value, attempt):
            # A redelivered or superseded attempt: running it again could only repeat work.
            log.info(
                "%s for %s: attempt %s is not pending (%s); skipped",
                task_name,
                saga_id,
                attempt,
                pending,
            )
            return {"ran": False, "reason": "not pending"}
        definition = registry.get(saga_type)
        step = definition.steps[step_index]
        timeout = definition.timeout(step_index, dir_)
        function = step.target(dir_)
        assert callable(function)
        call = StepInput(
            saga_id=saga_id,
            saga_type=saga_type,
            step_name=step.name,
            direction=dir_,
            attempt=attempt,
            idempotency_key=idempotency_key(saga_id, step.name, dir_),
            context=dict(context),
        )
        started = time.monotonic()
        event: StepSucceeded | StepFailed
        try:
            output = function(call)
            elapsed_ms = (time.monotonic() - started) * 1000
            problem = _output_problem(output, rt.settings)
            if elapsed_ms > timeout * 1000:
                event = _timed_out(step_index, dir_, attempt, timeout, elapsed_ms)
            elif problem is not None:
                event = StepFailed(
                    step_index, dir_, attempt, "StepOutputError", problem, duration_ms=elapsed_ms
                )
            else:
                event = StepSucceeded(step_index, dir_, attempt, dict(output or {}), elapsed_ms)
        except SoftTimeLimitExceeded:
            elapsed_ms = (time.monotonic() - started) * 1000
            event = _timed_out(step_index, dir_, attempt, timeout, elapsed_ms)
        except Exception as exc:
            elapsed_ms = (time.monotonic() - started) * 1000
            event = StepFailed(
                step_index,
                dir_,
                attempt,
                error_type=type(exc).__name__,
                message=_describe(exc),
                stack_trace=traceback.format_exc()[-20000:],
                retryable=not isinstance(exc, NonRetryableStepError),
                duration_ms=elapsed_ms,
            )
        try:
            decision = rt.engine.handle(saga_id, event)
        except (OperationalError, DBAPIError):
            # The action ran but its result cannot be committed now. Hand the result to
            # saga.advance, which retries until the database is back, instead of re-running it.
            log.warning(
                "%s for %s: database unavailable; result deferred to saga.advance",
                task_name,
                saga_id,
            )
            app.send_task(
                "saga.advance",
                kwargs=_result_kwargs(event, saga_id, token),
                queue=rt.settings.queue,
                countdown=2,
            )
            return {"ran": True, "outcome": type(event).__name__, "deferred": True}
        return {"ran": True, "outcome": type(event).__name__, "ignored": decision.ignored}

    run_step.__name__ = task_name.replace(".", "_")
    run_step.__qualname__ = run_step.__name__
    return run_step


def _result_kwargs(event: StepSucceeded | StepFailed, saga_id: str, token: str) -> dict[str, Any]:
    """saga.advance kwargs carrying a local step's result."""
    kwargs: dict[str, Any] = {
        "saga_id": saga_id,
        "step_index": event.step_index,
        "direction": event.direction.value,
        "attempt": event.attempt,
        "token": token,
        "duration_ms": event.duration_ms,
    }
    if isinstance(event, StepSucceeded):
        return {**kwargs, "outcome": "success", "output": dict(event.output)}
    return {
        **kwargs,
        "outcome": "failure",
        "error_type": event.error_type,
        "message": event.message,
        "stack_trace": event.stack_trace,
        "retryable": event.retryable,
        "timed_out": event.timed_out,
    }


def _timed_out(
    step_index: int, direction: Direction, attempt: int, timeout: float, elapsed_ms: float
) -> StepFailed:
    return StepFailed(
        step_index,
        direction,
        attempt,
        error_type="StepTimeout",
        message=f"attempt ran {elapsed_ms / 1000:.1f}s, past its {timeout:g}s timeout",
        timed_out=True,
        duration_ms=elapsed_ms,
    )


def _output_problem(output: Any, settings: Any) -> str | None:
    if output is None:
        return None
    try:
        check_context(output, settings, "step output")
    except InvalidRequest as exc:
        return f"{exc} (a step must return a JSON object or None)"
    return None


def _describe(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:
        text = f"<{type(exc).__name__} whose message cannot be rendered>"
    return (text or type(exc).__name__)[:MAX_ERROR_CHARS]


def _reject_start(
    rt: Any, raw_id: Any, kwargs: Mapping[str, Any], exc: SagaError
) -> dict[str, Any]:
    reason = str(exc)
    if not valid_saga_id(raw_id):
        log.warning("saga.start refused (saga_id not usable, nothing recorded): %s", reason)
        return {"accepted": False, "error": reason}
    if rt.store.exists(raw_id):
        log.info("saga.start for existing %s is a duplicate; ignored", raw_id)
        return {"accepted": False, "duplicate": True}
    data: dict[str, Any] = {"field": getattr(exc, "field", None), "code": exc.code}
    saga_type = kwargs.get("saga_type")
    if isinstance(saga_type, str):
        data["saga_type"] = saga_type[:100]
    user_id = kwargs.get("user_id") if isinstance(kwargs.get("user_id"), str) else None
    ip = kwargs.get("ip_address") if isinstance(kwargs.get("ip_address"), str) else None
    rt.engine.reject(
        raw_id,
        reason,
        user_id=(user_id or None) and user_id[:255],
        ip_address=(ip or None) and ip[:45],
        data=data,
    )
    log.warning("saga.start %s rejected: %s", raw_id, reason)
    return {"accepted": False, "error": reason}
