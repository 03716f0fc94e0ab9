"""Saga and step definitions, validated as a whole when built."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidSagaDefinition
from .business_key import BusinessKey, key_name_problem, key_shape
from .model import Direction, JSONObject
from .retry import RetryPolicy
from .stages import Parallel, Stage, Wait, flatten, wait_problems

#: The longest step timeout or wait: deadlines must stay inside datetime's range.
MAX_TIMEOUT_SECONDS = 10 * 365 * 86400.0
NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}")
#: An explicit version label: it becomes part of a queue name (and of Redis keys).
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DEFAULT_TIMEOUT_SECONDS = 300.0
#: Hex digits of the SHA-256 shape fingerprint used as a version when no label is given.
FINGERPRINT_CHARS = 12


@dataclass(frozen=True)
class StepInput:
    """What a local step function receives."""

    saga_id: str
    saga_type: str
    step_name: str
    direction: Direction
    attempt: int
    idempotency_key: str
    context: JSONObject


LocalFunction = Callable[[StepInput], "Mapping[str, Any] | None"]


@dataclass(frozen=True)
class Remote:
    """A step action or compensation served by another service's Celery workers.

    The task receives kwargs ``context``, ``idempotency_key``, ``saga_id``, ``step_name``
    and ``attempt``, and returns a JSON object. Its result reaches ``saga.advance`` through
    Celery's ``link`` / ``link_error`` callbacks, so the other service needs only Celery.
    Celery gives that errback only the failed task's id; a service that also installs the
    standard-library-only ``saga_remote`` helper sends its exception's type and message.
    """

    task_name: str
    queue: str


@dataclass(frozen=True)
class Step:
    """One step of a saga: an action, an optional compensation, and how to retry them.

    `action` and `compensate` are either a local function taking a `StepInput` and
    returning a JSON object (merged into the context) or a `Remote` task.
    """

    name: str
    action: LocalFunction | Remote | Wait
    compensate: LocalFunction | Remote | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout_seconds: float | None = None
    compensation_retry: RetryPolicy | None = None
    compensation_timeout_seconds: float | None = None
    #: Run this step's own compensation when it fails for good, whatever the failure: for
    #: actions whose ordinary failures may have taken effect. Failures with an unknown
    #: outcome (timeout, lost worker, stalls) have it run anyway.
    compensate_on_failure: bool = False

    def target(self, direction: Direction) -> LocalFunction | Remote | Wait | None:
        return self.action if direction is Direction.FORWARD else self.compensate

    def policy(self, direction: Direction) -> RetryPolicy:
        if direction is Direction.COMPENSATE and self.compensation_retry is not None:
            return self.compensation_retry
        return self.retry

    def timeout(self, direction: Direction, default: float = DEFAULT_TIMEOUT_SECONDS) -> float:
        if direction is Direction.COMPENSATE and self.compensation_timeout_seconds is not None:
            return self.compensation_timeout_seconds
        return self.timeout_seconds if self.timeout_seconds is not None else default


@dataclass(frozen=True)
class SagaDefinition:
    """A named, ordered list of steps. Building one validates all of it at once.

    `version` labels this shape of the saga (default: a fingerprint of it, see `shape`). A
    saga runs only under the version it started with; a worker may register several
    versions of one type, and new starts use the one marked `default=True`, else the one
    registered last (docs/deploys.md).

    `business_key` names what people search the saga by: a context key (its value, a string
    or an integer, becomes the key) or a function of the start context returning a string
    or None. It is computed once, at start (core/business_key.py).
    """

    saga_type: str
    steps: tuple[Step, ...]
    default_timeout_seconds: float | None = None
    version: str = ""
    default: bool = False
    #: The stages the steps were given in (core/stages.py); `steps` are their flat leaves.
    stages: tuple[Stage, ...] = ()
    business_key: BusinessKey | None = None

    def __init__(
        self,
        saga_type: str,
        steps: Sequence[Step | Parallel],
        *,
        default_timeout_seconds: float | None = None,
        version: str | None = None,
        default: bool = False,
        business_key: BusinessKey | None = None,
    ) -> None:
        leaves, stages, stage_problems = flatten(steps)
        object.__setattr__(self, "saga_type", saga_type)
        object.__setattr__(self, "steps", leaves)
        object.__setattr__(self, "stages", stages)
        object.__setattr__(self, "default_timeout_seconds", default_timeout_seconds)
        object.__setattr__(self, "default", default)
        object.__setattr__(self, "business_key", business_key)
        problems = stage_problems + self.problems()
        if version is not None and (
            not isinstance(version, str) or not VERSION_RE.fullmatch(version)
        ):
            problems.append(
                f"version {version!r} must match {VERSION_RE.pattern} (it becomes part of a "
                "queue name)"
            )
        if problems:
            raise InvalidSagaDefinition(saga_type, problems)
        object.__setattr__(self, "version", version or self.fingerprint())

    def shape(self) -> dict[str, Any]:
        """What the version fingerprint covers: step names and order, kinds, remote task
        names and queues, retry and timeout policies. Not the code of local functions: a
        change to a step's code that keeps all of this is a compatible change."""
        shape: dict[str, Any] = {
            "saga_type": self.saga_type,
            "default_timeout_seconds": self.default_timeout_seconds,
            "steps": [_step_shape(step) for step in self.steps],
        }
        if not self.linear:
            # Only then: a linear definition keeps the version it had before stages existed.
            shape["stages"] = self._stage_shape()
        if self.business_key is not None:
            # Only then, for the same reason: a definition without one keeps its version.
            shape["business_key"] = key_shape(self.business_key)
        return shape

    @property
    def linear(self) -> bool:
        """One step after another: no group and no wait."""
        return all(stage.kind == "step" for stage in self.stages)

    def _stage_shape(self) -> list[list[Any]]:
        return [[st.kind, st.name, [self.steps[i].name for i in st.leaves]] for st in self.stages]

    def fingerprint(self) -> str:
        """The version a definition without a label gets: a digest of its whole shape."""
        return _digest(self.shape())

    @functools.cached_property
    def structure(self) -> str:
        """A digest of what must never change under a saga in flight, label or not: step
        names and order, and what each step and compensation is (local, or which remote
        task). Policies are not in it: a label may keep a saga's version across a retry or
        timeout change, never across a change of steps."""
        steps = [[s.name, _target_shape(s.action), _target_shape(s.compensate)] for s in self.steps]
        structure: dict[str, Any] = {"saga_type": self.saga_type, "steps": steps}
        if not self.linear:
            structure["stages"] = self._stage_shape()
        return _digest(structure)

    def problems(self) -> list[str]:
        """Every problem of this definition, so that one error can list them all."""
        found: list[str] = []
        if not isinstance(self.saga_type, str) or not NAME_RE.fullmatch(self.saga_type):
            found.append(
                f"saga_type {self.saga_type!r} must match {NAME_RE.pattern} "
                "(it becomes part of Celery task names)"
            )
        if not self.steps:
            found.append("a saga needs at least one step")
        if self.business_key is not None and not callable(self.business_key):
            problem = key_name_problem(self.business_key)
            if problem is not None:
                found.append(
                    f"business_key {problem} (a context key name, or a function of the "
                    "context returning str | None)"
                )
        if self.default_timeout_seconds is not None and not _positive_finite(
            self.default_timeout_seconds
        ):
            found.append(
                f"default_timeout_seconds must be a finite number > 0, "
                f"got {self.default_timeout_seconds!r}"
            )
        seen: set[str] = {st.name for st in self.stages if st.kind == "parallel"}
        if len(seen) < sum(1 for st in self.stages if st.kind == "parallel"):
            found.append("two groups have the same name; group names must be unique")
        signals: set[str] = set()
        for index, step in enumerate(self.steps):
            where = f"step {index} ({getattr(step, 'name', '?')!r})"
            if not isinstance(step, Step):
                found.append(f"step {index} is a {type(step).__name__}, expected saga_worker.Step")
                continue
            if not isinstance(step.name, str) or not NAME_RE.fullmatch(step.name):
                found.append(f"{where}: name must match {NAME_RE.pattern}")
            elif step.name in seen:
                found.append(f"{where}: duplicate name; step and group names must be unique")
            seen.add(step.name)
            for label, target in (("action", step.action), ("compensate", step.compensate)):
                if target is None and label == "compensate":
                    continue
                if isinstance(target, Wait) and label == "action":
                    found.extend(wait_problems(where, target, step.compensate is not None))
                elif isinstance(target, Remote):
                    if not target.task_name or not isinstance(target.task_name, str):
                        found.append(f"{where}: remote {label} needs a task_name")
                    if not target.queue or not isinstance(target.queue, str):
                        found.append(f"{where}: remote {label} needs a queue")
                elif not callable(target):
                    found.append(
                        f"{where}: {label} must be a function taking StepInput or a Remote(...), "
                        f"got {type(target).__name__}"
                    )
            if isinstance(step.action, Wait) and step.action.signal is not None:
                if step.action.signal in signals:
                    found.append(
                        f"{where}: signal {step.action.signal!r} is awaited twice; one wait "
                        "per signal name (a signal is delivered once)"
                    )
                signals.add(step.action.signal)
            if step.compensate_on_failure and step.compensate is None:
                found.append(f"{where}: compensate_on_failure=True needs a compensate function")
            for label, policy in (
                ("retry", step.retry),
                ("compensation_retry", step.compensation_retry),
            ):
                if policy is None:
                    continue
                if not isinstance(policy, RetryPolicy):
                    found.append(f"{where}: {label} must be a RetryPolicy")
                    continue
                found.extend(f"{where}: {label}: {p}" for p in policy.problems())
            for label, timeout in (
                ("timeout_seconds", step.timeout_seconds),
                ("compensation_timeout_seconds", step.compensation_timeout_seconds),
            ):
                if timeout is not None and not (
                    _positive_finite(timeout) and timeout <= MAX_TIMEOUT_SECONDS
                ):
                    found.append(
                        f"{where}: {label} must be a finite number > 0 and at most "
                        f"{MAX_TIMEOUT_SECONDS:g} (ten years), got {timeout!r}"
                    )
        return found

    def stage_of(self, leaf: int) -> Stage:
        """The stage that holds leaf `leaf` (a group for each of its branches)."""
        return self._stage_by_leaf[leaf]

    @functools.cached_property
    def _stage_by_leaf(self) -> tuple[Stage, ...]:
        return tuple(stage for stage in self.stages for _ in stage.leaves)

    def wait_of(self, leaf: int) -> Wait | None:
        """The wait a leaf is, or None for a step that runs a task."""
        action = self.steps[leaf].action
        return action if isinstance(action, Wait) else None

    def signal_wait(self, signal: str) -> int | None:
        """The leaf of the WaitFor that takes `signal` (names are unique), if any."""
        for index, step in enumerate(self.steps):
            if isinstance(step.action, Wait) and step.action.signal == signal:
                return index
        return None

    @property
    def step_names(self) -> tuple[str, ...]:
        return tuple(step.name for step in self.steps)

    def timeout(
        self, step_index: int, direction: Direction, default: float = DEFAULT_TIMEOUT_SECONDS
    ) -> float:
        """The step's timeout, else the saga's, else `default` (the engine's setting)."""
        saga_default = self.default_timeout_seconds
        return self.steps[step_index].timeout(
            direction, saga_default if saga_default is not None else default
        )

    def task_name(self, step_index: int, direction: Direction) -> str:
        """Celery task name of an attempt: the remote name, or saga.<type>.<step>[.compensate]."""
        step = self.steps[step_index]
        target = step.target(direction)
        if isinstance(target, Remote):
            return target.task_name
        suffix = ".compensate" if direction is Direction.COMPENSATE else ""
        return f"saga.{self.saga_type}.{step.name}{suffix}"


