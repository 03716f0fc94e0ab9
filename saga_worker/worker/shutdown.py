"""How long a stopping worker lets the steps it is running finish.

Celery's warm shutdown (SIGTERM, what `docker stop` sends) stops taking messages and waits
for the running tasks, however long they take; a step runs at most its timeout (soft time
limit) plus HARD_LIMIT_MARGIN_SECONDS before its pool process is killed. A cold shutdown
(SIGQUIT, a second Ctrl+C, or SIGTERM with REMAP_SIGTERM=SIGQUIT) would cancel them at once;
`worker_soft_shutdown_timeout` (Celery >= 5.5) makes it wait that long first, then hand the
unfinished messages back to the broker. Sized from the longest local step here, a running
step is never cut short by a shutdown that allows it, and an interrupted one is re-run (same
attempt, same idempotency key) by another worker instead of waiting for the recovery sweep.
The process manager's own grace period (docker-compose `stop_grace_period`, Kubernetes
`terminationGracePeriodSeconds`) must be longer still, or it kills the worker first.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..core.definition import SagaDefinition
from ..core.model import Direction
from .dispatch import HARD_LIMIT_MARGIN_SECONDS


def longest_local_step_seconds(
    definitions: Iterable[SagaDefinition], default_timeout_seconds: float
) -> float:
    """The longest a local step or compensation of these sagas can run in a worker process,
    hard time limit included; 0 when there are none (remote steps run elsewhere)."""
    longest = 0.0
    for definition in definitions:
        for index, step in enumerate(definition.steps):
            for direction in Direction:
                if not callable(step.target(direction)):
                    continue  # a Remote task or no compensation
                longest = max(
                    longest, definition.timeout(index, direction, default_timeout_seconds)
                )
    return longest + HARD_LIMIT_MARGIN_SECONDS if longest else 0.0


def size_soft_shutdown(app: Any, definitions: Iterable[SagaDefinition], default: float) -> None:
    """Set `worker_soft_shutdown_timeout` unless the deployment set it (SAGA_CELERY_CONFIG)."""
    if not app.conf.worker_soft_shutdown_timeout:
        app.conf.worker_soft_shutdown_timeout = longest_local_step_seconds(definitions, default)
