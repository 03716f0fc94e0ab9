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
from .core.decision import Decision, Limits
from .core.definition import SagaDefinition
from .core.events import AbortRequested, Event, MigrateRequested, ParkRequested, StartRequested
from .core.migration import Shape, migrate
from .core.model import Saga
from .core.parking import park, record_abort
from .core.rejection import rejected_start
from .core.transition import start, transition
from .errors import ConcurrencyConflict, SagaNotFound, UnknownDefinitionVersion
from .store.port import Loaded, Store

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
    `committed` is the checkpoint as written (None when nothing changed). `definition` is
    None for a park, which is decided without one (core/parking.py).
    """

    definition: SagaDefinition | None
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
class SendFailure:
    """A command committed but not sent: the recovery sweep re-sends it after its deadline."""

    command: RunAttempt
    task_name: str
    error: str


@dataclass(frozen=True)
class Outcome:
    """What `SagaEngine.handle` did: the decision, and which of its commands went out."""

    decision: Decision
    sent: tuple[str, ...] = ()
    send_failures: tuple[SendFailure, ...] = ()

    @property
    def changed(self) -> bool:
        return self.decision.changed

    @property
    def ignored(self) -> str | None:
        return self.decision.ignored


@dataclass(frozen=True)
class StartResult:
    """What `SagaEngine.start` did: `created` is False for a duplicate saga_id."""

    saga_id: str
    created: bool
    decision: Decision | None
    send_failures: tuple[SendFailure, ...] = ()


class SagaEngine:
    """The thin imperative shell around `core.transition`."""

    def __init__(
        self,
        store: Store,
        dispatcher: Dispatcher,
        limits: Limits,
        *,
        clock: Callable[[], datetime] = utcnow,
        hooks: Sequence[EngineHooks] = (),
        definitions: Callable[[str, str | None], SagaDefinition] = registry.get_version,
    ) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.limits = limits
        self.clock = clock
        self.hooks = list(hooks)
        #: Finds the definition of (saga type, version); version None is the one new starts
        #: use. The process-wide registry, or a test's own.
        self.definitions = definitions

    def start(self, request: StartRequested) -> StartResult:
        """Create the saga and send its first step; a known saga_id is a silent duplicate."""
        definition = self.definitions(request.saga_type, None)
        record = self.store.retrying(
            lambda: self._start_once(definition, request),
            f"start of saga {request.saga_id}",
        )
        if record is None:
            log.info("saga %s already exists: duplicate start ignored", request.saga_id)
            return StartResult(request.saga_id, False, None)
        outcome = self._after_commit(record)
        return StartResult(request.saga_id, True, record.decision, outcome.send_failures)

    def _start_once(
        self, definition: SagaDefinition, request: StartRequested
    ) -> TransitionRecord | None:
        # Decided on each try with a fresh clock, as `_apply_once` does: after the store
        # waited out a database outage, the first attempt's start-by counts from now, not
        # from before the wait (which could send the step message already expired).
        now = self.clock()
        decision = start(definition, request, now, self.limits)
        began = time.perf_counter()
        committed = self.store.create(decision, now)
        if committed is None:
            return None
        return TransitionRecord(
            definition, None, decision, time.perf_counter() - began, False, committed
        )

    def handle(
        self,
        saga_id: str,
        event: Event,
        *,
        skip_locked: bool = False,
        loaded: Loaded | None = None,
    ) -> Outcome:
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
                outcome = self.store.retrying(
                    apply_once,
                    f"transition of saga {saga_id}",
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
            return self._after_commit(record)
        raise ConcurrencyConflict(
            f"saga {saga_id} kept changing under {MAX_CONFLICT_RETRIES} attempts to apply "
            f"{type(event).__name__}"
        )

    def _apply_once(
        self, saga_id: str, event: Event, skip_locked: bool, loaded: Loaded | None = None
    ) -> TransitionRecord | None:
        now = self.clock()
        began = time.perf_counter()
        definitions: list[SagaDefinition | None] = []

        def decide(saga: Saga) -> Decision:
            try:
                definition = self.definition_for(saga)
            except UnknownDefinitionVersion:
                if not isinstance(event, AbortRequested):
                    raise
                # Recorded here, so that the abort holds wherever the saga goes on (a
                # worker with its version, or a migration).
                definitions.append(None)
                return record_abort(saga, event, now)
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

    def definition_for(self, saga: Saga) -> SagaDefinition:
        """The definition `saga` runs under: its own version's, with the step structure it
        started with; UnknownDefinitionVersion otherwise (a label reused for other steps)."""
        definition = self.definitions(saga.saga_type, saga.definition_version)
        recorded = saga.definition_structure
        if recorded is not None and definition.structure != recorded:
            raise UnknownDefinitionVersion(
                saga.saga_type,
                definition.version,
                [],
                why=(
                    f"is registered here with other steps than the saga started with "
                    f"(structure {definition.structure}, the saga's {recorded}): a version "
                    "label was kept across a change of steps; give the new steps a new label"
                ),
            )
        return definition

    def park(self, saga_id: str, event: ParkRequested) -> Outcome:
        """Park an overdue saga whose version no live worker has (no definition needed);
        another sweep holding the row raises SkippedLocked."""

        def apply_once() -> TransitionRecord | None:
            now = self.clock()
            began = time.perf_counter()
            applied = self.store.apply(
                saga_id, lambda saga: park(saga, event, now), now, skip_locked=True
            )
            if applied is None:
                return None
            elapsed = time.perf_counter() - began
            return TransitionRecord(
                None, applied.before, applied.decision, elapsed, True, applied.committed
            )

        record = self.store.retrying(apply_once, f"park of saga {saga_id}")
        if record is None:
            raise SagaNotFound(saga_id)
        return self._after_commit(record)

    def migrate(
        self,
        saga_id: str,
        target: SagaDefinition,
        shape: Shape,
        event: MigrateRequested,
        *,
        dry_run: bool = False,
    ) -> Outcome:
        """Move a saga in flight to `target`, whose old version's outline is `shape`
        (core/migration.py); its next attempt goes out after the commit, to the new version's
        queue. `dry_run` decides on the current checkpoint and writes and sends nothing."""

        if dry_run:
            loaded = self.store.retrying(
                lambda: self.store.load_for_step(saga_id), f"read of saga {saga_id}"
            )
            if loaded is None:
                raise SagaNotFound(saga_id)
            return Outcome(migrate(target, loaded.saga, shape, event, self.clock(), self.limits))

        def apply_once() -> TransitionRecord | None:
            now = self.clock()
            began = time.perf_counter()
            applied = self.store.apply(
                saga_id, lambda saga: migrate(target, saga, shape, event, now, self.limits), now
            )
            if applied is None:
                return None
            elapsed = time.perf_counter() - began
            return TransitionRecord(
                target, applied.before, applied.decision, elapsed, True, applied.committed
            )

        for _ in range(MAX_CONFLICT_RETRIES):
            try:
                record = self.store.retrying(apply_once, f"migration of saga {saga_id}")
            except ConcurrencyConflict:
                continue  # decided again on the saga as the other writer left it
            if record is None:
                raise SagaNotFound(saga_id)
            return self._after_commit(record)
        raise ConcurrencyConflict(
            f"saga {saga_id} kept changing under {MAX_CONFLICT_RETRIES} attempts to migrate it"
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
        """Audit a refused start under a valid saga_id that has no saga yet.

        False when the saga_id has a saga: the refused message was a duplicate of its start.
        """
        event = rejected_start(reason, user_id=user_id, ip_address=ip_address, data=data)
        return self.store.retrying(
            lambda: self.store.record_rejection(saga_id, (event,), context or {}, self.clock()),
            f"rejection of saga {saga_id}",
        )

    def _after_commit(self, record: TransitionRecord) -> Outcome:
        # Persist first, then send: a crash in between leaves a stalled saga that the
        # recovery scan re-sends, never a step whose transition was not recorded.
        decision = record.decision
        sent: list[str] = []
        failures: list[SendFailure] = []
        definition = record.definition
        commands = decision.commands if definition is not None else ()
        for command in commands:
            assert definition is not None  # a park (no definition) sends nothing
            name = definition.task_name(command.step_index, command.direction)
            try:
                self.dispatcher.send(definition, decision.saga, command, record.committed)
            except Exception as exc:
                log.exception(
                    "saga %s: sending %s attempt %s failed; recovery will re-send it",
                    decision.saga.saga_id,
                    name,
                    command.attempt,
                )
                failures.append(SendFailure(command, name, f"{type(exc).__name__}: {exc}"))
            else:
                sent.append(name)
        for hook in self.hooks:
            try:
                hook.on_transition(record)
            except Exception:
                log.exception("engine hook %r failed", hook)
        return Outcome(decision, tuple(sent), tuple(failures))
