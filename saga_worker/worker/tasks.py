"""The Celery tasks: saga.start, saga.abort, saga.advance, saga.recover and step wrappers."""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, NoReturn

from celery.exceptions import Retry, SoftTimeLimitExceeded
from sqlalchemy.exc import DBAPIError, OperationalError

from .. import registry
from ..audit.redaction import Redactor
from ..core.decision import Decision, next_attempt
from ..core.definition import SagaDefinition, StepInput, idempotency_key
from ..core.events import ResultRejected, StepFailed, StepSucceeded
from ..core.failure import (
    MAX_ERROR_CHARS,
    MAX_TRACE_CHARS,
    named_non_retryable,
    reported_duration,
    reported_failure,
    storable_text,
)
from ..core.model import Direction
from ..errors import InvalidRequest, SagaError, SagaNotFound
from ..requests import check_context, parse_abort, parse_start, start_saga_id, valid_saga_id
from ..store.connect import retry_transient
from ..tokens import token_valid
from . import snapshot
from .dispatch import shown_kwargs
from .runtime import RuntimeFactory

log = logging.getLogger(__name__)

# While the database is down, a task whose in-process retries ran out is re-published with
# backoff rather than dropped: the broker keeps the transition until the database is back.
DB_OUTAGE_RETRY: dict[str, Any] = {
    # shared=False: Celery would otherwise add these closures to every app created later in
    # the process, where they would run with the first app's settings.
    "shared": False,
    "acks_late": True,
    "autoretry_for": (OperationalError, DBAPIError),
    "retry_backoff": 1,
    "retry_backoff_max": 30,
    "retry_jitter": True,
    "max_retries": None,
}


def register_core_tasks(app: Any, runtimes: RuntimeFactory) -> None:
    """Register the stable task names of docs/contract.md (Tasks) on `app`."""

    @app.task(name="saga.start", bind=True, **DB_OUTAGE_RETRY)  # type: ignore[untyped-decorator]
    def saga_start(task: Any, /, *args: Any, **kwargs: Any) -> dict[str, Any]:
        rt = runtimes.get()
        message_id = task.request.id
        raw_id = start_saga_id(kwargs, message_id)
        try:
            request = parse_start(args, kwargs, rt.settings, message_id)
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
            outcome = rt.engine.handle(saga_id, event)
        except SagaError as exc:
            log.warning("saga.abort refused: %s", exc)
            return {"accepted": False, "error": str(exc)}
        return {"accepted": outcome.changed, "ignored": outcome.ignored}

    @app.task(name="saga.advance", **DB_OUTAGE_RETRY)  # type: ignore[untyped-decorator]
    def saga_advance(result: Any = None, **kwargs: Any) -> dict[str, Any]:
        """Results of remote steps (via link/link_error) and of local steps sent late."""
        rt = runtimes.get()
        try:
            ref = parse_attempt_ref(kwargs, extra=ADVANCE_FIELDS)
            outcome = kwargs["outcome"]
            if outcome not in ("success", "failure"):
                raise InvalidRequest("outcome", "must be 'success' or 'failure'")
        except (InvalidRequest, KeyError) as exc:
            log.warning("saga.advance refused: %s", _short(exc))
            return {"accepted": False, "error": _short(exc)}
        saga_id, step_index, direction, attempt = ref
        if not token_valid(
            rt.signing_key, kwargs.get("token"), saga_id, step_index, direction.value, attempt
        ):
            log.warning("saga.advance refused for %s: invalid token", saga_id)
            _audit_refusal(rt, "saga.advance", "invalid token", ref)
            return {"accepted": False, "error": "invalid token"}
        event = _advance_event(result, kwargs, ref, outcome == "success", rt.settings)
        try:
            outcome = rt.engine.handle(saga_id, event)
        except SagaNotFound as exc:
            log.warning("saga.advance refused: %s", exc)
            return {"accepted": False, "error": str(exc)}
        if outcome.ignored:
            # A valid token for an attempt that is not pending: a replay or a late duplicate.
            _audit_refusal(rt, "saga.advance", f"not applied: {outcome.ignored}", ref)
        return {"accepted": outcome.changed, "ignored": outcome.ignored}


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
    if isinstance(attempt, bool) or not isinstance(attempt, int) or not 1 <= attempt < 10_000:
        raise InvalidRequest("attempt", "must be an integer from 1 to 9999")
    try:
        direction = Direction(str(kwargs.get("direction")))
    except ValueError:
        raise InvalidRequest("direction", "must be 'forward' or 'compensate'") from None
    return saga_id, step_index, direction, attempt


