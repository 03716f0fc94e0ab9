"""The Celery tasks: saga.start, saga.abort, saga.signal, saga.advance, saga.recover and step
wrappers."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError

from .. import registry
from ..attempt import output_problem
from ..core.events import AttemptExpired, StepFailed, StepSucceeded
from ..core.failure import (
    MAX_ERROR_CHARS,
    reported_duration,
    reported_failure,
    storable_text,
)
from ..core.recovery import RECOVERY_USER
from ..errors import (
    InvalidRequest,
    SagaError,
    SagaNotFound,
    UnknownDefinitionVersion,
    UnstorableRequest,
)
from ..requests import (
    check_context,
    parse_abort,
    parse_signal,
    parse_start,
    start_saga_id,
    valid_saga_id,
)
from ..store.connect import is_transient
from ..tokens import token_valid
from .dispatch import version_queue
from .messages import ADVANCE_FIELDS, AttemptRef, parse_attempt_ref, short
from .runtime import RuntimeFactory

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

# While the database is down, a task whose in-process retries ran out is re-published with
# backoff rather than dropped: the broker keeps the transition until the database is back.
# Only errors that can pass reach it (settle_permanent_db_errors): a DataError or an
# IntegrityError would fail the same way on every run, for ever.
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


def database_refusal(exc: DBAPIError) -> str:
    """What the database said, in one line (its parameters are hidden: create_db_engine)."""
    cause = exc.orig if exc.orig is not None else exc
    first = (str(cause).strip().splitlines() or [""])[0]
    return storable_text(f"{type(cause).__name__}: {first}", 300)


def settle_permanent_db_errors(runtimes: RuntimeFactory, task_name: str) -> Callable[[F], F]:
    """Let only transient database errors out of a task, to DB_OUTAGE_RETRY's autoretry.

    Any other database error (a DataError, an IntegrityError) would fail the same way on
    every run: the message is logged once, counted (`saga_rejected_total{reason=
    "unstorable"}`) and acknowledged. A saga it concerns is left as it was: a step's attempt
    then stalls, and the recovery sweep re-sends it, then fails it after SAGA_MAX_RECOVERIES.
    """

    def wrap(function: F) -> F:
        @functools.wraps(function)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return function(*args, **kwargs)
            except DBAPIError as exc:
                if is_transient(exc):
                    raise
                detail = database_refusal(exc)
                log.error("%s refused by the database, not retried: %s", task_name, detail)
                runtimes.rejected("unstorable")
                return {"accepted": False, "error": detail}

        return run  # type: ignore[return-value]

    return wrap


def refused(runtimes: RuntimeFactory, reason: str, message: str, *args: Any) -> None:
    """Log a refused message once and count it; nothing is written to the database."""
    log.warning(message, *args)
    runtimes.rejected(reason)


def register_core_tasks(app: Any, runtimes: RuntimeFactory) -> None:
    """Register the stable task names of docs/contract.md (Tasks) on `app`."""

    @app.task(name="saga.start", bind=True, **DB_OUTAGE_RETRY)  # type: ignore[untyped-decorator]
    @settle_permanent_db_errors(runtimes, "saga.start")
    def saga_start(task: Any, /, *args: Any, **kwargs: Any) -> dict[str, Any]:
        rt = runtimes.get()
        message_id = task.request.id
        raw_id = start_saga_id(kwargs, message_id)
        try:
            request = parse_start(args, kwargs, rt.settings, message_id)
            registry.get(request.saga_type)
        except SagaError as exc:
            runtimes.rejected("invalid_start")
            return _reject_start(rt, raw_id, kwargs, exc)
        try:
            result = rt.engine.start(request)
        except DBAPIError as exc:
            if is_transient(exc):
                raise
            # Validation let through a value the database refuses: record that once.
            runtimes.rejected("unstorable")
            return _reject_start(rt, raw_id, kwargs, UnstorableRequest(database_refusal(exc)))
        return {"saga_id": result.saga_id, "created": result.created}

    @app.task(name="saga.abort", **DB_OUTAGE_RETRY)  # type: ignore[untyped-decorator]
    @settle_permanent_db_errors(runtimes, "saga.abort")
    def saga_abort(*args: Any, **kwargs: Any) -> dict[str, Any]:
        rt = runtimes.get()
        try:
            saga_id, event = parse_abort(args, kwargs)
            outcome = rt.engine.handle(saga_id, event)
        except SagaError as exc:
            refused(runtimes, "invalid_message", "saga.abort refused: %s", exc)
            return {"accepted": False, "error": str(exc)}
        return {"accepted": outcome.changed, "ignored": outcome.ignored}

    @app.task(name="saga.signal", bind=True, **DB_OUTAGE_RETRY)  # type: ignore[untyped-decorator]
    @settle_permanent_db_errors(runtimes, "saga.signal")
    def saga_signal(task: Any, /, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """A signal for a saga's wait (DESIGN section 10): delivered, kept or ignored."""
        rt = runtimes.get()
        try:
            saga_id, event = parse_signal(args, kwargs, rt.settings)
            outcome = rt.engine.handle(saga_id, event)
        except UnknownDefinitionVersion as exc:
            return _forward_signal(task, rt.settings.queue, kwargs, exc, runtimes)
        except SagaError as exc:
            refused(runtimes, "invalid_message", "saga.signal refused: %s", exc)
            return {"accepted": False, "error": str(exc)}
        return {"accepted": outcome.changed, "ignored": outcome.ignored}

    @app.task(name="saga.advance", **DB_OUTAGE_RETRY)  # type: ignore[untyped-decorator]
    @settle_permanent_db_errors(runtimes, "saga.advance")
    def saga_advance(result: Any = None, **kwargs: Any) -> dict[str, Any]:
        """Results of remote steps (via link/link_error) and of local steps sent late."""
        rt = runtimes.get()
        try:
            ref = parse_attempt_ref(kwargs, extra=ADVANCE_FIELDS)
            outcome = kwargs["outcome"]
            if outcome not in ("success", "failure", "expired"):
                raise InvalidRequest("outcome", "must be 'success', 'failure' or 'expired'")
            start_by = _start_by(kwargs) if outcome == "expired" else None
        except (InvalidRequest, KeyError) as exc:
            refused(runtimes, "invalid_message", "saga.advance refused: %s", short(exc))
            return {"accepted": False, "error": short(exc)}
        saga_id, step_index, direction, attempt = ref
        if not token_valid(
            rt.signing_key, kwargs.get("token"), saga_id, step_index, direction.value, attempt
        ):
            # Not authenticated: written nowhere, so a broker writer cannot grow the audit
            # table (docs/security.md).
            refused(
                runtimes,
                "invalid_token",
                "saga.advance refused for %s (step %s %s attempt %s): invalid token",
                saga_id,
                step_index,
                direction.value,
                attempt,
            )
            return {"accepted": False, "error": "invalid token"}
        event: StepSucceeded | StepFailed | AttemptExpired
        if start_by is not None:
            event = AttemptExpired(step_index, direction, attempt, start_by, RECOVERY_USER)
        else:
            event = _advance_event(result, kwargs, ref, outcome == "success", rt.settings)
        try:
            outcome = rt.engine.handle(saga_id, event)
        except UnknownDefinitionVersion as exc:
            # Sent to a queue of a version this worker lacks (by hand, or before versions):
            # not applied; the attempt stalls and the sweep re-sends it where its version is.
            refused(runtimes, "wrong_version", "saga.advance refused: %s", exc)
            return {"accepted": False, "error": str(exc)}
        except SagaNotFound as exc:
            refused(runtimes, "not_pending", "saga.advance refused: %s", exc)
            return {"accepted": False, "error": str(exc)}
        if outcome.ignored:
            # A valid token for an attempt that is not pending: a redelivery, a late duplicate
            # or a replay. Not audited: copies of a genuine message are as easy to push onto
            # the broker as forged ones, and the saga did not change (the engine logged why).
            runtimes.rejected("not_pending")
        return {"accepted": outcome.changed, "ignored": outcome.ignored}


