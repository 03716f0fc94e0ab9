"""The recovery sweep: re-send attempts that passed their deadline (the beat's job).

`saga.recover` runs `sweep` on a worker every SAGA_RECOVERY_INTERVAL_SECONDS. The sweep does
not run steps: it feeds each stalled saga an `AttemptStalled` (or, for a retry held in the
database, an `AttemptDue`) through the normal transition path, which commits the checkpoint and
a `saga_recovered` audit row and only then sends the attempt again. Two sweeps racing on one
saga (two beats, or a sweep that outlived its interval) recover it once: on PostgreSQL the
loser skips the row locked with FOR UPDATE SKIP LOCKED, and everywhere the version column and
the `recoveries` count carried by the event turn a second recovery of the same attempt into an
ignored transition.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from . import registry
from .core.events import ParkRequested, UnparkRequested
from .core.model import Attempt
from .core.recovery import RECOVERY_USER, RecoveryOutcome, recovery_event, recovery_outcome
from .engine import SagaEngine
from .errors import UnknownDefinitionVersion
from .store.codec import attempts_from_json
from .store.port import LIVE_WINDOW, SkippedLocked, StalledRow, Store, VersionKey

log = logging.getLogger(__name__)

#: Rows read per query; a sweep pages on (deadline, saga_id) until none is left.
BATCH = 500
#: A sweep stops paging after this long and leaves the rest to the next one, so that one
#: sweep never holds a worker process for long after a mass stall (e.g. a wiped broker).
MAX_SWEEP_SECONDS = 60.0


@dataclass(frozen=True)
class SweepResult:
    """Counts of one sweep.

    `recovered`: stalled attempts re-sent; `due`: held retries sent; `gave_up`: attempts
    failed after max_recoveries; `skipped`: sagas another sweep held or had just recovered;
    `failed`: sagas whose recovery raised, or that cannot be recovered (the next sweep
    tries again; each is logged as an error); `parked`: sagas parked because no live worker
    has their definition version; `resumed`: parked sagas of a version here, sent again.
    """

    examined: int
    recovered: int
    failed: int
    due: int = 0
    gave_up: int = 0
    skipped: int = 0
    parked: int = 0
    resumed: int = 0


def sweep(
    store: Store,
    engine: SagaEngine,
    now: datetime,
    batch: int = BATCH,
    max_seconds: float = MAX_SWEEP_SECONDS,
    *,
    local: Collection[VersionKey] | None = None,
    live_since: datetime | None = None,
) -> SweepResult:
    """Recover each stalled saga through the normal transition path (which re-enqueues).

    `local` are the definition versions this process has (default: every registered one).
    A stalled saga of another version is left to a live worker that has it, or parked when
    none has. A heartbeat is live for LIVE_WINDOW, measured by the database's clock on
    PostgreSQL (store/workers.py); `live_since` shortens or widens that to `now - live_since`.
    Parked sagas of a local version are resumed first.
    """
    mine = set(registry.version_keys() if local is None else local)
    counts: Counter[RecoveryOutcome | None] = Counter()
    examined = 0
    began = time.monotonic()
    resumed = _resume_parked(store, engine, mine, batch)
    live: set[VersionKey] | None = None  # read once, when the first foreign saga shows up
    after: tuple[datetime, str] | None = None
    while True:
        page = store.stalled(now, batch, after)
        for row in page:
            examined += 1
            key = (row.saga_type, row.definition_version)
            if row.definition_version is None or key in mine:
                for outcome in _recover_overdue(engine, row, now):
                    counts[outcome] += 1
            else:
                if live is None:
                    window = LIVE_WINDOW if live_since is None else now - live_since
                    live = store.live_versions(window, now)
                counts[_foreign(engine, row, live)] += 1
            after = (row.deadline, row.saga_id)
        if len(page) < batch:
            break
        if time.monotonic() - began > max_seconds:
            log.warning(
                "recovery sweep stopped after %.0fs and %d sagas; the next sweep goes on",
                time.monotonic() - began,
                examined,
            )
            break
    result = SweepResult(
        examined=examined,
        recovered=counts[RecoveryOutcome.RECOVERED],
        failed=counts[None],
        due=counts[RecoveryOutcome.DUE],
        gave_up=counts[RecoveryOutcome.GAVE_UP],
        skipped=counts[RecoveryOutcome.SKIPPED],
        parked=counts[RecoveryOutcome.PARKED],
        resumed=resumed,
    )
    if examined or resumed:
        log.info("recovery sweep: %s", result)
    return result


def _foreign(engine: SagaEngine, row: StalledRow, live: set[VersionKey]) -> RecoveryOutcome | None:
    """A stalled saga of a version this process lacks: another worker's, or parked."""
    version = (row.saga_type, str(row.definition_version))
    if version in live:
        return RecoveryOutcome.SKIPPED  # a live worker that has it recovers it
    return _park(
        engine, row, f"no live worker has {row.saga_type} version {row.definition_version}"
    )


