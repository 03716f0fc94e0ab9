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
    """Base task of the saga app: validates the message shape before Celery does."""

    def start_strategy(self, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., Any]:
        handler: Callable[..., Any] = super().start_strategy(app, consumer, **kwargs)
        name = self.name

        def guarded(message: Any, body: Any, *args: Any, **kw: Any) -> Any:
            problem = payload_problem(message.payload if body is None else body)
            if problem is not None:
                raise InvalidTaskError(f"{name}: {problem}")
            return handler(message, body, *args, **kw)

        return guarded
