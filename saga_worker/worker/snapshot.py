"""The checkpoint a local step message carries, so the step need not read it back first.

A step task used to read its saga's checkpoint before running, to skip attempts that are
no longer pending. The commit that sends the step already knows that checkpoint, so the
message carries it, signed with the saga signing key (a forged or altered copy is refused).
The transition after the action is written with the usual version check: if anything
changed the checkpoint in between, the write conflicts and the engine reloads it.

A carried checkpoint is trusted only on the first send of an attempt, on its first
delivery, while fresh: a message that was redelivered, re-published by a retry, re-sent by
the recovery or an operator (the attempt's `recoveries` is above 0), or is older than the
stall grace may have a twin that already ran and moved the saga on, so its step reads the
checkpoint first and skips an attempt that is no longer pending, as before.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from ..core.model import Saga
from ..keys import PURPOSE_STEP_CHECKPOINT, subkey
from ..store.codec import saga_from_row, saga_to_row
from ..store.port import Loaded

#: Checkpoint columns that travel elsewhere in the message (or are derived).
_ELSEWHERE = ("saga_id", "saga_type", "context", "deadline")
_TIMES = ("started_at", "updated_at", "parked_at", "waiting_since")


def _mac(key: str, fields: Mapping[str, Any], saga_id: str, saga_type: str, context: Any) -> str:
    signed = {
        "purpose": PURPOSE_STEP_CHECKPOINT,  # also the subkey's: kept as a label inside too
        "checkpoint": fields,
        "saga_id": saga_id,
        "saga_type": saga_type,
        "context": context,
    }
    mac_key = subkey(key, PURPOSE_STEP_CHECKPOINT)
    return hmac.new(mac_key, _exact_json(signed).encode(), hashlib.sha256).hexdigest()


def _exact_json(value: Any) -> str:
    # Not the audit hash's JCS: it reads every number as a double, so 2**53 + 1 and 2**53, or
    # 1 and 1.0, would sign alike and an edited amount would pass. Both sides of this MAC
    # hold values decoded from JSON, so Python's own encoding is exact and repeatable.
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def encode(key: str, checkpoint: Loaded, sent_at: float) -> dict[str, Any]:
    """The `checkpoint` kwarg of a step message: the committed checkpoint, signed.

    The saga's id, type and context are not repeated (the message has them) but are signed.
    """
    saga = checkpoint.saga
    fields = {k: v for k, v in saga_to_row(saga).items() if k not in _ELSEWHERE}
    for name in _TIMES:
        fields[name] = None if fields[name] is None else fields[name].isoformat()
    fields.update(version=saga.version, audit_head=checkpoint.audit_head, sent_at=sent_at)
    return {**fields, "mac": _mac(key, fields, saga.saga_id, saga.saga_type, dict(saga.context))}


def decode(
    key: str,
    data: object,
    *,
    saga_id: str,
    saga_type: str,
    context: Mapping[str, Any],
    now: float,
    max_age_seconds: float,
) -> Loaded | None:
    """The carried checkpoint when it is genuine, fresh and of a first send; None means
    "read it instead". Never raises: whatever a message holds, the fallback is the read."""
    if not isinstance(data, Mapping):
        return None
    mac = data.get("mac")
    if not isinstance(mac, str) or not mac.isascii():
        return None
    fields = {k: v for k, v in data.items() if k != "mac"}
    try:
        expected = _mac(key, fields, saga_id, saga_type, context)
    except (TypeError, ValueError, RecursionError):
        return None  # not canonical JSON (a lone surrogate, say): not what we signed
    if not hmac.compare_digest(expected, mac):
        return None
    sent_at = fields.get("sent_at")
    if not isinstance(sent_at, int | float) or not 0 <= now - sent_at <= max_age_seconds:
        return None
    try:
        row = {
            **fields,
            "saga_id": saga_id,
            "saga_type": saga_type,
            "context": dict(context),
            **{name: _time(fields[name]) for name in _TIMES},
        }
        saga: Saga = saga_from_row(row)
    except (KeyError, TypeError, ValueError):
        return None  # signed by a build that encodes differently: read it instead
    if not saga.attempts or any(a.recoveries > 0 for a in saga.attempts):
        return None  # a re-sent attempt: its first message may have run already
    return Loaded(saga, str(fields["audit_head"]), carried=True)


def _time(value: Any) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)
