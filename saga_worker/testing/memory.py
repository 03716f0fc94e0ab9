"""An in-memory saga store, a recording dispatcher and a clock that moves when told.

`InMemoryStore` implements what `SagaEngine` calls on its store with the SQL store's
semantics: versions and ConcurrencyConflict, audit rows built by the real `build_rows`
(redaction, SHA-256 chain from the genesis hash, `audit_head` on the checkpoint), rejection
rows, and the recovery scan's order. Values go through JSON on the way in, as they do
through the database's JSON columns, so a test sees what a real load returns.
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from ..audit.chain import GENESIS_HASH, build_rows
from ..audit.redaction import Redactor
from ..audit.verify import ChainProblem, ChainVerifier
from ..config import DEFAULT_REDACT_KEYS
from ..core.commands import RunAttempt
from ..core.decision import AuditEvent, Decision
from ..core.definition import Remote, SagaDefinition
from ..core.model import Direction, Saga
from ..errors import ConcurrencyConflict
from ..store.codec import WRITE_ONCE_COLUMNS, saga_from_row, saga_to_row
from ..store.port import Applied, Loaded, StalledRow, Store, VersionKey

#: Where a `FakeClock` starts unless told otherwise.
DEFAULT_START = datetime(2026, 1, 1, tzinfo=UTC)

# Checkpoint columns the database stores as JSON (store/tables.py).
_JSON_COLUMNS = (
    "completed_steps",
    "compensated_steps",
    "context",
    "pending",
    "failed_compensations",
)


def _json_copy(value: Any) -> Any:
    """`value` as it comes back from a JSON column: tuples become lists, nothing is shared."""
    return json.loads(json.dumps(value, ensure_ascii=False, allow_nan=False))


T = TypeVar("T")


class FakeClock:
    """A clock that moves only when told; pass it as `SagaEngine(clock=...)`."""

    def __init__(self, start: datetime = DEFAULT_START) -> None:
        if start.tzinfo is None:
            raise ValueError("FakeClock needs an aware datetime (e.g. tzinfo=UTC)")
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        return self._now

    def advance(self, seconds: float) -> datetime:
        """Move the clock forward by `seconds` (never back); returns the new time."""
        if seconds < 0:
            raise ValueError(f"a clock only moves forward, got {seconds} seconds")
        with self._lock:
            self._now += timedelta(seconds=seconds)
            return self._now

    def advance_to(self, when: datetime) -> datetime:
        """Move the clock to `when` if that is later; returns the new time."""
        with self._lock:
            self._now = max(self._now, when)
            return self._now


class InMemoryStore:
    """The engine's store in memory, thread-safe; a drop-in for the SQL `SagaStore` in tests.

    `skip_locked` is accepted and ignored: there are no row locks to skip (the SQL store
    ignores it on SQLite too); the version check still turns a second writer into a conflict.
    """

    def __init__(self, redactor: Redactor | None = None) -> None:
        self.redactor = redactor if redactor is not None else Redactor(DEFAULT_REDACT_KEYS)
        self._lock = threading.Lock()
        self._checkpoints: dict[str, dict[str, Any]] = {}
        self._audit: list[dict[str, Any]] = []
        #: What `live_versions` answers: the versions of workers a test pretends are live.
        self.workers: set[VersionKey] = set()

    # -- writes: the engine's interface ---------------------------------------------------

    def create(self, decision: Decision, now: datetime) -> Loaded | None:
        """Insert a new saga and its first audit rows; None when the saga_id exists."""
        saga = decision.saga
        with self._lock:
            if saga.saga_id in self._checkpoints:
                return None
            # A rejection may have written rows under this saga_id: the chain goes on from them.
            head = self._last_hash(saga.saga_id)
            head = self._write(saga, 1, decision.audit, now, head)
        return Loaded(replace(saga, version=1), head)

    def apply(
        self,
        saga_id: str,
        decide: Callable[[Saga], Decision],
        now: datetime,
        *,
        skip_locked: bool = False,
        loaded: Loaded | None = None,
    ) -> Applied | None:
        """Load (or use `loaded`), decide, commit with version + 1; None for an unknown saga.

        Raises ConcurrencyConflict when the version moved since the load, as the SQL store's
        guarded UPDATE does. `decide` runs outside the lock, so concurrent writers can race.
        """
        if loaded is None:
            loaded = self.load_for_step(saga_id)
            if loaded is None:
                return None
        before = loaded.saga
        decision = decide(before)
        if not decision.changed:
            return Applied(before, decision, None)
        with self._lock:
            current = self._checkpoints.get(saga_id)
            if current is None or current["version"] != before.version:
                raise ConcurrencyConflict(f"saga {saga_id} changed concurrently")
            head = self._write(
                decision.saga, before.version + 1, decision.audit, now, loaded.audit_head
            )
        return Applied(
            before, decision, Loaded(replace(decision.saga, version=before.version + 1), head)
        )

    def record_rejection(
        self,
        saga_id: str,
        events: tuple[AuditEvent, ...],
        context: Mapping[str, Any],
        now: datetime,
    ) -> bool:
        """Write rejection rows for a saga_id that has no checkpoint; False if it has one."""
        with self._lock:
            if saga_id in self._checkpoints:
                return False
            rows = build_rows(
                saga_id, context, events, now, self._last_hash(saga_id), self.redactor
            )
            self._append(rows)
        return True

    def retrying(self, operation: Callable[[], T], what: str) -> T:
        """Run `operation` once: memory has no transient errors to wait out."""
        return operation()

    # -- reads ------------------------------------------------------------------------------

    def load_for_step(self, saga_id: str) -> Loaded | None:
        """The checkpoint and its audit head."""
        with self._lock:
            row = self._checkpoints.get(saga_id)
            if row is None:
                return None
            row = copy.deepcopy(row)
        return Loaded(saga_from_row(row), str(row["audit_head"]))

    def load(self, saga_id: str) -> Saga | None:
        """The saga as last committed, or None."""
        loaded = self.load_for_step(saga_id)
        return None if loaded is None else loaded.saga

    def exists(self, saga_id: str) -> bool:
        """Whether a checkpoint exists (rejection rows alone do not make one)."""
        with self._lock:
            return saga_id in self._checkpoints

    def stalled(
        self, now: datetime, limit: int, after: tuple[datetime, str] | None = None
    ) -> list[StalledRow]:
        """Up to `limit` checkpoints whose deadline passed, by (deadline, id).

        `after` is the (deadline, saga_id) of the previous page's last row.
        """
        with self._lock:
            live = sorted(
                (
                    StalledRow(
                        saga_id,
                        copy.deepcopy(row["pending"]),
                        row["deadline"],
                        row["saga_type"],
                        row["definition_version"],
                    )
                    for saga_id, row in self._checkpoints.items()
                    if row["deadline"] is not None and row["deadline"] < now
                ),
                key=lambda entry: (entry.deadline, entry.saga_id),
            )
        if after is not None:
            live = [entry for entry in live if (entry.deadline, entry.saga_id) > after]
        return live[:limit]

    def parked(self, versions: Collection[VersionKey], limit: int) -> list[str]:
        """Ids of parked sagas of these (saga_type, version)s, longest parked first."""
        wanted = set(versions)
        with self._lock:
            found = sorted(
                (row["parked_at"], saga_id)
                for saga_id, row in self._checkpoints.items()
                if row["parked_at"] is not None
                and (row["saga_type"], row["definition_version"]) in wanted
            )
        return [saga_id for _, saga_id in found[:limit]]

    def live_versions(self, window: timedelta, now: datetime) -> set[VersionKey]:
        """The versions `workers` says live workers have (a test sets it; default none)."""
        return set(self.workers)

    def audit_trail(self, saga_id: str) -> list[dict[str, Any]]:
        """A saga's audit rows (with their `id`) in the order they were written."""
        with self._lock:
            return [copy.deepcopy(row) for row in self._audit if row["saga_id"] == saga_id]

    def saga_chain(self, saga_id: str) -> tuple[list[dict[str, Any]], str | None]:
        """One saga's audit rows and its checkpoint's audit_head (None without a checkpoint)."""
        with self._lock:
            row = self._checkpoints.get(saga_id)
            head = None if row is None else str(row["audit_head"])
            return [copy.deepcopy(r) for r in self._audit if r["saga_id"] == saga_id], head

    def verify_audit(self) -> list[ChainProblem]:
        """Every chain checked as `saga-worker audit verify` does: hashes, links, heads."""
        with self._lock:
            rows = copy.deepcopy(self._audit)
            heads = {saga_id: str(row["audit_head"]) for saga_id, row in self._checkpoints.items()}
        verifier = ChainVerifier()
        for row in rows:
            verifier.add(row)
        for saga_id, head in sorted(heads.items()):
            verifier.check_head(saga_id, head)
        verifier.check_orphans()
        return verifier.problems

    # -- helpers (called with the lock held) -------------------------------------------------

    def _last_hash(self, saga_id: str) -> str:
        for row in reversed(self._audit):
            if row["saga_id"] == saga_id:
                return str(row["hash"])
        return GENESIS_HASH

    def _write(
        self,
        saga: Saga,
        version: int,
        events: tuple[AuditEvent, ...],
        now: datetime,
        prev_hash: str,
    ) -> str:
        """Store the checkpoint and its audit rows together; returns the new audit head."""
        rows = build_rows(saga.saga_id, saga.context, events, now, prev_hash, self.redactor)
        head = rows[-1]["hash"] if rows else prev_hash
        row = saga_to_row(saga)
        if row["deadline"] is not None:
            # The SQL column is rounded up (codec.scan_deadline: so that updates can be HOT
            # in PostgreSQL, at most a grain late). Here nothing is saved by it: the exact
            # earliest deadline, so that recover() just past it re-sends the attempt.
            row["deadline"] = min(a.deadline for a in saga.attempts)
        previous = self._checkpoints.get(saga.saga_id)
        if previous is not None:  # as the SQL store's UPDATE, which leaves them alone
            row.update({k: previous.get(k) for k in WRITE_ONCE_COLUMNS})
        for column in _JSON_COLUMNS:
            row[column] = _json_copy(row[column])
        row.update(version=version, audit_head=head)
        self._checkpoints[saga.saga_id] = row
        self._append(rows)
        return str(head)

    def _append(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            stored = dict(row)
            stored["event_data"] = _json_copy(row["event_data"])
            stored["context_snapshot"] = _json_copy(row["context_snapshot"])
            # The database returns UTC; the hash (iso_utc) is the same either way.
            stored["timestamp"] = row["timestamp"].astimezone(UTC)
            stored["id"] = len(self._audit) + 1
            self._audit.append(stored)


@dataclass(frozen=True)
class SentAttempt:
    """One attempt the engine sent: the command and the saga as committed (what it carried)."""

    command: RunAttempt
    saga: Saga
    definition: SagaDefinition

    @property
    def key(self) -> tuple[int, Direction, int]:
        """(step_index, direction, attempt), comparable with `Attempt.key()`."""
        return (self.command.step_index, self.command.direction, self.command.attempt)

    @property
    def task_id(self) -> str:
        """The Celery task id a worker would have received it with (recorded in its
        `step_start` or `compensation_start` row)."""
        return self.command.task_id

    @property
    def step_name(self) -> str:
        """The name of the attempt's step."""
        return self.definition.steps[self.command.step_index].name

    @property
    def task_name(self) -> str:
        """The Celery task a worker would have received: saga.<type>.<step> or the remote's."""
        return self.definition.task_name(self.command.step_index, self.command.direction)

    @property
    def remote(self) -> bool:
        """A `Remote` target: another service runs it; a test delivers its result."""
        step = self.definition.steps[self.command.step_index]
        return isinstance(step.target(self.command.direction), Remote)


class SendFailed(ConnectionError):
    """What `RecordingDispatcher.send` raises when told to fail (a broker outage)."""


class RecordingDispatcher:
    """The engine's dispatcher for tests: records each send; `fail_next` makes sends fail."""

    def __init__(self) -> None:
        self.sent: list[SentAttempt] = []
        self.failed: list[SentAttempt] = []
        self._failures_left = 0
        self._lock = threading.Lock()

    def fail_next(self, count: int = 1) -> None:
        """Make the next `count` sends raise SendFailed (recorded in `failed`, not `sent`)."""
        with self._lock:
            self._failures_left = count

    def send(
        self,
        definition: SagaDefinition,
        saga: Saga,
        command: RunAttempt,
        checkpoint: Loaded | None = None,
    ) -> None:
        """Record `command` with the committed saga (from `checkpoint` when given)."""
        committed = (
            checkpoint.saga
            if checkpoint is not None and checkpoint.saga.saga_id == saga.saga_id
            else saga
        )
        attempt = SentAttempt(command, committed, definition)
        with self._lock:
            if self._failures_left > 0:
                self._failures_left -= 1
                self.failed.append(attempt)
                raise SendFailed(f"send of {attempt.task_name} attempt {command.attempt} failed")
            self.sent.append(attempt)


if TYPE_CHECKING:
    from ..store.repository import SagaStore

    # mypy checks that both stores still match the protocol (a changed signature fails here).
    def _both_conform(memory: InMemoryStore, sql: SagaStore) -> list[Store]:
        return [memory, sql]
