"""What the recovery sweep feeds a checkpoint it found past its deadline, and what came of it."""

from __future__ import annotations

from enum import StrEnum

from .decision import Decision, Limits
from .events import AttemptDue, AttemptStalled
from .model import Attempt


class RecoveryOutcome(StrEnum):
    """What one recovery did (counted by the sweep, logged per saga)."""

    #: A stalled attempt was sent again.
    RECOVERED = "recovered"
    #: A retry held in the database reached its due time and was sent.
    DUE = "due"
    #: A stalled attempt had been re-sent max_recoveries times: it failed as StalledTooOften.
    GAVE_UP = "gave_up"
    #: No live worker has the saga's definition version: parked, not re-sent.
    PARKED = "parked"
    #: Nothing to do: another sweep or a result got there first.
    SKIPPED = "skipped"
    #: The attempt is still pending as the scan saw it, yet the transition refused to recover
    #: it (e.g. a deploy removed its step): every sweep will find it again until someone acts.
    STUCK = "stuck"


#: The `user_id` of the audit rows the recovery sweep writes (DESIGN section 4).
RECOVERY_USER = "system:recovery"


def recovery_event(pending: Attempt) -> AttemptDue | AttemptStalled:
    """The event for an overdue pending attempt: a held retry is due, a sent one stalled.

    A stalled event carries the recoveries the scan saw, so two sweeps racing on one saga
    recover it once.
    """
    if pending.held:
        return AttemptDue(pending.step_index, pending.direction, pending.number, RECOVERY_USER)
    return AttemptStalled(
        pending.step_index,
        pending.direction,
        pending.number,
        pending.recoveries,
        user_id=RECOVERY_USER,
    )


def recovery_outcome(pending: Attempt, decision: Decision, limits: Limits) -> RecoveryOutcome:
    """Classify the decision `transition` made for `recovery_event(pending)`."""
    if not decision.changed:
        # Unchanged since the scan: nobody got there first, the transition itself refused.
        stuck = decision.saga.pending == pending
        return RecoveryOutcome.STUCK if stuck else RecoveryOutcome.SKIPPED
    if pending.held:
        return RecoveryOutcome.DUE
    if pending.recoveries_exhausted(limits.max_recoveries):
        return RecoveryOutcome.GAVE_UP
    return RecoveryOutcome.RECOVERED
