"""Refuse malformed task messages before Celery builds a request from them.

Celery unpacks a protocol-2 body as ``args, kwargs, embed = payload``; a JSON body of any
other shape raises inside the consumer and restarts it, re-reading the same poison message.
Raising InvalidTaskError instead makes Celery log the message once and drop it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Task
from celery.exceptions import InvalidTaskError


def payload_problem(payload: Any) -> str | None:
    """Why a decoded task body is unusable, or None when it has the protocol-2 shape."""
    if isinstance(payload, dict):
        return "protocol 1 task messages are not accepted; send with Celery >= 4 (protocol 2)"
    if not isinstance(payload, list | tuple) or len(payload) != 3:
        return "task body must be [args, kwargs, embed]"
    args, kwargs, embed = payload
    if not isinstance(args, list | tuple):
        return "task args must be a list"
    if not isinstance(kwargs, dict):
        return "task kwargs must be an object"
    if not isinstance(embed, dict):
        return "task embed must be an object"
    for key in ("callbacks", "errbacks", "chain"):
        value = embed.get(key)
        if value is not None and not isinstance(value, list):
            return f"task embed {key} must be a list"
    return None


class GuardedTask(Task):  # type: ignore[misc]
    """Base task of the saga app: validates the message shape before Celery does, and shows
    its arguments redacted in task events whoever sent it."""

    def start_strategy(self, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., Any]:
        handler: Callable[..., Any] = super().start_strategy(app, consumer, **kwargs)
        name = self.name
        shown = _shown_arguments(app)

        def guarded(message: Any, body: Any, *args: Any, **kw: Any) -> Any:
            payload = message.payload if body is None else body
            problem = payload_problem(payload)
            if problem is not None:
                raise InvalidTaskError(f"{name}: {problem}")
            headers = message.headers
            if isinstance(headers, dict):
                # Task events, Flower and the worker log show argsrepr/kwargsrepr from the
                # headers. A producer's send_task sets none, Celery's retry drops ours, and a
                # sender may set anything: each is replaced by the redacted form.
                headers["argsrepr"], headers["kwargsrepr"] = shown(payload[0], payload[1])
            return handler(message, body, *args, **kw)

        return guarded


def _shown_arguments(app: Any) -> Callable[[Any, dict[str, Any]], tuple[str, str]]:
    from ..audit.redaction import Redactor
    from .dispatch import shown_kwargs

    runtimes = getattr(app, "saga_runtimes", None)
    keys = runtimes.settings.redact_keys if runtimes is not None else ()
    redactor = Redactor(keys)

    def shown(args: Any, kwargs: dict[str, Any]) -> tuple[str, str]:
        # Positional arguments of saga tasks are results of other services' tasks (the
        # link callback of saga.advance): their size, not their content.
        return (f"(<{len(args)} positional argument(s)>,)" if args else "()"), shown_kwargs(
            redactor, kwargs
        )

    return shown
