"""Turns a `RunAttempt` command into a Celery message (local step or remote task)."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from typing import Any

from ..audit.redaction import REDACTED, Redactor
from ..config import Settings
from ..core.commands import RunAttempt
from ..core.definition import Remote, SagaDefinition, idempotency_key
from ..core.model import Direction, Saga
from ..store.port import Loaded
from ..tokens import attempt_token
from . import snapshot

ADVANCE_TASK = "saga.advance"
# What task events show of saga.advance's positional argument instead of the remote result
# (or, for link_error, the failed task's id).
RESULT_REPR = "('<result>',)"
REMOTE_ID_REPR = "('<remote task id>',)"
# Past the soft limit a step gets this long to clean up before its process is killed.
HARD_LIMIT_MARGIN_SECONDS = 10.0


def shown_kwargs(redactor: Redactor, kwargs: dict[str, Any]) -> str:
    """What task events, Flower and worker logs show instead of a message's kwargs (its
    `kwargsrepr`): the context, outputs and free text redacted, tokens and checkpoints
    hidden."""
    shown: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key == "token":
            shown[key] = REDACTED
        elif key == "checkpoint" and isinstance(value, dict):
            # Replaced whole, so not redacted first: a step message carries the context in
            # it, and walking that once more per step is work on the hot path.
            shown[key] = f"<version {value.get('version')}>"
        else:
            shown[key] = redactor.value(value)
    return repr(shown)[:2000]


def version_queue(base: str, saga_type: str, version: str | None) -> str:
    """The queue of the messages about sagas of one definition version, which only workers
    that registered that version consume (docs/deploys.md); `base` itself for sagas
    started before versions were recorded."""
    return base if version is None else f"{base}.{saga_type}.{version}"


def saga_queue(base: str, saga: Saga) -> str:
    """The queue of the messages about `saga` (its version's)."""
    return version_queue(base, saga.saga_type, saga.definition_version)


class CeleryDispatcher:
    """Sends attempts with `send_task`, so remote task names need not be importable."""

    def __init__(self, app: Any, settings: Settings, signing_key: str) -> None:
        self.app = app
        self.settings = settings
        self.signing_key = signing_key
        self.redactor = Redactor(settings.redact_keys)
        self.amqp_broker = settings.broker_url.startswith(("amqp://", "amqps://", "pyamqp://"))

    def _kwargsrepr(self, kwargs: dict[str, Any]) -> str:
        return shown_kwargs(self.redactor, kwargs)

    def _reply(self, reply: dict[str, Any], outcome: str, argsrepr: str, queue: str) -> Any:
        """The saga.advance signature the remote service's Celery sends back (link/link_error).

        Its options travel with it: the remote worker sends it as JSON (saga_worker accepts
        nothing else, whatever the service's own default serializer) and shows neither the
        token nor the remote result in task events and Flower."""
        kwargs = {**reply, "outcome": outcome}
        return self.app.signature(
            ADVANCE_TASK,
            kwargs=kwargs,
            queue=queue,
            serializer="json",
            kwargsrepr=self._kwargsrepr(kwargs),
            argsrepr=argsrepr,
        )

    def token(self, saga_id: str, step_index: int, direction: Direction, attempt: int) -> str:
        return attempt_token(self.signing_key, saga_id, step_index, direction.value, attempt)

    def send(
        self,
        definition: SagaDefinition,
        saga: Saga,
        command: RunAttempt,
        checkpoint: Loaded | None = None,
    ) -> None:
        step = definition.steps[command.step_index]
        target = step.target(command.direction)
        timeout = definition.timeout(
            command.step_index, command.direction, self.settings.default_step_timeout_seconds
        )
        token = self.token(saga.saga_id, command.step_index, command.direction, command.attempt)
        options: dict[str, Any] = {
            # The id its step_start row records (core/commands.py attempt_task_id), so the
            # audit trail names the task Flower and the worker log show.
            "task_id": command.task_id,
            "soft_time_limit": timeout,
            "time_limit": timeout + HARD_LIMIT_MARGIN_SECONDS,
        }
        if command.start_by is not None:
            # A copy still queued after its start-by time is discarded by the worker that
            # receives it (Celery's own check, here or in the remote service): recovery sends
            # another copy only after start-by + timeout, so two copies never both start.
            options["expires"] = command.start_by
        delay = (command.not_before - datetime.now(UTC)).total_seconds()
        if delay > 0.001:
            # On RabbitMQ with quorum queues Celery delays messages in the broker in whole
            # seconds (int(countdown)) and refuses a countdown that truncates to 0: round up,
            # so that an attempt is never sent before its not_before nor fails to send.
            options["countdown"] = math.ceil(delay) if self.amqp_broker else delay
        queue = saga_queue(self.settings.queue, saga)
        reply = {
            "saga_id": saga.saga_id,
            "step_index": command.step_index,
            "direction": command.direction.value,
            "attempt": command.attempt,
            "token": token,
        }
        if isinstance(target, Remote):
            # The remote worker only needs Celery: its result (or its failure) is handed to
            # saga.advance by Celery's link callbacks, which carry the token back untouched.
            # The errback's queue option is also where saga_remote sends the exception.
            remote_kwargs = {
                "context": dict(saga.context),
                "idempotency_key": idempotency_key(saga.saga_id, step.name, command.direction),
                "saga_id": saga.saga_id,
                "step_name": step.name,
                "attempt": command.attempt,
            }
            self.app.send_task(
                target.task_name,
                kwargs=remote_kwargs,
                kwargsrepr=self._kwargsrepr(remote_kwargs),
                queue=target.queue,
                link=self._reply(reply, "success", RESULT_REPR, queue),
                link_error=self._reply(reply, "failure", REMOTE_ID_REPR, queue),
                **options,
            )
            return
        local_kwargs = {**reply, "saga_type": saga.saga_type, "context": dict(saga.context)}
        if checkpoint is not None and checkpoint.saga.saga_id == saga.saga_id:
            # Lets the step skip reading the checkpoint back (worker/snapshot.py).
            local_kwargs["checkpoint"] = snapshot.encode(self.signing_key, checkpoint, time.time())
        self.app.send_task(
            definition.task_name(command.step_index, command.direction),
            kwargs=local_kwargs,
            kwargsrepr=self._kwargsrepr(local_kwargs),
            queue=queue,
            **options,
        )
