"""What the shell must do after a transition has been committed."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from .model import Direction


@dataclass(frozen=True)
class RunAttempt:
    """Send the task of one step attempt; `not_before` carries the retry backoff.

    `start_by` is the attempt's start-by time, sent as Celery's `expires`: a copy still
    queued after it is discarded, so at most one copy of an attempt can start.
    """

    saga_id: str
    step_index: int
    direction: Direction
    attempt: int
    not_before: datetime
    start_by: datetime | None = None


Command = RunAttempt