def _forward_signal(
    task: Any,
    base_queue: str,
    kwargs: Mapping[str, Any],
    exc: UnknownDefinitionVersion,
    runtimes: RuntimeFactory,
) -> dict[str, Any]:
    """A signal for a saga of a version this worker lacks goes to that version's queue
    (producers send to the base queue: they know no version), where a worker with it
    decides it, or where it waits until one starts. Forwarded once: a worker there that
    lacks the version too refuses it."""
    queue = version_queue(base_queue, exc.saga_type, exc.version)
    delivery_info = getattr(task.request, "delivery_info", None) or {}
    if delivery_info.get("routing_key") == queue:
        refused(runtimes, "wrong_version", "saga.signal refused: %s", exc)
        return {"accepted": False, "error": str(exc)}
    task.app.send_task("saga.signal", kwargs=dict(kwargs), queue=queue)
    log.info("saga.signal for %s forwarded to %s", kwargs.get("saga_id"), queue)
    return {"accepted": False, "forwarded": queue}


def _start_by(kwargs: Mapping[str, Any]) -> datetime:
    """The start-by time an expiry report names: the discarded copy's `expires`."""
    value = kwargs.get("start_by")
    try:
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise InvalidRequest("start_by", "must be an ISO 8601 time with its offset")
    return parsed


def _advance_event(
    result: Any, kwargs: Mapping[str, Any], ref: AttemptRef, success: bool, settings: Any
) -> StepSucceeded | StepFailed:
    _, step_index, direction, attempt = ref
    if success:
        duration_ms = reported_duration(kwargs.get("duration_ms"))
        output = kwargs.get("output", result)
        problem = output_problem(output, settings)
        if problem is None:
            return StepSucceeded(step_index, direction, attempt, dict(output or {}), duration_ms)
        return StepFailed(step_index, direction, attempt, "StepOutputError", problem)
    # `result` is the failed task's id when Celery itself called the errback.
    return reported_failure(step_index, direction, attempt, kwargs, task_id=result)


#: A refused start keeps at most this much of the submitted context (its canonical JSON):
#: anyone who can write to the broker can send refused starts, and audit rows stay forever.
MAX_REJECTED_SNAPSHOT_BYTES = 4096


def _snapshot_if_valid(context: Any, settings: Any) -> Mapping[str, Any] | None:
    """The submitted context for the rejection's snapshot, when it is a usable JSON object
    of at most MAX_REJECTED_SNAPSHOT_BYTES (`submitted_digest` stands for a larger one)."""
    try:
        check_context(context, settings, "context")
    except InvalidRequest:
        return None  # too large, too deep or not an object: the reason says so instead
    digest = submitted_digest(context)
    if digest is None or digest["bytes"] > MAX_REJECTED_SNAPSHOT_BYTES:
        return None
    return dict(context)


def submitted_digest(context: Any) -> dict[str, Any] | None:
    """SHA-256 and size in bytes of the submitted context's canonical JSON (sorted keys, no
    whitespace, UTF-8), so a refused start's row identifies what was sent without keeping
    it; None when nothing usable was sent."""
    if context is None:
        return None
    try:
        text = json.dumps(
            context, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError, RecursionError):
        return None
    raw = text.encode("utf-8", "surrogatepass")
    return {"sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}


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
        "submitted": submitted_digest(kwargs.get("context")),
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
