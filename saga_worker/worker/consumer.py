"""A Celery consumer that drops task messages Celery's own handler would crash on.

Celery's task handler runs in the worker's main process and trusts the message's headers:
a `task` header that is a list raises TypeError (unhashable) out of the strategy lookup, a
missing `id` header a KeyError, a body that is a JSON number a TypeError. Any of those
escapes into the consumer's event loop, and the worker stops ("Unrecoverable error") or, on
RabbitMQ, restarts its connection and gets the same message redelivered. Anyone who can
publish to the saga queue could stop every worker that way. This consumer logs such a
message once and rejects it without requeue (a dead-letter exchange, when configured, keeps
it); everything else takes Celery's path unchanged.
"""

from __future__ import annotations

import codecs
import logging
import math
from collections.abc import Callable
from typing import Any

from celery.worker.consumer import Consumer

log = logging.getLogger(__name__)

CONSUMER_PATH = f"{__name__}:GuardedConsumer"


def header_problem(headers: Any, content_encoding: Any = None) -> str | None:
    """Why a message's headers cannot be those of a task message, or None.

    A message without a `task` header is left to Celery (protocol 1 carries the task name in
    its body, and Celery refuses a body without one).
    """
    if content_encoding not in (None, "", "binary", "ascii-8bit"):
        # kombu's JSON decoder ignores a charset it does not know and reads the bytes as
        # UTF-8 anyway: a guess about what the sender meant, not its message.
        try:
            codecs.lookup(str(content_encoding))
        # ValueError: a name holding a NUL character.
        except (LookupError, ValueError):
            return f"unknown content encoding {content_encoding!r}"[:200]
    if not isinstance(headers, dict):
        return f"headers are a {type(headers).__name__}, not a table"
    if "task" not in headers:
        return None
    if not isinstance(headers["task"], str):
        return f"the task header is a {type(headers['task']).__name__}, not a string"
    task_id = headers.get("id")
    if not isinstance(task_id, str) or not task_id:
        return "no id header (a task message must carry its task id)"
    for name, check in LATER_HEADERS.items():
        value = headers.get(name)
        if value is not None and not check(value):
            return f"the {name} header {value!r} is not of its type"[:200]
    return None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def _short_text(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= 10_000


# Headers Celery reads after the task handler returned: in the pool's timer (timelimit), in
# the request (stamps, retries) or in events. A value of the wrong type there raises outside
# anything that could drop the message, stopping the worker or leaking a pool slot. None is
# Celery's "absent" for each.
LATER_HEADERS: dict[str, Callable[[Any], bool]] = {
    "timelimit": lambda v: (
        isinstance(v, list | tuple)
        and len(v) == 2
        and all(x is None or (_number(x) and math.isfinite(x)) for x in v)
    ),
    "stamped_headers": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "stamps": lambda v: isinstance(v, dict),
    "retries": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "shadow": _short_text,
    "argsrepr": _short_text,
    "kwargsrepr": _short_text,
    "origin": _short_text,
    "root_id": _short_text,
    "parent_id": _short_text,
    "group": _short_text,
    "group_index": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "eta": _short_text,
    "expires": lambda v: _short_text(v) or _number(v),
    "ignore_result": lambda v: isinstance(v, bool),
    "replaced_task_nesting": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "lang": _short_text,
}


def _describe(message: Any) -> str:
    headers = message.headers
    shown = (
        {k: headers[k] for k in ("task", "id") if k in headers}
        if isinstance(headers, dict)
        else headers
    )
    return f"content type {message.content_type!r}, headers {shown!r}"[:500]


class GuardedConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer with the checks above (select it with `worker_consumer`)."""

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
        handle: Callable[[Any], Any] = super().create_task_handler(*args, **kwargs)
        # A lost connection must still reach the consumer: Celery reconnects on these.
        passthrough = (*self.connection_errors, *self.channel_errors)

        def on_task_received(message: Any) -> Any:
            try:
                # Inside the try too: a check that raises must drop the message, not stop
                # the worker.
                problem = header_problem(message.headers, message.content_encoding)
                if problem is None:
                    return handle(message)
            except passthrough:
                raise
            except Exception as exc:
                problem = f"{type(exc).__name__}: {exc}"[:300]
            if message.acknowledged:
                # Celery had settled it before it failed: nothing left to drop.
                log.error(
                    "task message failed after it was settled (%s): %s", problem, _describe(message)
                )
                return None
            log.error(
                "dropped a message that is not a valid task (%s): %s", problem, _describe(message)
            )
            message.reject_log_error(log, self.connection_errors, requeue=False)
            return None

        return on_task_received
