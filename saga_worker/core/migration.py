"""Migration: move a saga in flight to another version of its definition (DESIGN section 9).

An operator names the target version and how old step names map to new ones (unmapped names
map to themselves). `migrate` is pure and total: the moved saga with its next attempt issued
under the new definition, or a refusal (`Decision.ignored`) that says what to fix. It never
lets a completed step be skipped or run again, nor a compensation be lost.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .builder import Builder
from .decision import DEFAULT_LIMITS, Decision, Limits
from .definition import NAME_RE, SagaDefinition
from .events import MigrateRequested
from .model import MAX_ATTEMPT, Direction, Saga, SagaState

#: Audit rows whose event_data records the outline of the version a saga runs from then on.
SHAPE_EVENTS = ("saga_start", "saga_migrated")


def outline_event_data(definition: SagaDefinition) -> list[list[str | bool]]:
    """The step outline as audit rows keep it (`"steps"` of saga_start and saga_migrated):
    `[step name, has a compensation]` per step, in order, so that a saga can be migrated
    after its definition's code is gone.

    Pairs, not objects: audit event_data is redacted by key (SAGA_REDACT_KEYS), and a key
    such as `name` (customer names) would mask every step name of `{"name": ...}`.
    """
    return [[s.name, s.compensate is not None] for s in definition.steps]


@dataclass(frozen=True)
class OutlineStep:
    """One step of an outline: its name and whether it has a compensation."""

    name: str
    compensate: bool


@dataclass(frozen=True)
class Shape:
    """The outline of the version a saga runs under: known even when its code is gone."""

    version: str | None
    steps: tuple[OutlineStep, ...]

    @classmethod
    def of(cls, definition: SagaDefinition, version: str | None = None) -> Shape:
        """The shape of a registered definition (`version`: what the saga records, which
        is None for a saga started before versions, run under the default)."""
        steps = tuple(OutlineStep(s.name, s.compensate is not None) for s in definition.steps)
        return cls(version, steps)

    @classmethod
    def from_audit(cls, rows: Iterable[Mapping[str, Any]], version: str | None) -> Shape | None:
        """The shape of `version` from a saga's saga_start / saga_migrated rows (any order);
        None when no row records that version's outline."""
        found: Shape | None = None
        for row in rows:
            if row.get("event_type") not in SHAPE_EVENTS:
                continue
            data = row.get("event_data") or {}
            recorded = data.get("definition_version", data.get("to_version"))
            steps = _outline(data.get("steps"))
            if recorded == version and steps is not None:
                found = cls(version, steps)  # the latest row of that version wins
        return found

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.steps)


@dataclass(frozen=True)
class _Plan:
    """What a migration does, once every rule holds."""

    rename: dict[str, str]
    index: int
    direction: Direction
    uncertain: bool


def migrate(
    definition: SagaDefinition,
    saga: Saga,
    shape: Shape,
    event: MigrateRequested,
    now: datetime,
    limits: Limits = DEFAULT_LIMITS,
) -> Decision:
    """Move `saga` (running `shape`'s version) to `definition`, or refuse and say why.

    The saga keeps its context and progress under the new names, is unparked, and its next
    attempt is issued under `definition` with a number above `attempt_seq`, so no token or
    late result of the old attempt passes for it. Audited as `saga_migrated` (who, why,
    from, to, the map, where it resumes, and the new outline for a later migration).
    """
    plan = _plan(definition, saga, shape, event.mapping, now)
    if isinstance(plan, str):
        return Decision(saga, ignored=plan)
    rename = plan.rename
    b = Builder(definition, saga, now, limits)
    b.update(
        definition_version=definition.version,
        definition_structure=definition.structure,
        total_steps=len(definition.steps),
        completed_steps=tuple(rename[n] for n in saga.completed_steps),
        compensated_steps=tuple(rename[n] for n in saga.compensated_steps),
        failed_compensations=tuple(rename[n] for n in saga.failed_compensations),
        undo=tuple(rename[n] for n in saga.undo if n in rename),
        attempts=(),
    )
    b.audit(
        "saga_migrated",
        plan.index,
        event_data={
            "from_version": saga.definition_version,
            "to_version": definition.version,
            "map": {old: new for old, new in rename.items() if old != new},
            "reason": event.reason,
            "resume_step": definition.steps[plan.index].name,
            "direction": plan.direction.value,
            "steps": outline_event_data(definition),
        },
        user_id=event.user_id,
    )
    number = saga.attempt_seq + 1
    b.run(
        plan.index,
        plan.direction,
        number,
        now,
        first=number,
        extra={"migrated": True},
        user_id=event.user_id,
        uncertain=plan.uncertain,
    )
    return b.decision()