def _digest(value: Any) -> str:
    canonical = json.dumps(_numbers_as_floats(value), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:FINGERPRINT_CHARS]


def _numbers_as_floats(value: Any) -> Any:
    # 30 and 30.0 are one timeout: how a number is written must not make a new version.
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, Mapping):
        return {k: _numbers_as_floats(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_numbers_as_floats(v) for v in value]
    return value


def _target_shape(target: LocalFunction | Remote | Wait | None) -> Any:
    if target is None:
        return None
    if isinstance(target, Wait):
        return {"wait": dataclasses.asdict(target)}
    if isinstance(target, Remote):
        return {"remote": target.task_name, "queue": target.queue}
    return "local"


def _step_shape(step: Step) -> dict[str, Any]:
    policies = {
        "retry": step.retry,
        "compensation_retry": step.compensation_retry,
    }
    return {
        "name": step.name,
        "action": _target_shape(step.action),
        "compensate": _target_shape(step.compensate),
        "timeout_seconds": step.timeout_seconds,
        "compensation_timeout_seconds": step.compensation_timeout_seconds,
        "compensate_on_failure": step.compensate_on_failure,
        **{k: None if p is None else dataclasses.asdict(p) for k, p in policies.items()},
    }


def _positive_finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def idempotency_key(saga_id: str, step_name: str, direction: Direction) -> str:
    """Key a step's effect by: stable across attempts and recoveries of the same step."""
    suffix = ":compensate" if direction is Direction.COMPENSATE else ""
    return f"{saga_id}:{step_name}{suffix}"
