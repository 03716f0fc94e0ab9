"""What a transition decides: the new saga, its audit events and the commands to send.

`Limits` are the engine-wide settings a decision depends on (from configuration).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .commands import Command
from .events import StepFailed
from .model import Attempt, Saga, SagaState


@dataclass(frozen=True)
class Limits:
    """Engine-wide settings the state machine needs (from configuration, passed in)."""

    stall_grace_seconds: float = 30.0
    max_recoveries: int = 5
    #: Delays up to this go to the broker as a countdown; longer ones wait in the database.
    max_broker_delay_seconds: float = 5.0
    #: Timeout of steps whose step and saga set none.
    default_step_timeout_seconds: float = 300.0


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class AuditEvent:
    """An audit row as the core knows it; the shell adds time, snapshot and hashes."""

    event_type: str
    state_before: SagaState | None
    state_after: SagaState
    step_name: str | None = None
    step_index: int | None = None
    event_data: Mapping[str, Any] = field(default_factory=dict)
    error_message: str | None = None
    error_stack_trace: str | None = None
    duration_ms: float | None = None
    retry_count: int | None = None
    user_id: str | None = None
    ip_address: str | None = None


@dataclass(frozen=True)
class Decision:
    """The outcome of one transition.

    When `ignored` is set nothing must be written or sent: `saga` is the unchanged input.
    """

    saga: Saga
    audit: tuple[AuditEvent, ...] = ()
    commands: tuple[Command, ...] = ()
    ignored: str | None = None

    @property
    def changed(self) -> bool:
        return self.ignored is None


def next_attempt(decision: Decision, failed: StepFailed) -> Attempt | None:
    """The attempt of the same step and direction that `decision` scheduled after `failed`.

    None when the failure was final for the step (or ignored): the caller reports the failed
    attempt as failed for good rather than as one that will be retried.
    """
    if decision.ignored is not None:
        return None
    for pending in decision.saga.attempts:
        if pending.key() == (failed.step_index, failed.direction, failed.attempt + 1):
            return pending
    return None