def _plan(
    new: SagaDefinition, saga: Saga, shape: Shape, mapping: Mapping[str, str], now: datetime
) -> _Plan | str:
    """The plan, or the refusal naming what to fix."""
    prefix = f"cannot migrate saga {saga.saga_id} to version {new.version}"
    problem = _precondition(new, saga, shape, now)
    if problem is not None:
        return f"{prefix}: {problem}"
    problems = _mapping_problems(new, saga, shape, mapping)
    if problems:
        return f"{prefix}: " + "; ".join(problems)
    rename = {name: mapping.get(name, name) for name in shape.names}
    pending = saga.pending
    assert pending is not None  # _precondition
    # A sent attempt (or an earlier copy of an uncertain run) may have taken effect unseen.
    may_have_run = not pending.held or pending.uncertain
    if saga.state is SagaState.RUNNING:
        found = _running(new, saga, shape, rename, may_have_run)
    else:
        found = _compensating(new, saga, shape, rename)
    if isinstance(found, str):
        return f"{prefix}: {found}"
    index, needed = found
    if saga.attempt_seq + needed > MAX_ATTEMPT:
        return (
            f"{prefix}: it needs {needed} attempt numbers above {saga.attempt_seq}, past "
            f"{MAX_ATTEMPT}, the highest a step message carries; finish this saga by hand"
        )
    direction = Direction.FORWARD if saga.state is SagaState.RUNNING else Direction.COMPENSATE
    return _Plan(rename, index, direction, may_have_run)


def _precondition(new: SagaDefinition, saga: Saga, shape: Shape, now: datetime) -> str | None:
    if saga.state.is_terminal:
        return f"it is {saga.state.value}; only sagas in flight can be migrated"
    if new.saga_type != saga.saga_type:
        return f"that version is of saga type {new.saga_type}, the saga is a {saga.saga_type}"
    if saga.definition_version == new.version:
        return f"it already runs version {new.version}"
    if shape.version != saga.definition_version:
        return (
            f"it runs version {saga.definition_version}, not {shape.version} (it was "
            "migrated meanwhile?); look at it again and rerun the migration"
        )
    if not new.linear or len(saga.attempts) > 1 or saga.inbox or saga.waiting_for:
        return (
            "sagas with parallel groups or waits cannot be migrated yet; let it finish "
            "under its version (keep a worker with it), or abort it"
        )
    pending = saga.pending
    if pending is None or not 0 <= pending.step_index < len(shape.steps):
        return "its pending attempt is not of a step of its version's outline"
    if not pending.held and not pending.overdue(now):
        # A copy may still start under the old version: under a renamed step (another
        # idempotency key) it would then take effect twice.
        return (
            f"attempt {pending.number} of step {shape.steps[pending.step_index].name} is in "
            f"flight until {pending.deadline.isoformat()}; migrate it once it has reported, "
            "stalled or been parked"
        )
    return None


def _mapping_problems(
    new: SagaDefinition, saga: Saga, shape: Shape, mapping: Mapping[str, str]
) -> list[str]:
    """Every problem of the map and of where the saga's recorded steps would go."""
    old_names, new_names = shape.names, new.step_names
    found = [
        f"--map {old}={target}: version {shape.version} has no step {old} "
        f"(its steps: {', '.join(old_names)})"
        for old, target in mapping.items()
        if old not in old_names
    ]
    found += [
        f"--map {old}={target}: version {new.version} has no step {target} "
        f"(its steps: {', '.join(new_names)})"
        for old, target in mapping.items()
        if target not in new_names
    ]
    if found:
        return found
    rename = {name: mapping.get(name, name) for name in old_names}
    targets: dict[str, list[str]] = {}
    for old, target in rename.items():
        if target in new_names:
            targets.setdefault(target, []).append(old)
    found += [
        f"steps {' and '.join(olds)} would both become {target}"
        for target, olds in targets.items()
        if len(olds) > 1
    ]
    recorded = _unique([*saga.completed_steps, *saga.compensated_steps, *saga.failed_compensations])
    for name in recorded:
        if name not in rename:
            found.append(
                f"it recorded step {name}, which the outline of version {shape.version} does "
                "not have"
            )
        elif rename[name] not in new_names:
            found.append(
                f"step {name} ran and has no step in version {new.version}: map it with "
                f"--map {name}=STEP"
            )
    return found


