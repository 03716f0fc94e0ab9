"""Reports of step copies that a worker discarded unstarted because they expired.

Celery drops a task message still queued at its `expires` (the attempt's start-by time)
and fires `task_revoked(expired=True)` in the worker's main process. When that copy was the
latest one sent, no copy of the attempt can start any more, so waiting for its deadline
(start-by + the step's timeout) would only delay the saga: this reports the discard to
`saga.advance` (outcome "expired", with the copy's token and start-by time), and the engine
re-sends the attempt at once (docs/recovery.md, Backlogs). A redelivered copy is not
reported: an earlier delivery of the same message may have started.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery.signals import task_revoked

from ..audit.redaction import Redactor
from .dispatch import ADVANCE_TASK, shown_kwargs

log = logging.getLogger(__name__)

#: What an expiry report carries over from the discarded step message.
REPORTED = ("saga_id", "step_index", "direction", "attempt", "token")


def expiry_report(request: Any) -> tuple[dict[str, Any], str] | None:
    """The saga.advance kwargs and queue reporting this discarded copy, or None when it is
    not one to report (not expired unstarted on its first delivery, or not a step's)."""
    delivery = getattr(request, "delivery_info", None) or {}
    kwargs = getattr(request, "kwargs", None)
    expires = getattr(request, "expires", None)
    if delivery.get("redelivered") or not isinstance(kwargs, dict) or not expires:
        return None
    if not all(name in kwargs for name in REPORTED):
        return None
    queue = delivery.get("routing_key")
    if not isinstance(queue, str) or not queue:
        return None
    report = {name: kwargs[name] for name in REPORTED}
    return {**report, "outcome": "expired", "start_by": str(expires)}, queue


def install_expiry_reports(
    app: Any, is_step_task: Callable[[str], bool], redactor: Callable[[], Redactor]
) -> None:
    """Report the step copies this app's workers discard as expired."""

    def on_revoked(
        sender: Any = None, request: Any = None, expired: bool = False, **_: Any
    ) -> None:
        if not expired or getattr(sender, "app", None) is not app:
            return
        if not is_step_task(str(getattr(sender, "name", ""))):
            return
        try:
            found = expiry_report(request)
            if found is None:
                return
            report, queue = found
            sender.app.send_task(
                ADVANCE_TASK,
                kwargs=report,
                kwargsrepr=shown_kwargs(redactor(), report),
                queue=queue,
            )
        except Exception:  # never into the consumer's loop: the sweep re-sends it anyway
            log.exception("could not report an expired step message; the sweep re-sends it")

    task_revoked.connect(on_revoked, weak=False)
