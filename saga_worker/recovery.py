"""The recovery sweep: re-send attempts that passed their deadline (the beat's job)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from .core.events import AttemptDue, AttemptStalled
from .engine import SagaEngine
from .store.codec import pending_from_json
from .store.repository import SagaStore, SkippedLocked

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepResult:
    """Counts of one sweep."""

    examined: int
    recovered: int
    failed: int
    due: int = 0


def sweep(store: SagaStore, engine: SagaEngine, now: datetime, batch: int = 500) -> SweepResult:
    """Recover each stalled saga through the normal transition path (which re-enqueues)."""
    recovered = failed = due = 0
    candidates = store.stalled(now, batch)
    for saga_id, pending_json in candidates:
        # One bad row must never stop the sweep.
        try:
            pending = pending_from_json(pending_json)
            if pending is None:
                continue
            event: AttemptDue | AttemptStalled
            if pending.held:
                event = AttemptDue(pending.step_index, pending.direction, pending.number)
            else:
                event = AttemptStalled(
                    pending.step_index, pending.direction, pending.number, pending.recoveries
                )
            decision = engine.handle(saga_id, event, skip_locked=True)
            if decision.changed and pending.held:
                due += 1
                continue
            if decision.changed:
                recovered += 1
                log.warning(
                    "saga %s: attempt %s of step %s (%s) stalled past %s; re-sent",
                    saga_id,
                    pending.number,
                    pending.step_index,
                    pending.direction.value,
                    pending.deadline.isoformat(),
                )
        except SkippedLocked:
            log.info("saga %s: claimed by another recovery sweep; skipped", saga_id)
        except Exception:
            failed += 1
            log.exception("saga %s: recovery failed; will try again next sweep", saga_id)
    return SweepResult(len(candidates), recovered, failed, due)