def _running(
    new: SagaDefinition, saga: Saga, shape: Shape, rename: Mapping[str, str], may_have_run: bool
) -> tuple[int, int] | str:
    """Where a RUNNING saga resumes (the first new step not completed) and how many attempt
    numbers it needs, or why it cannot."""
    names = new.step_names
    mapped = [rename[n] for n in saga.completed_steps]
    k = len(mapped)
    if mapped != list(names[:k]):
        last = max(names.index(n) for n in mapped)
        skipped = [n for n in names[: last + 1] if n not in mapped]
        if skipped:
            return (
                f"step(s) {', '.join(skipped)} of version {new.version} would be skipped: "
                f"they come before completed step(s) {', '.join(mapped)}"
            )
        return (
            f"completed steps {', '.join(mapped)} would be in another order in version "
            f"{new.version} ({', '.join(names[:k])}); a completed step would run again"
        )
    lost = _lost_compensations(new, shape, rename, saga.completed_steps)
    if lost:
        return lost
    current = shape.steps[saga.pending.step_index if saga.pending else 0].name
    if k >= len(names):
        return (
            f"every step of version {new.version} is completed already: step {current} "
            "(pending) would never run; map it to a step of the new version"
        )
    if may_have_run and rename[current] != names[k]:
        return (
            f"the pending attempt of step {current} may have run: it must stay the next step "
            f"(version {new.version}'s next is {names[k]}); map {current} to {names[k]} or "
            "migrate once it reported"
        )
    return k, new.steps[k].policy(Direction.FORWARD).max_attempts


def _compensating(
    new: SagaDefinition, saga: Saga, shape: Shape, rename: Mapping[str, str]
) -> tuple[int, int] | str:
    """Where a COMPENSATING saga resumes (its pending compensation, renamed) and how many
    attempt numbers the rest of its rollback needs, or why it cannot."""
    assert saga.pending is not None
    names = new.step_names
    current = shape.steps[saga.pending.step_index].name
    if rename[current] not in names:
        return (
            f"the pending compensation of step {current} has no step in version "
            f"{new.version}: map it with --map {current}=STEP"
        )
    settled = {*saga.compensated_steps, *saga.failed_compensations}
    # What a rollback may undo, in the order the steps ran: the completed ones, then the step
    # that failed for good and is compensated too (transition._compensates_itself).
    undo = _unique([*saga.completed_steps, *settled, current])
    positions = [names.index(rename[n]) for n in undo]
    if positions != sorted(set(positions)):
        return (
            f"steps {', '.join(undo)} would be in another order in version {new.version}: "
            "a rollback undoes them in reverse order"
        )
    remaining = [n for n in undo if n not in settled and _has_compensation(shape, n)]
    lost = _lost_compensations(new, shape, rename, remaining)
    if lost:
        return lost
    index = names.index(rename[current])
    # The rollback walks down from the pending step: one above it would never be undone.
    above = [n for n in remaining if names.index(rename[n]) > index]
    if above:
        return f"it would skip the compensation of {', '.join(above)} (above step {current})"
    needed = sum(
        new.steps[names.index(rename[n])].policy(Direction.COMPENSATE).max_attempts
        for n in remaining
    )
    return index, max(needed, 1)


def _lost_compensations(
    new: SagaDefinition, shape: Shape, rename: Mapping[str, str], names: Sequence[str]
) -> str | None:
    """A refusal when a step that ran with a compensation would map to one without."""
    lost = [
        f"{n} (it maps to {rename[n]}, which has none in version {new.version})"
        for n in names
        if _has_compensation(shape, n)
        and new.steps[new.step_names.index(rename[n])].compensate is None
    ]
    return f"it would skip the compensation of {', '.join(lost)}" if lost else None


def _has_compensation(shape: Shape, name: str) -> bool:
    return any(s.name == name and s.compensate for s in shape.steps)


def _outline(value: Any) -> tuple[OutlineStep, ...] | None:
    """An outline as event_data records it, or None when it is not one (or was redacted).

    Pairs `[name, compensate]` (outline_event_data), or `{"name", "compensate"}` objects as
    the first 0.4 builds wrote them. A masked value (a redaction key hit `name`) is no step
    name (NAME_RE) nor a bool: the outline is then unknown, not wrong.
    """
    if not isinstance(value, list):
        return None
    steps = []
    for item in value:
        if isinstance(item, Mapping):
            name, compensate = item.get("name"), item.get("compensate")
        elif isinstance(item, list | tuple) and len(item) == 2:
            name, compensate = item
        else:
            return None
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            return None
        if not isinstance(compensate, bool):
            return None
        steps.append(OutlineStep(name, compensate))
    return tuple(steps)


def _unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))