def _park(engine: SagaEngine, row: StalledRow, reason: str) -> RecoveryOutcome | None:
    pending = _earliest(row)
    if pending is None:
        return RecoveryOutcome.SKIPPED
    event = ParkRequested(
        pending.step_index,
        pending.direction,
        pending.number,
        pending.recoveries,
        reason[:500],
        RECOVERY_USER,
    )
    try:
        outcome = engine.park(row.saga_id, event)
    except SkippedLocked:
        return RecoveryOutcome.SKIPPED
    except Exception:
        log.exception("saga %s: parking failed; the next sweep tries again", row.saga_id)
        return None
    if outcome.changed:
        log.warning("saga %s parked: %s", row.saga_id, event.reason)
        return RecoveryOutcome.PARKED
    return RecoveryOutcome.SKIPPED


def _earliest(row: StalledRow) -> Attempt | None:
    """The attempt with the earliest exact deadline (the row's `deadline` is only the scan's
    key, rounded up: store/codec.py `scan_deadline`). A group's other branches may be overdue
    too: once this one is handled, the row's deadline is theirs, and a later page or sweep
    takes them."""
    attempts = attempts_from_json(row.pending)
    return min(attempts, key=lambda a: (a.deadline, a.step_index)) if attempts else None


def _resume_parked(store: Store, engine: SagaEngine, mine: set[VersionKey], batch: int) -> int:
    """Send the kept attempt of each parked saga of a version this process has."""
    resumed = 0
    for saga_id in store.parked(mine, batch):
        try:
            outcome = engine.handle(saga_id, UnparkRequested(RECOVERY_USER), skip_locked=True)
        except SkippedLocked:
            continue
        except UnknownDefinitionVersion:
            continue  # parked for its label's other steps: it stays parked (docs/deploys.md)
        except Exception:
            log.exception("saga %s: resuming it failed; the next sweep tries again", saga_id)
            continue
        if outcome.changed:
            log.warning("saga %s: its version is here again; resumed", saga_id)
            resumed += 1
    return resumed


def _recover_overdue(
    engine: SagaEngine, row: StalledRow, now: datetime
) -> list[RecoveryOutcome | None]:
    """One recovery per overdue attempt of the row (a group's branches may stall together)."""
    attempts = sorted(attempts_from_json(row.pending), key=lambda a: (a.deadline, a.step_index))
    overdue = [a for a in attempts if a.overdue(now)] or attempts[:1]
    if not overdue:
        return [RecoveryOutcome.SKIPPED]
    return [_recover_one(engine, row, attempt) for attempt in overdue]


def _recover_one(
    engine: SagaEngine, row: StalledRow, attempt: Attempt | None = None
) -> RecoveryOutcome | None:
    """Recover one saga; never raises (one bad row must not stop the sweep). None: it failed."""
    saga_id = row.saga_id
    try:
        pending = attempt or _earliest(row)
        if pending is None:
            return RecoveryOutcome.SKIPPED
        outcome = engine.handle(saga_id, recovery_event(pending), skip_locked=True)
    except SkippedLocked:
        log.info("saga %s: claimed by another recovery sweep; skipped", saga_id)
        return RecoveryOutcome.SKIPPED
    except UnknownDefinitionVersion as exc:
        # Its version's label is registered here with other steps: no worker may run it.
        return _park(engine, row, str(exc))
    except Exception:
        log.exception("saga %s: recovery failed; the next sweep tries again", saga_id)
        return None
    result = recovery_outcome(pending, outcome.decision, engine.limits)
    where = f"step {pending.step_index} ({pending.direction.value}) attempt {pending.number}"
    if result is RecoveryOutcome.DUE:
        log.info("saga %s: held retry of %s due; sent", saga_id, where)
    elif result is RecoveryOutcome.GAVE_UP:
        log.error(
            "saga %s: %s stalled %d times (max_recoveries=%d); failed it as StalledTooOften",
            saga_id,
            where,
            pending.recoveries + 1,
            engine.limits.max_recoveries,
        )
    elif result is RecoveryOutcome.RECOVERED:
        log.warning(
            "saga %s: %s stalled past its deadline %s; re-sent (recovery %d)",
            saga_id,
            where,
            pending.deadline.isoformat(),
            pending.recoveries + 1,
        )
    elif result is RecoveryOutcome.STUCK:
        log.error(
            "saga %s: %s is overdue but cannot be recovered: %s",
            saga_id,
            where,
            outcome.ignored,
        )
        return None  # counted as failed: the next sweep finds it again
    # SKIPPED: another sweep recovered it first, or a result arrived since the scan.
    return result
