"""Reading, inspecting and operating sagas; shared by library users and the CLI.

What the `saga-worker` command shows about sagas comes from here (its `audit` commands use
audit/archive.py): the CLI only parses options and prints what these methods return.
Database errors become one `SagaError` with the URL (password hidden), never a driver
traceback.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from datetime import datetime
from typing import Any

from . import registry
from .audit.chain import iso_utc
from .audit.redaction import Redactor
from .config import Settings, check_broker_url
from .core.business_key import MAX_BUSINESS_KEY, key_text
from .core.definition import SagaDefinition
from .core.events import Event, MigrateRequested
from .core.model import Attempt, Saga, SagaState
from .engine import Dispatcher, EngineHooks, SagaEngine, utcnow
from .errors import (
    BrokerUnavailable,
    InvalidFilter,
    OperationRefused,
    SagaNotFound,
    UnknownDefinitionVersion,
    UnknownSagaType,
)
from .migrator import Migrator
from .requests import (
    check_time_range,
    parse_abort,
    parse_migrate,
    parse_retry,
    parse_signal,
    parse_vote,
    valid_saga_id,
)
from .store import workers
from .store.connect import create_db_engine
from .store.failures import database_errors, first_line, masked_url
from .store.keyring import signing_key_for
from .store.port import LIVE_WINDOW
from .store.queries import SagaQuery
from .store.repository import SagaStore
from .views import (
    MigrationResult,
    OperatorResult,
    SagaPage,
    SagaStatus,
    SagaSummary,
    VersionLine,
    VersionsReport,
)
from .worker.dispatch import shown_kwargs

MAX_PAGE_SIZE = 500


class SagaClient:
    """Talks to the saga database directly and to the workers through the broker."""

    def __init__(
        self,
        settings: Settings | None = None,
        app: Any = None,
        *,
        dispatcher: Dispatcher | None = None,
        clock: Callable[[], datetime] = utcnow,
        hooks: Sequence[EngineHooks] = (),
    ) -> None:
        self.settings = settings or Settings.from_env()
        self.redactor = Redactor(self.settings.redact_keys)
        self.store = SagaStore(create_db_engine(self.settings.database_url), self.redactor)
        self.limits = self.settings.limits()
        self.clock = clock
        # Observers of this process's transitions (metrics.serve.operator_hooks).
        self.hooks = tuple(hooks)
        self._app = app
        self._dispatcher = dispatcher
        self._engine: SagaEngine | None = None
        self._imported = False
        # The console calls one client from a thread pool: build app, dispatcher and engine once.
        self._lazy = threading.RLock()

    @property
    def safe_url(self) -> str:
        """The database URL with its password masked, for messages."""
        return masked_url(self.settings.database_url)

    @property
    def app(self) -> Any:
        with self._lazy:
            return self._make_app()

    def _make_app(self) -> Any:
        if self._app is None:
            from .worker.app import create_app

            # First, so that a missing module or an unknown broker transport is a
            # configuration error, not a traceback.
            registry.import_modules(self.settings.imports)
            check_broker_url(self.settings.broker_url)
            self._app = create_app(self.settings)
        return self._app

    @property
    def dispatcher(self) -> Dispatcher:
        with self._lazy:
            return self._make_dispatcher()

    def _make_dispatcher(self) -> Dispatcher:
        if self._dispatcher is None:
            from .worker.dispatch import CeleryDispatcher

            with self._database():
                key = signing_key_for(self.settings, self.store)
            self._dispatcher = CeleryDispatcher(self.app, self.settings, key)
        return self._dispatcher

    @property
    def engine(self) -> SagaEngine:
        """The same engine the workers run, for operator events (abort, retry)."""
        with self._lazy:
            if self._engine is None:
                self._engine = SagaEngine(
                    self.store, self.dispatcher, self.limits, clock=self.clock, hooks=self.hooks
                )
            return self._engine

    def close(self) -> None:
        self.store.engine.dispose()

    # -- producer messages ---------------------------------------------------------------

    def start(self, saga_type: str, context: dict[str, Any], **fields: Any) -> str:
        """Send saga.start exactly as a producer would; returns the saga's id.

        Without a saga_id the id is the start message's task id (docs/contract.md, Producer).
        It is also put in the message, so the id holds whatever version the workers run.
        """
        from celery.utils import uuid

        task_id = uuid()
        fields = {k: v for k, v in fields.items() if v is not None}
        fields.setdefault("saga_id", task_id)  # == result.id
        with self._broker():
            kwargs = {"saga_type": saga_type, "context": context, **fields}
            result = self.app.send_task(
                "saga.start",
                kwargs=kwargs,
                kwargsrepr=shown_kwargs(self.redactor, kwargs),
                queue=self.settings.queue,
                task_id=task_id,
            )
        return str(fields["saga_id"]) if "saga_id" in fields else str(result.id)

    def rejections(self, saga_id: str) -> list[str]:
        """Why starts of this saga_id were rejected (`saga_rejected` audit rows), oldest first."""
        return [
            str(row["error_message"] or "")
            for row in self.audit_trail(saga_id)
            if row["event_type"] == "saga_rejected"
        ]

    def wait_started(
        self, saga_id: str, timeout: float, rejections_before: int = 0
    ) -> tuple[Saga | None, str | None]:
        """Poll until the saga is terminal, its start was rejected, or `timeout` passes.

        Returns the last checkpoint seen (None if there is none) and the rejection reason when
        a new `saga_rejected` row appeared for this id.
        """
        deadline = time.monotonic() + timeout
        while True:
            saga = self.get(saga_id)
            if saga is not None and saga.state.is_terminal:
                return saga, None
            if saga is None:
                reasons = self.rejections(saga_id)
                if len(reasons) > rejections_before:
                    return None, reasons[-1]
            if time.monotonic() >= deadline:
                return saga, None
            time.sleep(0.2)

    def send_abort(self, saga_id: str, reason: str, user_id: str | None = None) -> None:
        """Send saga.abort through the broker, exactly as a producer would."""
        with self._broker():
            kwargs = {"saga_id": saga_id, "reason": reason, "user_id": user_id}
            self.app.send_task(
                "saga.abort",
                kwargs=kwargs,
                kwargsrepr=shown_kwargs(self.redactor, kwargs),
                queue=self.settings.queue,
            )

    # -- reading sagas -------------------------------------------------------------------

    def get(self, saga_id: str) -> Saga | None:
        with self._database():
            return self.store.load(saga_id)

    def status(self, saga_id: str) -> SagaStatus:
        """A saga's checkpoint as `saga-worker status` shows it; SagaNotFound if unknown."""
        saga = self._load(saga_id)
        definition = self.definition(saga.saga_type, saga.definition_version)
        pending = None
        stalled = False
        if saga.pending is not None:
            pending = self._describe_pending(saga.pending, definition)
            stalled = any(a.stalled(self.clock()) for a in saga.attempts)
        return SagaStatus(
            saga=saga,
            context=self.redactor.value(dict(saga.context)),
            error=self.redactor.text(saga.error),
            steps=definition.step_names if definition else None,
            pending=pending,
            stalled=stalled,
            attempts=tuple(self._describe_pending(a, definition) for a in saga.attempts),
        )

    def list_sagas(
        self,
        *,
        states: Sequence[str] = (),
        saga_type: str | None = None,
        user_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        page: int = 1,
        page_size: int = 20,
        waiting: bool = False,
        business_key: str | None = None,
        count_limit: int | None = None,
    ) -> SagaPage:
        """A page of sagas, newest first, plus how many of the filter are in each state.

        `business_key` matches exactly (`SagaDefinition.business_key`). With `count_limit`,
        each state's count stops there (the console: a bounded scan per state instead of
        counting a million rows per page) and `total_at_least` says a count reached it.
        """
        wanted = []
        for state in states:
            try:
                wanted.append(SagaState(state.upper()).value)
            except ValueError:
                known = ", ".join(s.value for s in SagaState)
                raise InvalidFilter(f"unknown state {state!r}; use one of {known}") from None
        if page < 1:
            raise InvalidFilter(f"page must be 1 or more, got {page}")
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise InvalidFilter(f"page size must be 1-{MAX_PAGE_SIZE}, got {page_size}")
        check_time_range(since, until)
        if business_key is not None and key_text(business_key) != business_key:
            # No saga has such a key, and PostgreSQL would refuse a NUL in the query.
            raise InvalidFilter(
                f"a business key is 1-{MAX_BUSINESS_KEY} characters without control "
                f"characters, got {business_key[:60]!r}"
            )
        query = SagaQuery(
            states=tuple(wanted),
            saga_type=saga_type,
            user_id=user_id,
            started_after=since,
            started_before=until,
            waiting=waiting,
            business_key=business_key,
        )
        if count_limit is not None and count_limit < 1:
            raise InvalidFilter(f"count limit must be 1 or more, got {count_limit}")
        with self._database():
            counts = self.store.count_sagas_by_state(query, limit=count_limit)
            sagas = self.store.list_sagas(query, limit=page_size, offset=(page - 1) * page_size)
        capped = count_limit is not None and any(
            n > count_limit for s, n in counts.items() if not wanted or s in wanted
        )
        if count_limit is not None:
            counts = {s: min(n, count_limit) for s, n in counts.items()}
        total = sum(n for s, n in counts.items() if not wanted or s in wanted)
        items = [
            SagaSummary(
                saga_id=s.saga_id,
                saga_type=s.saga_type,
                state=s.state.value,
                current_step_index=s.current_step_index,
                total_steps=s.total_steps,
                user_id=s.user_id,
                started_at=s.started_at,
                updated_at=s.updated_at,
                error=self.redactor.text(s.error),
                definition_version=s.definition_version,
                parked_at=s.parked_at,
                waiting_for=s.waiting_for,
                waiting_since=s.waiting_since,
                business_key=s.business_key,
            )
            for s in sagas
        ]
        ordered = {s.value: counts.get(s.value, 0) for s in SagaState}
        return SagaPage(items, page, page_size, total, ordered, total_at_least=capped)

    def wait_terminal(
        self, saga_ids: Iterable[str], timeout: float = 60.0
    ) -> dict[str, Saga | None]:
        """Poll until every saga is terminal or `timeout` passes; returns the last seen states."""
        ids = list(saga_ids)
        deadline = time.monotonic() + timeout
        while True:
            seen = {saga_id: self.store.load(saga_id) for saga_id in ids}
            done = all(s is not None and s.state.is_terminal for s in seen.values())
            if done or time.monotonic() > deadline:
                return seen
            time.sleep(0.2)

    def versions(self) -> VersionsReport:
        """Per saga type and definition version: sagas not yet ended, the oldest, and the
        live workers (heartbeats) that have the version."""
        with self._database():
            loads = workers.versions_in_flight(self.store.engine)
            live = workers.live_workers(self.store.engine, LIVE_WINDOW, self.clock())
        nodes = Counter(w.node for w in live)
        serving: dict[tuple[str, str | None], list[str]] = {}
        for worker in live:
            # The node name, and the instance id where workers share it (one host, no -n).
            label = worker.node if nodes[worker.node] == 1 else worker.key
            for key in worker.versions:
                serving.setdefault(key, []).append(label)
        keys = {(x.saga_type, x.version) for x in loads} | set(serving)
        by_key = {(x.saga_type, x.version): x for x in loads}
        lines = []
        for saga_type, version in sorted(keys, key=lambda k: (k[0], str(k[1]))):
            load = by_key.get((saga_type, version))
            lines.append(
                VersionLine(
                    saga_type,
                    version,
                    load.running if load else 0,
                    load.parked if load else 0,
                    load.failed if load else 0,
                    load.oldest if load else None,
                    tuple(serving.get((saga_type, version), ())),
                )
            )
        shown = tuple(
            {
                "node": w.node,
                "instance": w.instance,
                "queue": w.queue,
                "versions": [{"saga_type": t, "version": v} for t, v in w.versions],
                "started_at": iso_utc(w.started_at),
                "seen_at": iso_utc(w.seen_at),
            }
            for w in live
        )
        return VersionsReport(tuple(lines), shown)

    def definition(self, saga_type: str, version: str | None = None) -> SagaDefinition | None:
        """The registered definition of a saga type's version (None: the one new starts use;
        modules of SAGA_IMPORTS imported once), or None when it is not registered here."""
        self._import_definitions()
        try:
            return registry.get_version(saga_type, version)
        except (UnknownSagaType, UnknownDefinitionVersion):
            return None

    # -- operator actions ----------------------------------------------------------------

    def abort(self, saga_id: str, reason: str, user_id: str | None = None) -> OperatorResult:
        """Abort a saga as the producer's saga.abort does, applied now through the engine."""
        parsed_id, event = parse_abort(
            (), {"saga_id": saga_id, "reason": reason, "user_id": user_id}
        )
        return self._operate("abort", parsed_id, event)

    def signal(
        self,
        saga_id: str,
        signal: str,
        payload: Mapping[str, Any] | None = None,
        user_id: str | None = None,
    ) -> OperatorResult:
        """Send a saga's wait its signal as the producer's saga.signal does, applied now."""
        kwargs = {"saga_id": saga_id, "signal": signal, "payload": payload or {}}
        parsed_id, event = parse_signal((), {**kwargs, "user_id": user_id}, self.settings)
        return self._operate("signal", parsed_id, event)

    def vote(
        self,
        saga_id: str,
        user_id: str,
        *,
        approve: bool,
        wait: str | None = None,
        reason: str = "",
    ) -> OperatorResult:
        """Approve or reject the approval a saga waits for, as the identified `user_id`.

        A vote that may not count (the starter's, a second one) is audited and then
        refused (OperationRefused)."""
        event = parse_vote(user_id, approve, wait, reason)
        return self._operate("approve" if approve else "reject", saga_id, event)

    def retry(
        self,
        saga_id: str,
        user_id: str,
        *,
        force: bool = False,
        reason: str = "operator retry",
    ) -> OperatorResult:
        """FAILED: re-run the failed compensations. Stalled: re-send the pending attempt now.

        Both are the core's RetryRequested, audited with the operator: FAILED re-runs the
        failed compensations (fresh attempt numbers, highest step first); a stalled or held
        attempt is re-sent now (`saga_recovered` naming the operator). A live attempt that
        has not passed its deadline is left alone unless `force`.
        """
        event = parse_retry(user_id, reason, force=force)
        # Where the operator acted from, beside who (validated first: the suffix is ours).
        event = replace(event, reason=f"{event.reason} (from {socket.gethostname()})")
        return self._operate("retry", saga_id, event)

    def migrate(
        self,
        saga_id: str,
        to_version: str,
        user_id: str,
        *,
        mapping: Mapping[str, str] | Sequence[str] = (),
        reason: str = "operator migration",
        dry_run: bool = False,
    ) -> MigrationResult:
        """Move a saga in flight to version `to_version` of its type under `mapping` (old
        step name -> new, or `OLD=NEW` strings); MigrationRefused when it cannot move.
        `dry_run` writes and sends nothing (and needs no broker)."""
        migrator, request = self._migrator(user_id, reason, mapping)
        self._load(saga_id)  # a malformed or unknown id: exit 2 or 3
        with self._database():
            return migrator.one(saga_id, to_version, request, dry_run=dry_run)

    def migrate_version(
        self,
        saga_type: str,
        from_version: str,
        to_version: str,
        user_id: str,
        *,
        mapping: Mapping[str, str] | Sequence[str] = (),
        reason: str = "operator migration",
        dry_run: bool = False,
    ) -> Iterator[MigrationResult]:
        """`migrate` every saga in flight of (saga_type, from_version), read a page at a
        time: one result each, refusals included (not raised)."""
        migrator, request = self._migrator(user_id, reason, mapping)
        results = migrator.batch(saga_type, from_version, to_version, request, dry_run=dry_run)
        while True:
            with self._database():
                result = next(results, None)
            if result is None:
                return
            yield result

    def _migrator(
        self, user_id: str, reason: str, mapping: Mapping[str, str] | Sequence[str]
    ) -> tuple[Migrator, MigrateRequested]:
        request = parse_migrate(user_id, reason, mapping)
        # Where the operator acted from, beside who (validated first: the suffix is ours).
        request = replace(request, reason=f"{request.reason} (from {socket.gethostname()})")
        self._import_definitions()
        return Migrator(self.store, self._migration_engine, self.redactor.text), request

    def _migration_engine(self, dry_run: bool) -> SagaEngine:
        if not dry_run:
            return self.engine
        # Nothing is written or sent: no broker, no signing key needed.
        return SagaEngine(self.store, _NoDispatch(), self.limits, clock=self.clock)

    def _operate(self, action: str, saga_id: str, event: Event) -> OperatorResult:
        """Apply an operator's event through the engine; refusals and send errors reported."""
        before = self._load(saga_id)
        with self._database():
            outcome = self.engine.handle(saga_id, event)
        if outcome.ignored:
            raise OperationRefused(f"{action} of saga {saga_id} not applied: {outcome.ignored}")
        for row in outcome.decision.audit:
            # Audited, yet it did nothing: a refused vote, an ignored signal.
            why = row.event_data.get("refused") or row.event_data.get("ignored")
            if why:
                raise OperationRefused(f"{action} of saga {saga_id} recorded, not applied: {why}")
        return OperatorResult(
            saga_id=saga_id,
            action=action,
            state_before=before.state.value,
            state_after=outcome.decision.saga.state.value,
            audit_events=tuple(e.event_type for e in outcome.decision.audit),
            sent=outcome.sent,
            send_errors=tuple(
                f"{f.task_name}: {self.redactor.text(f.error)}" for f in outcome.send_failures
            ),
        )

    def _import_definitions(self) -> None:
        with self._lazy:
            if not self._imported:
                registry.import_modules(self.settings.imports)
                self._imported = True

    # -- audit ---------------------------------------------------------------------------

    def audit_trail(self, saga_id: str) -> list[dict[str, Any]]:
        with self._database():
            return self.store.audit_trail(saga_id)

    # -- helpers -------------------------------------------------------------------------

    def _load(self, saga_id: str) -> Saga:
        if not valid_saga_id(saga_id):
            raise InvalidFilter(
                f"{saga_id!r} is not a saga id (1-255 characters of A-Z a-z 0-9 . _ : -)"
            )
        with self._database():
            saga = self.store.load(saga_id)
        if saga is None:
            raise SagaNotFound(saga_id)
        return saga

    def _describe_pending(
        self, pending: Attempt, definition: SagaDefinition | None
    ) -> dict[str, Any]:
        data: dict[str, Any] = {
            "step_index": pending.step_index,
            "step": None,
            "direction": pending.direction.value,
            "attempt": pending.number,
            "max_attempts": None,
            "held": pending.held,
            "not_before": iso_utc(pending.not_before),
            "deadline": iso_utc(pending.deadline),
            "recoveries": pending.recoveries,
        }
        if definition is not None and pending.step_index < len(definition.steps):
            step = definition.steps[pending.step_index]
            data["step"] = step.name
            data["max_attempts"] = step.policy(pending.direction).max_attempts
        return data

    @contextmanager
    def _broker(self) -> Iterator[None]:
        """A broker that cannot be reached is one line naming it (password hidden)."""
        from kombu.exceptions import OperationalError as BrokerError
        from kombu.utils.url import maybe_sanitize_url

        try:
            yield
        except BrokerError as exc:
            safe = maybe_sanitize_url(self.settings.broker_url)
            raise BrokerUnavailable(
                f"cannot reach the broker at {safe}: {first_line(exc)}"
            ) from None

    def _database(self) -> AbstractContextManager[None]:
        """Turn driver errors into one line naming the database (password hidden)."""
        return database_errors(self.safe_url)


class _NoDispatch:
    """The dispatcher of a dry run, which sends nothing."""

    def send(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("a dry run sends nothing")
