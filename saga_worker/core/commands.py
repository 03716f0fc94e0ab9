"""What the shell must do after a transition has been committed."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime

from .model import Direction

#: The UUID5 namespace of attempt task ids. Never change it: an id recorded in a
#: `step_start` row would no longer be the one a re-computation gives.
TASK_ID_NAMESPACE = uuid.UUID("424870b5-5835-4a2c-a48f-0a472cceb4c9")


def attempt_task_id(
    saga_id: str,
    step_index: int,
    direction: Direction,
    number: int,
    recoveries: int,
    unparked: datetime | None = None,
) -> str:
    """The Celery task id of one send of an attempt: a UUID5 of what the send is.

    Deterministic, so the `step_start` row that records it and the message that carries it
    agree without a read, and the console links the row to its task in Flower. A broker
    redelivery is the same message, so the same id. A re-send by recovery has another
    `recoveries` count, so another id: it must, because a worker that discarded an expired
    copy keeps the copy's id among its revoked ones and would discard a new copy with that
    id too. For the same reason the re-send of a parked saga, which keeps its `recoveries`
    count, is told apart by when the saga was parked (`unparked`).
    """
    name = f"{saga_id}:{step_index}:{direction.value}:{number}:{recoveries}"
    if unparked is not None:
        name += f":unparked:{unparked.isoformat()}"
    return str(uuid.uuid5(TASK_ID_NAMESPACE, name))


@dataclass(frozen=True)
class RunAttempt:
    """Send the task of one step attempt; `not_before` carries the retry backoff.

    `start_by` is the attempt's start-by time, sent as Celery's `expires`: a copy still
    queued after it is discarded, so at most one copy of an attempt can start. `task_id` is
    the Celery task id to send it with (`attempt_task_id`), recorded in its `step_start` or
    `compensation_start` row.
    """

    saga_id: str
    step_index: int
    direction: Direction
    attempt: int
    not_before: datetime
    start_by: datetime | None = None
    task_id: str = field(kw_only=True)


Command = RunAttempt
