"""Load -> transition -> commit checkpoint and audit in one transaction -> dispatch."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from . import registry
from .core.commands import RunAttempt
from .core.definition import SagaDefinition
from .core.events import Event, StartRequested
from .core.model import Saga, SagaState
from .core.transition import AuditEvent, Decision, Limits, start, transition
from .errors import ConcurrencyConflict, SagaNotFound
from .store.repository import Loaded, SagaStore, retry_transient

log = logging.getLogger(__name__)

MAX_CONFLICT_RETRIES = 50


class Dispatcher(Protocol):
    """Sends the task of an attempt; implemented over Celery in worker/dispatch.py."""

    def send(
        self,
        definition: SagaDefinition,
        saga: Saga,
        command: RunAttempt,
        checkpoint: Loaded | None = None,
    ) -> None:
        """Send `command`; `checkpoint` is the saga as committed, when the caller has it."""


@dataclass(frozen=True)
class TransitionRecord:
    """What hooks learn about one transition, committed or ignored.

    `before` is None for a start; `loaded` says a checkpoint was read to decide;
    `commit_seconds` is the time of the one transaction (checkpoint + audit rows);
    `committed` is the checkpoint as written (None when nothing changed).
    """

    definition: SagaDefinition
    before: Saga | None
    decision: Decision
    commit_seconds: float
    loaded: bool
    committed: Loaded | None = None


class EngineHooks(Protocol):
    """Observers of transitions (metrics subscribe here; the core knows nothing of them)."""

    def on_transition(self, record: TransitionRecord) -> None: ...


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class StartResult:
    """What `SagaEngine.start` did: `created` is False for a duplicate saga_id."""

    saga_id: str
    created: bool
    decision: Decision | None


class SagaEngine:
    """The thin imperative shell around `core.transition`."""

    def __init__(
        self,
        store: SagaStore,
        dispatcher: Dispatcher,
        limits: Limits,
        *,
        clock: Callable[[], datetime] = utcnow,
        hooks: Sequence[EngineHooks] = (),
        db_retry_seconds: float = 60.0,
    ) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.limits = limits
        self.clock = clock
        self.hooks = list(hooks)
        self.db_retry_seconds = db_retry_seconds

    def start(self, request: StartRequested) -> StartResult:
        """Create the saga and send its first step; a known saga_id is a silent duplicate."""
        definition = registry.get(request.saga_type)
        now = self.clock()
        decision = start(definition, request, now, self.limits)
        began = time.perf_counter()
        committed = retry_transient(
            lambda: self.store.create(decision, now),
            max_wait_seconds=self.db_retry_seconds,
            what=f"start of saga {request.saga_id}",
        )
        elapsed = time.perf_counter() - began
        if committed is None:
            log.info("saga %s already exists: duplicate start ignored", request.saga_id)
            return StartResult(request.saga_id, False, None)
        self._after_commit(TransitionRecord(definition, None, decision, elapsed, False, committed))
        return StartResult(request.saga_id, True, decision)

    def handle(
        self,
        saga_id: str,
        event: Event,
        *,
        skip_locked: bool = False,
        loaded: Loaded | None = None,
    ) -> Decision:
        """Apply one event; conflicts with concurrent writers are retried from a fresh load.

        `skip_locked` is for the recovery sweep: a saga another sweep holds raises
        SkippedLocked instead of waiting for it.
        """
        for attempt in range(MAX_CONFLICT_RETRIES):
            # A checkpoint read before the step ran is used once; after a conflict, reload.
            apply_once = functools.partial(
                self._apply_once, saga_id, event, skip_locked, loaded if attempt == 0 else None
            )
            try:
                outcome = retry_transient(
                    apply_once,
                    max_wait_seconds=self.db_retry_seconds,
                    what=f"transition of saga {saga_id}",
                )
            except ConcurrencyConflict:
                continue
            if outcome is None:
                raise SagaNotFound(saga_id)
            record = outcome
            if record.decision.ignored:
                log.info(
                    "saga %s: %s ignored: %s",
                    saga_id,
                    type(event).__name__,
                    record.decision.ignored,
                )
            self._after_commit(record)
            return record.decision
        raise ConcurrencyConflict(
            f"saga {saga_id} kept changing under {MAX_CONFLICT_RETRIES} attempts to apply "
            f"{type(event).__name__}"
        )

    def _apply_once(
        self, saga_id: str, event: Event, skip_locked: bool, loaded: Loaded | None = None
    ) -> TransitionRecord | None:
        now = self.clock()
        began = time.perf_counter()
        definitions: list[SagaDefinition] = []

        def decide(saga: Saga) -> Decision:
            definition = registry.get(saga.saga_type)
            definitions.append(definition)
            return transition(definition, saga, event, now, self.limits)

        applied = self.store.apply(saga_id, decide, now, skip_locked=skip_locked, loaded=loaded)
        if applied is None:
            return None
        return TransitionRecord(
            definitions[-1],
            applied.before,
            applied.decision,
            time.perf_counter() - began,
            loaded is None or not loaded.carried,  # a checkpoint was read, here or by the step
            applied.committed,
        )

    def reject(
        self,
        saga_id: str,
        reason: str,
        *,
        user_id: str | None = None,
        ip_address: str | None = None,
        data: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> bool:
        """Audit a refused start under a valid saga_id that has no saga yet."""
        event = AuditEvent(
            event_type="saga_rejected",
            state_before=None,
            state_after=SagaState.FAILED,
            event_data=dict(data or {}),
            error_message=reason,
            user_id=user_id,
            ip_address=ip_address,
        )
        return retry_transient(
            lambda: self.store.record_rejection(saga_id, (event,), context or {}, self.clock()),
            max_wait_seconds=self.db_retry_seconds,
            what=f"rejection of saga {saga_id}",
        )

    def _after_commit(self, record: TransitionRecord) -> None:
        # Persist first, then send: a crash in between leaves a stalled saga that the
        # recovery scan re-sends, never a step whose transition was not recorded.
        decision = record.decision
        for command in decision.commands:
            try:
                self.dispatcher.send(record.definition, decision.saga, command, record.committed)
            except Exception:
                log.exception(
                    "saga %s: sending step %s %s attempt %s failed; recovery will re-send it",
                    decision.saga.saga_id,
                    command.step_index,
                    command.direction.value,
                    command.attempt,
                )
        for hook in self.hooks:
            try:
                hook.on_transition(record)
            except Exception:
                log.exception("engine hook %r failed", hook)
