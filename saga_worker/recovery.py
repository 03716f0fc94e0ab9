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
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .core.recovery import RecoveryOutcome, recovery_event, recovery_outcome
from .engine import SagaEngine
from .store.codec import pending_from_json
from .store.port import SkippedLocked, Store

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
    tries again; each is logged as an error).
    """

    examined: int
    recovered: int
    failed: int
    due: int = 0
    gave_up: int = 0
    skipped: int = 0


def sweep(
    store: Store,
    engine: SagaEngine,
    now: datetime,
    batch: int = BATCH,
    max_seconds: float = MAX_SWEEP_SECONDS,
) -> SweepResult:
    """Recover each stalled saga through the normal transition path (which re-enqueues)."""
    counts: Counter[RecoveryOutcome | None] = Counter()
    examined = 0
    began = time.monotonic()
    after: tuple[datetime, str] | None = None
    while True:
        page = store.stalled(now, batch, after)
        for saga_id, pending_json, deadline in page:
            examined += 1
            counts[_recover_one(engine, saga_id, pending_json)] += 1
            after = (deadline, saga_id)
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
    )
    if examined:
        log.info("recovery sweep: %s", result)
    return result


def _recover_one(
    engine: SagaEngine, saga_id: str, pending_json: dict[str, Any] | None
) -> RecoveryOutcome | None:
    """Recover one saga; never raises (one bad row must not stop the sweep). None: it failed."""
    try:
        pending = pending_from_json(pending_json)
        if pending is None:
            return RecoveryOutcome.SKIPPED
        outcome = engine.handle(saga_id, recovery_event(pending), skip_locked=True)
    except SkippedLocked:
        log.info("saga %s: claimed by another recovery sweep; skipped", saga_id)
        return RecoveryOutcome.SKIPPED
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
