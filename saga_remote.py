"""Optional helper for a service that serves remote saga steps; standard library only.

A service whose Celery tasks serve saga steps (``Remote("task.name", queue=...)``) needs
nothing from saga_worker: Celery reports a failed task through the ``link_error`` errback
that saga_worker attached to the message (a ``saga.advance`` signature). But when the
worker that ran the failed task does not have that errback's task registered, Celery sends
the errback only the failed task's id (celery/backends/base.py, ``_call_task_errbacks``),
so the saga's audit trail can say that the step failed, not why.

``install(app)`` registers ``saga.advance`` in the service's own Celery app. Celery then
calls the errback in the service's worker with the exception, and this module sends the
same errback message on to saga_worker with the exception's type, message and traceback
(bounded) added, as JSON, with the token and the exception text left out of its task
events (Flower). The service's workers never receive ``saga.advance`` messages: they go
to the saga queue named in the errback, as before::

    import saga_remote
    saga_remote.install(app)   # app: the service's Celery app

To fail a step at once, without its remaining attempts, raise ``NonRetryableStepError``
from this module, or any exception whose class (or a base class) is named
``NonRetryableStepError``, or that has an attribute ``saga_retryable = False``.

Copy this file into the service, or install saga_worker's distribution and import it: it
imports nothing beyond the standard library (``app`` is whatever Celery app it is given).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ADVANCE_TASK",
    "NonRetryableStepError",
    "failure_report",
    "install",
    "shown_kwargs",
]

ADVANCE_TASK = "saga.advance"
MAX_MESSAGE_CHARS = 2000
MAX_TRACE_CHARS = 8000
NON_RETRYABLE_NAME = "NonRetryableStepError"
TIME_LIMIT_ERRORS = frozenset({"SoftTimeLimitExceeded", "TimeLimitExceeded"})
HIDDEN = "***REDACTED***"
# Free text of a failure report, which task events show only the size of.
_TEXT_FIELDS = ("message", "stack_trace")
# Delivery options of the errback signature that say where saga.advance must go.
_ROUTING_OPTIONS = ("queue", "exchange", "routing_key", "priority")


class NonRetryableStepError(Exception):
    """Raise from a remote step to fail it at once, without its remaining attempts."""


def failure_report(exc: BaseException, traceback: Any = None) -> dict[str, Any]:
    """What saga_worker records of a failed remote step: type, message, trace, retryable."""
    kind = type(exc)
    try:
        text = str(exc)
    except Exception:
        text = "<message cannot be rendered>"
    names = {cls.__name__ for cls in kind.__mro__}
    report: dict[str, Any] = {
        "error_type": kind.__name__,
        "message": f"{kind.__name__}: {text}"[:MAX_MESSAGE_CHARS],
        "retryable": NON_RETRYABLE_NAME not in names
        and getattr(exc, "saga_retryable", True) is not False,
        "timed_out": kind.__name__ in TIME_LIMIT_ERRORS,
    }
    if isinstance(traceback, str) and traceback:
        report["stack_trace"] = traceback[-MAX_TRACE_CHARS:]
    return report


def shown_kwargs(kwargs: dict[str, Any]) -> str:
    """The `kwargsrepr` of a failure report: the token hidden, the free text cut to its size."""
    shown = dict(kwargs)
    if "token" in shown:
        shown["token"] = HIDDEN
    for key in _TEXT_FIELDS:
        if isinstance(shown.get(key), str):
            shown[key] = f"<{len(shown[key])} chars>"
    return repr(shown)[:MAX_MESSAGE_CHARS]


def _errback_options(request: Any, fields: dict[str, Any]) -> dict[str, Any]:
    """The routing options of the saga.advance errback this call comes from."""
    for errback in getattr(request, "errbacks", None) or ():
        if (
            isinstance(errback, dict)
            and errback.get("task") == ADVANCE_TASK
            and (errback.get("kwargs") or {}).get("token") == fields.get("token")
        ):
            options = errback.get("options") or {}
            return {k: options[k] for k in _ROUTING_OPTIONS if options.get(k) is not None}
    return {}


def install(app: Any) -> Any:
    """Register the saga.advance errback in `app`, the service's Celery app."""

    def report_failure(request: Any, exc: BaseException, traceback: Any, **fields: Any) -> None:
        options = _errback_options(request, fields)
        if "queue" not in options and "routing_key" not in options:
            # Never guess a queue: the service's default one may be consumed by workers that
            # drop unknown task names. Celery logs this; saga_worker's recovery re-sends the
            # attempt when its deadline passes.
            raise LookupError("saga.advance errback without a queue in the failed task's request")
        kwargs = {**fields, **failure_report(exc, traceback)}
        app.send_task(
            ADVANCE_TASK,
            args=(getattr(request, "id", None),),
            kwargs=kwargs,
            # saga_worker accepts JSON only, whatever this service's default serializer.
            serializer="json",
            # What task events and Flower show: no token, no exception text (it may quote
            # secrets; saga_worker redacts it before it reaches the audit trail).
            kwargsrepr=shown_kwargs(kwargs),
            argsrepr="('<remote task id>',)",
            **options,
        )

    # typing=False: the same registration also sends the success `link` callback, which
    # carries (result,) instead of (request, exc, traceback).
    return app.task(name=ADVANCE_TASK, shared=False, typing=False, ignore_result=True)(
        report_failure
    )