def _advance_event(
    result: Any, kwargs: Mapping[str, Any], ref: AttemptRef, success: bool, settings: Any
) -> StepSucceeded | StepFailed:
    _, step_index, direction, attempt = ref
    if success:
        duration_ms = reported_duration(kwargs.get("duration_ms"))
        output = kwargs.get("output", result)
        problem = _output_problem(output, settings)
        if problem is None:
            return StepSucceeded(step_index, direction, attempt, dict(output or {}), duration_ms)
        return StepFailed(step_index, direction, attempt, "StepOutputError", problem)
    # `result` is the failed task's id when Celery itself called the errback.
    return reported_failure(step_index, direction, attempt, kwargs, task_id=result)


def _audit_refusal(rt: Any, task: str, reason: str, ref: AttemptRef) -> None:
    saga_id, step_index, direction, attempt = ref
    try:
        rt.engine.handle(saga_id, ResultRejected(task, reason, step_index, direction, attempt))
    except SagaNotFound:
        log.warning("%s refused for unknown saga %s: %s", task, saga_id, reason)


def _short(exc: BaseException) -> str:
    return _describe(exc)[:300]


class StepAttemptFailed(Exception):
    """A step attempt failed and the engine has already recorded it.

    Raised by a step task only after its transition was committed, so that Celery's task
    events and Flower show FAILURE (or RETRY, wrapped in celery's Retry) instead of SUCCESS.
    It is neither a database error (DB_OUTAGE_RETRY's autoretry_for) nor Reject: Celery acks
    the message (acks_late with task_acks_on_failure_or_timeout, its default) and nothing
    is re-published; the engine has already sent the next attempt, if any.
    """

    def __init__(self, error_type: str, message: str) -> None:
        # Both positional, so the exception pickles across the prefork pool as it is.
        super().__init__(error_type, message)
        self.error_type = error_type
        self.message = message

    def __str__(self) -> str:
        return f"{self.error_type}: {self.message}"


# What a failed attempt shows in Flower and in the worker's one log line about it; the
# whole message and stack trace are in the audit trail.
SHOWN_ERROR_CHARS = 500


def _report_failed_attempt(
    event: StepFailed, decision: Decision | None, redactor: Redactor
) -> NoReturn:
    """Raise what makes Celery record the failed attempt as RETRY or FAILURE."""
    # Task events reach Flower unfiltered: mask secrets as the audit trail does, before
    # cutting (a cut card number would no longer be recognised).
    shown = (redactor.text(event.message) or "")[:SHOWN_ERROR_CHARS]
    failure = StepAttemptFailed(event.error_type, shown)
    following = None if decision is None else next_attempt(decision, event)
    if following is None:
        raise failure
    delay = max(0.0, (following.not_before - datetime.now(UTC)).total_seconds())
    # Raised, not task.retry(): Task.retry would publish a copy of this message, while the
    # engine already sent (or holds) the next attempt with its own token and checkpoint.
    raise Retry(exc=failure, when=round(delay, 3))


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
            app.task(
                name=name,
                bind=True,
                # An expected error: Celery logs one line with its text, not a traceback
                # (the audit trail keeps the step's own stack trace).
                throws=(StepAttemptFailed,),
                **DB_OUTAGE_RETRY,
            )(_step_task(app, runtimes, name))


def _sent_again(request: Any) -> bool:
    """Redelivered by the broker or re-published by a retry: possibly superseded."""
    delivery_info = getattr(request, "delivery_info", None) or {}
    return bool(delivery_info.get("redelivered")) or bool(getattr(request, "retries", 0))


