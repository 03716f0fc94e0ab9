"""The step tasks: run one attempt of a local action or compensation, then apply its result.

One task per local step and direction, named saga.<type>.<step>[.compensate]. A step runs
only when its attempt is the one the checkpoint waits for; its result goes through the
engine in the same task (or, while the database is down, to saga.advance).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, NoReturn

from celery.exceptions import Retry, SoftTimeLimitExceeded
from sqlalchemy.exc import DBAPIError

from .. import registry
from ..attempt import run_attempt
from ..audit.redaction import Redactor
from ..core.decision import Decision, next_attempt
from ..core.definition import SagaDefinition
from ..core.events import StepFailed, StepSucceeded
from ..core.model import Direction
from ..errors import InvalidRequest, SagaError
from ..store.connect import is_transient, retry_transient
from ..tokens import token_valid
from . import snapshot
from .dispatch import saga_queue, shown_kwargs
from .messages import STEP_FIELDS, parse_attempt_ref, short
from .runtime import RuntimeFactory
from .tasks import DB_OUTAGE_RETRY, refused, settle_permanent_db_errors

log = logging.getLogger(__name__)


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


def register_step_tasks(
    app: Any, runtimes: RuntimeFactory, definition: SagaDefinition
) -> list[str]:
    """One task per local action and compensation, named saga.<type>.<step>[.compensate];
    returns the names of this definition's step tasks."""
    names: list[str] = []
    for index, step in enumerate(definition.steps):
        for direction in (Direction.FORWARD, Direction.COMPENSATE):
            target = step.target(direction)
            if target is None or not callable(target):
                continue
            name = definition.task_name(index, direction)
            names.append(name)
            if name in app.tasks:
                continue
            app.task(
                name=name,
                bind=True,
                # An expected error: Celery logs one line with its text, not a traceback
                # (the audit trail keeps the step's own stack trace).
                throws=(StepAttemptFailed,),
                **DB_OUTAGE_RETRY,
            )(settle_permanent_db_errors(runtimes, name)(_step_task(app, runtimes, name)))
    return names


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
            # Some registered version must have this task at this index; the saga's own
            # version is checked once its checkpoint is known.
            if not any(
                _names(d, step_index, dir_, task_name) for d in registry.versions_of(saga_type)
            ):
                raise InvalidRequest("step_index", f"does not name {task_name}")
            if not isinstance(context, Mapping):
                raise InvalidRequest("context", "must be a JSON object")
        except (InvalidRequest, KeyError, TypeError, SagaError, IndexError) as exc:
            refused(runtimes, "invalid_message", "%s refused: %s", task_name, short(exc))
            return {"ran": False, "reason": short(exc)}
        if not token_valid(rt.signing_key, token, saga_id, step_index, dir_.value, attempt):
            # Not authenticated: nothing is written (docs/security.md).
            refused(
                runtimes,
                "invalid_token",
                "%s refused for %s (attempt %s): invalid token",
                task_name,
                saga_id,
                attempt,
            )
            return {"ran": False, "reason": "invalid token"}
        # The checkpoint serves the "is this attempt still pending" check, the context the
        # action runs on and, unless it changes while the step runs (the write's version
        # check), the transition. A fresh first delivery carries it (worker/snapshot.py),
        # signed together with the message's context; otherwise it is read.
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
            runtimes.rejected("not_pending")
            return {"ran": False, "reason": "not pending"}
        try:
            # Only ever the definition the saga started with (docs/deploys.md).
            definition = rt.engine.definition_for(loaded.saga)
            if loaded.saga.saga_type != saga_type or not _names(
                definition, step_index, dir_, task_name
            ):
                raise InvalidRequest("step_index", f"does not name {task_name} in its version")
        except SagaError as exc:
            # Sent to a queue of a version this worker does not have (by hand, or by a
            # build before versions): not run. The attempt stalls, and the recovery sweep
            # sends it where its version is, or parks the saga.
            refused(runtimes, "wrong_version", "%s for %s refused: %s", task_name, saga_id, exc)
            return {"ran": False, "reason": short(exc)}
        # The committed context, never the message's: the token authenticates the attempt,
        # not the context beside it, which anyone holding one genuine message could edit.
        # (A trusted carried checkpoint holds the message's context, as its MAC covers it.)
        event = run_attempt(
            definition,
            saga_id,
            step_index,
            dir_,
            attempt,
            loaded.saga.context,
            rt.settings,
            timeout_errors=(SoftTimeLimitExceeded,),
        ).event
        decision: Decision | None = None
        try:
            decision = rt.engine.handle(saga_id, event, loaded=loaded).decision
        except DBAPIError as exc:
            if not is_transient(exc):
                # It would fail the same way in saga.advance: settle_permanent_db_errors logs
                # it; the attempt stalls and the recovery sweep deals with it.
                raise
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
                queue=saga_queue(rt.settings.queue, loaded.saga),
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


def _names(definition: SagaDefinition, step_index: int, direction: Direction, task: str) -> bool:
    """Whether `task` is this definition's task for (step_index, direction)."""
    return 0 <= step_index < len(definition.steps) and (
        definition.task_name(step_index, direction) == task
    )


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
