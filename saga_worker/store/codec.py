"""Row <-> `Saga` conversion for the checkpoint table.

The `pending` JSON column holds the attempts in flight and the saga's `attempt_seq` (the
highest attempt number it has issued), which outlives the attempt: a FAILED saga has none
pending, and an operator's retry numbers its attempts above it. Kept there, it needs no
migration; a checkpoint written before it existed falls back to a bound that is safe.

One attempt is stored flat, as before groups existed (a linear saga's row is unchanged);
several (a group's branches) as `"attempts": [...]`. The state of waits (`inbox`,
`seen_signals`, `votes`) and `undo` are stored only when not empty.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from ..core.model import Attempt, Direction, Saga, SagaState, Signal, Vote

#: Checkpoint columns written when a saga is created and never updated: a transition
#: decided on a checkpoint that lacks them (a step message's carried copy signed by an
#: older build during a rolling deploy, worker/snapshot.py) cannot erase them.
WRITE_ONCE_COLUMNS = frozenset({"business_key"})

#: Grains of the indexed `deadline` column, in seconds (`scan_deadline`).
DEADLINE_GRAINS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def pending_to_json(attempt: Attempt | None) -> dict[str, Any] | None:
    if attempt is None:
        return None
    data: dict[str, Any] = {
        "step_index": attempt.step_index,
        "direction": attempt.direction.value,
        "number": attempt.number,
        "not_before": attempt.not_before.isoformat(),
        "deadline": attempt.deadline.isoformat(),
    }
    # Fields at their defaults are left out (`pending_from_json` reads them back as such):
    # the column is rewritten on every transition.
    for name, default in _ATTEMPT_DEFAULTS.items():
        value = getattr(attempt, name)
        if value != default:
            data[name] = value
    return data


_ATTEMPT_DEFAULTS: dict[str, Any] = {
    "recoveries": 0,
    "held": False,
    "first": 1,
    "uncertain": False,
    "allowance": 0.0,
}


def pending_from_json(data: Mapping[str, Any] | None) -> Attempt | None:
    if not data or "step_index" not in data:
        return None  # no attempt pending (the column may hold attempt_seq alone)
    return Attempt(
        step_index=int(data["step_index"]),
        direction=Direction(data["direction"]),
        number=int(data["number"]),
        not_before=datetime.fromisoformat(data["not_before"]),
        deadline=datetime.fromisoformat(data["deadline"]),
        recoveries=int(data.get("recoveries", 0)),
        held=bool(data.get("held", False)),
        first=int(data.get("first", 1)),
        uncertain=bool(data.get("uncertain", False)),
        allowance=float(data.get("allowance", 0.0)),
    )


def saga_to_row(saga: Saga) -> dict[str, Any]:
    """Checkpoint columns of a saga, except version and audit_head (the store owns those)."""
    return {
        "saga_id": saga.saga_id,
        "saga_type": saga.saga_type,
        "state": saga.state.value,
        "current_step_index": saga.current_step_index,
        "completed_steps": list(saga.completed_steps),
        "compensated_steps": list(saga.compensated_steps),
        "context": dict(saga.context),
        "error": saga.error,
        "started_at": saga.started_at,
        "updated_at": saga.updated_at,
        "total_steps": saga.total_steps,
        "retries": saga.retries,
        "user_id": saga.user_id,
        "ip_address": saga.ip_address,
        "pending": _pending_column(saga),
        # A parked saga keeps its attempts but leaves the stalled scan (docs/deploys.md).
        # The earliest scan deadline of a group's attempts: the scan finds the first overdue
        # one, each within its own grain (a short branch's grain is not a long branch's).
        "deadline": (
            min(scan_deadline(a) for a in saga.attempts)
            if saga.attempts and saga.parked_at is None
            else None
        ),
        "waiting_for": saga.waiting_for,
        "waiting_since": saga.waiting_since,
        "failed_compensations": list(saga.failed_compensations),
        "abort_requested": saga.abort_requested,
        "definition_version": saga.definition_version,
        "definition_structure": saga.definition_structure,
        "parked_at": saga.parked_at,
        "business_key": saga.business_key,
    }


def scan_deadline(attempt: Attempt) -> datetime:
    """The deadline the recovery scan indexes: the attempt's, rounded up to a grain of at
    most a tenth of the time the attempt was given (`DEADLINE_GRAINS`).

    The scan's index is on this column, so an update that changes it cannot be HOT. The
    next step of a saga is sent a little after the one before, with the same timeout, so
    its deadline is a little later: rounded up, mostly the same value, and the update
    leaves every index alone. The scan finds a saga at most one grain (a tenth of its
    timeout) after its attempt's own deadline, which `pending` keeps exactly, never before.
    """
    span = (attempt.deadline - attempt.not_before).total_seconds()
    grain = max([g for g in DEADLINE_GRAINS if g <= span / 10], default=DEADLINE_GRAINS[0])
    micros = (attempt.deadline - _EPOCH) // timedelta(microseconds=1)
    step = grain * 1_000_000
    return _EPOCH + timedelta(microseconds=-(-micros // step) * step)


def saga_from_row(row: Mapping[Any, Any]) -> Saga:
    return Saga(
        saga_id=row["saga_id"],
        saga_type=row["saga_type"],
        state=SagaState(row["state"]),
        context=dict(row["context"] or {}),
        current_step_index=row["current_step_index"],
        total_steps=row["total_steps"],
        started_at=row["started_at"],
        updated_at=row["updated_at"],
        attempts=attempts_from_json(row["pending"]),
        completed_steps=tuple(row["completed_steps"] or ()),
        compensated_steps=tuple(row["compensated_steps"] or ()),
        failed_compensations=tuple(row["failed_compensations"] or ()),
        error=row["error"],
        retries=row["retries"],
        user_id=row["user_id"],
        ip_address=row["ip_address"],
        abort_requested=bool(row["abort_requested"]),
        version=row["version"],
        attempt_seq=_attempt_seq(row),
        definition_version=row.get("definition_version"),
        definition_structure=row.get("definition_structure"),
        parked_at=row.get("parked_at"),
        waiting_for=row.get("waiting_for"),
        waiting_since=row.get("waiting_since"),
        business_key=row.get("business_key"),
        **_flow_from_json(row["pending"] or {}),
    )


def attempts_from_json(data: Mapping[str, Any] | None) -> tuple[Attempt, ...]:
    """The attempts in flight a `pending` column holds (flat: one; `attempts`: several)."""
    if not data:
        return ()
    if "attempts" in data:
        found = (pending_from_json(item) for item in data["attempts"])
        return tuple(a for a in found if a is not None)
    one = pending_from_json(data)
    return () if one is None else (one,)


def _pending_column(saga: Saga) -> dict[str, Any] | None:
    column: dict[str, Any] = {}
    if len(saga.attempts) == 1:
        column.update(pending_to_json(saga.attempts[0]) or {})
    elif saga.attempts:
        column["attempts"] = [pending_to_json(a) for a in saga.attempts]
    if saga.inbox:
        column["inbox"] = [
            {
                "name": s.name,
                "payload": dict(s.payload),
                "user_id": s.user_id,
                "at": s.at.isoformat(),
                "ip_address": s.ip_address,
            }
            for s in saga.inbox
        ]
    if saga.seen_signals:
        column["seen_signals"] = list(saga.seen_signals)
    if saga.votes:
        column["votes"] = [
            {"wait": v.wait, "user_id": v.user_id, "approve": v.approve, "at": v.at.isoformat()}
            for v in saga.votes
        ]
    if saga.undo:
        column["undo"] = list(saga.undo)
    if not column and saga.attempt_seq == 0:
        return None
    return {**column, "attempt_seq": saga.attempt_seq}


def _flow_from_json(data: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "inbox": tuple(
            Signal(
                s["name"],
                s["payload"],
                s["user_id"],
                datetime.fromisoformat(s["at"]),
                s.get("ip_address"),
            )
            for s in data.get("inbox", ())
        ),
        "seen_signals": tuple(data.get("seen_signals", ())),
        "votes": tuple(
            Vote(v["wait"], v["user_id"], bool(v["approve"]), datetime.fromisoformat(v["at"]))
            for v in data.get("votes", ())
        ),
        "undo": tuple(data.get("undo", ())),
    }


def _attempt_seq(row: Mapping[Any, Any]) -> int:
    data = row["pending"] or {}
    if "attempt_seq" in data:
        return int(data["attempt_seq"])
    # Written before attempt_seq existed, when an operator's retry numbered its attempts
    # version + 1: no number issued so far exceeds the version (or the pending attempt's).
    return max(int(row["version"]), int(data.get("number", 0)))