def _step_task(app: Any, runtimes: RuntimeFactory, task_name: str) -> Any:
    # `task` is positional-only: a message's own "task" kwarg must reach the strict check.
    def run_step(task: Any, /, **kwargs: Any) -> dict[str, Any]:
        rt = runtimes.get()
        try:
            saga_id, step_index, dir_, attempt = parse_attempt_ref(kwargs, extra=STEP_FIELDS)
            saga_type, context, token = kwargs["saga_type"], kwargs["context"], kwargs["token"]
            definition = registry.get(saga_type)
            if definition.task_name(step_index, dir_) != task_name:
                raise InvalidRequest("step_index", f"does not name {task_name}")
            if not isinstance(context, Mapping):
                raise InvalidRequest("context", "must be a JSON object")
        except (InvalidRequest, KeyError, TypeError, SagaError, IndexError) as exc:
            log.warning("%s refused: %s", task_name, _short(exc))
            return {"ran": False, "reason": _short(exc)}
        if not token_valid(rt.signing_key, token, saga_id, step_index, dir_.value, attempt):
            log.warning("%s refused for %s: invalid token", task_name, saga_id)
            _audit_refusal(rt, task_name, "invalid token", (saga_id, step_index, dir_, attempt))
            return {"ran": False, "reason": "invalid token"}
        # The checkpoint serves both the "is this attempt still pending" check and, unless it
        # changes while the step runs (the write's version check), the transition. A fresh
        # first delivery carries it (worker/snapshot.py); otherwise it is read.
        loaded = None
        # kombu's filesystem broker (the embedded default) loses the redelivered flag.
        trusted_broker = not rt.settings.is_embedded_broker
        if "checkpoint" in kwargs and trusted_broker and not _sent_again(task.request):
            loaded = snapshot.decode(
                rt.signing_key,
                kwargs["checkpoint"],
                saga_id=saga_id,
                saga_type=saga_type,
                context=context,
                now=time.time(),
                max_age_seconds=rt.settings.stall_grace_seconds,
            )
        if loaded is None:
            loaded = retry_transient(lambda: rt.store.load_for_step(saga_id), what="pending check")
        if loaded is None or not loaded.saga.awaits(step_index, dir_, attempt):
            # A redelivered or superseded attempt: running it again could only repeat work.
            held = None if loaded is None else loaded.saga.pending
            log.info(
                "%s for %s: attempt %s is not pending (%s); skipped",
                task_name,
                saga_id,
                attempt,
                None if held is None else (held.step_index, held.direction.value, held.number),
            )
            return {"ran": False, "reason": "not pending"}
        step = definition.steps[step_index]
        timeout = definition.timeout(step_index, dir_, rt.settings.default_step_timeout_seconds)
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
                stack_trace=storable_text(traceback.format_exc(), MAX_TRACE_CHARS, keep_end=True),
                # saga_worker's NonRetryableStepError, or any class of that name: the
                # convention remote services follow without importing saga_worker.
                retryable=not any(named_non_retryable(c.__name__) for c in type(exc).__mro__),
                duration_ms=elapsed_ms,
            )
        decision: Decision | None = None
        try:
            decision = rt.engine.handle(saga_id, event, loaded=loaded).decision
        except (OperationalError, DBAPIError):
            # The action ran but its result cannot be committed now. Hand the result to
            # saga.advance, which retries until the database is back, instead of re-running it.
            log.warning(
                "%s for %s: database unavailable; result deferred to saga.advance",
                task_name,
                saga_id,
            )
            deferred = _result_kwargs(event, saga_id, token)
            app.send_task(
                "saga.advance",
                kwargs=deferred,
                kwargsrepr=shown_kwargs(rt.store.redactor, deferred),
                queue=rt.settings.queue,
                countdown=2,
            )
        if isinstance(event, StepFailed):
            # Outside the except block, so the database error (whose text may quote SQL
            # parameters) is not chained into the traceback that task events carry. Deferred
            # (no decision): whether another attempt follows is decided by saga.advance.
            _report_failed_attempt(event, decision, rt.store.redactor)
        if decision is None:
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
    return storable_text(text or type(exc).__name__, MAX_ERROR_CHARS)


def _snapshot_if_valid(context: Any, settings: Any) -> Mapping[str, Any] | None:
    """The submitted context for the rejection's snapshot, when it is a usable JSON object."""
    try:
        check_context(context, settings, "context")
    except InvalidRequest:
        return None  # too large, too deep or not an object: the reason says so instead
    return dict(context)


def _reject_start(
    rt: Any, raw_id: Any, kwargs: Mapping[str, Any], exc: SagaError
) -> dict[str, Any]:
    # The reason may quote what was sent (an unknown argument's name, say).
    reason = storable_text(str(exc), MAX_ERROR_CHARS)
    if not valid_saga_id(raw_id):
        log.warning("saga.start refused (saga_id not usable, nothing recorded): %s", reason)
        return {"accepted": False, "error": reason}
    field = getattr(exc, "field", None)
    data: dict[str, Any] = {
        "field": storable_text(field, 100) if isinstance(field, str) else None,
        "code": exc.code,
    }
    # What the producer sent, recorded even when it is why the start was refused: as text
    # any database stores (controls and lone surrogates escaped).
    saga_type = kwargs.get("saga_type")
    if isinstance(saga_type, str):
        data["saga_type"] = storable_text(saga_type, 100)
    user_id = kwargs.get("user_id") if isinstance(kwargs.get("user_id"), str) else None
    ip = kwargs.get("ip_address") if isinstance(kwargs.get("ip_address"), str) else None
    recorded = rt.engine.reject(
        raw_id,
        reason,
        user_id=(user_id or None) and storable_text(user_id, 255),
        ip_address=(ip or None) and storable_text(ip, 45),
        data=data,
        context=_snapshot_if_valid(kwargs.get("context"), rt.settings),
    )
    if not recorded:
        # The saga exists: this refused message repeats (or garbles) a start already made.
        log.info("saga.start for existing %s is a duplicate; ignored", raw_id)
        return {"accepted": False, "duplicate": True}
    log.warning("saga.start %s rejected: %s", raw_id, reason)
    return {"accepted": False, "error": reason}
