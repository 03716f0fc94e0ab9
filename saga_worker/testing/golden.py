"""Golden audit trails: a recorded event sequence replayed through the pure `transition`.

A golden file holds a start and the events fed after it, each with a fixed `now`, and what
every transition produced: its audit events, commands, the saga fields it changed, or why it
was ignored; and the audit chain's last hash. `check_golden` replays the inputs and fails on
any difference, so a change of behaviour shows up as a reviewed diff of the file. With
SAGA_UPDATE_GOLDEN=1 it rewrites the expectations instead (then read the diff).

The replay stands in for the store in one respect: a committed transition gets version + 1,
as the checkpoint does.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any

from ..audit.chain import GENESIS_HASH, build_rows
from ..audit.redaction import Redactor
from ..config import DEFAULT_REDACT_KEYS
from ..core import events as core_events
from ..core.decision import Decision, Limits
from ..core.definition import SagaDefinition
from ..core.events import Event, StartRequested
from ..core.model import Direction, Saga
from ..core.transition import start, transition

#: Set to 1 to rewrite the expectations of golden files from the current behaviour.
UPDATE_ENV = "SAGA_UPDATE_GOLDEN"

_EVENT_TYPES: dict[str, type[Any]] = {
    cls.__name__: cls
    for cls in (
        core_events.StartRequested,
        core_events.StepSucceeded,
        core_events.StepFailed,
        core_events.AbortRequested,
        core_events.AttemptStalled,
        core_events.AttemptDue,
        core_events.RetryRequested,
    )
}


def _plain(value: Any) -> Any:
    """A JSON value of a core value: enums by value, datetimes in ISO 8601, tuples as lists."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def event_to_json(event: StartRequested | Event) -> dict[str, Any]:
    """An event as a golden file records it: its type and its fields."""
    return {"type": type(event).__name__, **_plain(event)}


def event_from_json(data: Mapping[str, Any]) -> StartRequested | Event:
    """The event a golden file records (fields left out take their defaults)."""
    fields = dict(data)
    cls = _EVENT_TYPES[fields.pop("type")]
    if fields.get("direction") is not None:
        fields["direction"] = Direction(fields["direction"])
    event: StartRequested | Event = cls(**fields)
    return event


#: Fields of waits, groups and business keys, recorded only when set: the trail of a linear
#: saga without a key reads as it did before they existed.
_WHEN_SET = (
    "inbox",
    "seen_signals",
    "votes",
    "undo",
    "waiting_for",
    "waiting_since",
    "business_key",
)


def _saga_fields(saga: Saga | None) -> dict[str, Any]:
    if saga is None:
        return {}
    fields = dict(_plain(saga))
    attempts = fields.pop("attempts")
    if len(attempts) <= 1:
        fields["pending"] = attempts[0] if attempts else None
    else:
        fields["attempts"] = attempts
    return {k: v for k, v in fields.items() if k not in _WHEN_SET or v not in (None, [])}


def decision_to_json(before: Saga | None, decision: Decision, after: Saga) -> dict[str, Any]:
    """What a transition produced: audit events, commands, changed saga fields, ignored reason.

    `after` is the saga as committed (its version too); None-valued audit fields are left out.
    """
    old, new = _saga_fields(before), _saga_fields(after)
    return {
        "ignored": decision.ignored,
        "audit": [
            {k: v for k, v in _plain(event).items() if v is not None} for event in decision.audit
        ],
        "commands": [_plain(command) for command in decision.commands],
        "saga_changes": {k: v for k, v in new.items() if old.get(k, ...) != v},
    }


def replay(
    definition: SagaDefinition,
    steps: Sequence[tuple[datetime, StartRequested | Event]],
    limits: Limits | None = None,
    redactor: Redactor | None = None,
) -> tuple[list[dict[str, Any]], str]:
    """Feed a start and then events through `start` / `transition`; no engine, no store.

    Returns each transition's `decision_to_json` and the audit chain's head (the hash of
    the last audit row, computed by the real `build_rows`).
    """
    limits = limits if limits is not None else Limits()
    redactor = redactor if redactor is not None else Redactor(DEFAULT_REDACT_KEYS)
    saga: Saga | None = None
    head = GENESIS_HASH
    outputs: list[dict[str, Any]] = []
    for index, (now, event) in enumerate(steps):
        if isinstance(event, StartRequested) != (index == 0):
            raise ValueError(f"step {index}: a golden trail is one StartRequested, then events")
        if isinstance(event, StartRequested):
            decision = start(definition, event, now, limits)
        else:
            assert saga is not None
            decision = transition(definition, saga, event, now, limits)
        after = saga
        if decision.changed:
            # The store commits a changed decision with version + 1.
            after = dataclasses.replace(
                decision.saga, version=(0 if saga is None else saga.version) + 1
            )
            rows = build_rows(after.saga_id, after.context, decision.audit, now, head, redactor)
            head = str(rows[-1]["hash"]) if rows else head
        assert after is not None
        outputs.append(_normalized(decision_to_json(saga, decision, after)))
        saga = after
    return outputs, head


def _normalized(value: Any) -> Any:
    return json.loads(json.dumps(value, ensure_ascii=False, allow_nan=False))


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)


def check_golden(path: str | os.PathLike[str], definitions: Mapping[str, SagaDefinition]) -> None:
    """Replay a golden file through `transition`; AssertionError with a diff on a change.

    The file's `definition` names its definition in `definitions`. Under SAGA_UPDATE_GOLDEN=1
    the file's expectations (`expect` of each transition, `audit_head`) are rewritten instead.
    """
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    definition = definitions[data["definition"]]
    limits = Limits(**data.get("limits", {}))
    transitions = data["transitions"]
    inputs = [(datetime.fromisoformat(t["now"]), event_from_json(t["event"])) for t in transitions]
    outputs, head = replay(definition, inputs, limits)
    if os.environ.get(UPDATE_ENV) == "1":
        for entry, output in zip(transitions, outputs, strict=True):
            entry["expect"] = output
        data["audit_head"] = head
        path.write_text(_pretty(data) + "\n", encoding="utf-8")
        return
    fix = f"if the change is intended, rerun with {UPDATE_ENV}=1 and review the file's diff"
    for number, (entry, output) in enumerate(zip(transitions, outputs, strict=True)):
        expected = entry.get("expect")
        if expected != output:
            diff = "\n".join(
                difflib.unified_diff(
                    _pretty(expected).splitlines(),
                    _pretty(output).splitlines(),
                    "expected",
                    "replayed",
                    lineterm="",
                )
            )
            raise AssertionError(
                f"{path.name}: transition {number} ({entry['event']['type']} at {entry['now']}) "
                f"changed; {fix}\n{diff}"
            )
    if data.get("audit_head") != head:
        raise AssertionError(
            f"{path.name}: every transition matches but the audit chain's head differs "
            f"(rows are built or hashed differently); {fix}"
        )
