"""`saga-worker migrate` behind the client: find each saga's old outline and the target
definition, and move sagas through `SagaEngine.migrate`, one or a whole version in pages."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

from . import registry
from .core.definition import SagaDefinition
from .core.events import MigrateRequested
from .core.migration import Shape
from .core.model import Saga
from .engine import SagaEngine
from .errors import (
    InvalidRequest,
    MigrationRefused,
    SagaNotFound,
    UnknownDefinitionVersion,
    UnknownSagaType,
)
from .views import MigrationResult

#: Sagas read per page of a batch: a page of ids at a time, never the whole version.
PAGE = 200


class MigrationReads(Protocol):
    """The reads a migration needs (store/queries.py's OperatorQueries has them)."""

    def load(self, saga_id: str) -> Saga | None: ...

    def shape_rows(self, saga_id: str) -> list[dict[str, Any]]: ...

    def in_flight_ids(
        self, saga_type: str, version: str, *, after: str = "", limit: int = PAGE
    ) -> list[str]: ...


class Migrator:
    """Moves sagas in flight to another definition version (core/migration.py decides).

    `engine(dry_run)` is the engine to go through: with dry_run, one that needs no broker,
    since nothing is written or sent. `redact` hides secrets in send errors.
    """

    def __init__(
        self,
        reads: MigrationReads,
        engine: Callable[[bool], SagaEngine],
        redact: Callable[[str | None], str | None],
    ) -> None:
        self.reads = reads
        self.engine = engine
        self.redact = redact

    def one(
        self, saga_id: str, to_version: str, request: MigrateRequested, *, dry_run: bool
    ) -> MigrationResult:
        """Migrate one saga; MigrationRefused (exit 4) when it cannot move."""
        saga = self.reads.load(saga_id)
        if saga is None:
            raise SagaNotFound(saga_id)
        target = registry.get_version(saga.saga_type, to_version)
        result = self._move(saga, target, request, dry_run)
        if result.refused is not None:
            raise MigrationRefused(result.refused)
        return result

    def batch(
        self,
        saga_type: str,
        from_version: str,
        to_version: str,
        request: MigrateRequested,
        *,
        dry_run: bool,
    ) -> Iterator[MigrationResult]:
        """Migrate every saga in flight of (saga_type, from_version), one result each;
        refusals are results, not errors. Pages by saga id: a migrated saga leaves the
        version, a refused one is passed over."""
        if from_version == to_version:
            raise InvalidRequest("--to", f"is the version migrated from ({from_version})")
        target = registry.get_version(saga_type, to_version)
        after = ""
        while ids := self.reads.in_flight_ids(saga_type, from_version, after=after, limit=PAGE):
            for saga_id in ids:
                saga = self.reads.load(saga_id)
                if saga is not None:
                    yield self._move(saga, target, request, dry_run)
            after = ids[-1]

    def _move(
        self, saga: Saga, target: SagaDefinition, request: MigrateRequested, dry_run: bool
    ) -> MigrationResult:
        shape = self.shape_of(saga)
        if shape is None:
            return self._refused(
                saga,
                target,
                dry_run,
                f"cannot migrate saga {saga.saga_id}: the outline of its version "
                f"{saga.definition_version} is neither registered here nor readable in its "
                "audit trail (absent, or masked by SAGA_REDACT_KEYS); list the module that "
                "defines that version in SAGA_IMPORTS",
            )
        try:
            outcome = self.engine(dry_run).migrate(
                saga.saga_id, target, shape, request, dry_run=dry_run
            )
        except SagaNotFound as exc:  # gone between the page and the write
            return self._refused(saga, target, dry_run, str(exc))
        decision = outcome.decision
        if decision.ignored is not None:
            return self._refused(saga, target, dry_run, decision.ignored)
        after = decision.saga
        pending = after.pending
        return MigrationResult(
            saga_id=saga.saga_id,
            state=after.state.value,
            from_version=saga.definition_version,
            to_version=target.version,
            dry_run=dry_run,
            resume_step=target.steps[pending.step_index].name if pending else None,
            direction=pending.direction.value if pending else None,
            attempt=pending.number if pending else None,
            completed_steps=after.completed_steps,
            compensated_steps=after.compensated_steps,
            sent=outcome.sent,
            send_errors=tuple(
                f"{f.task_name}: {self.redact(f.error)}" for f in outcome.send_failures
            ),
        )

    def shape_of(self, saga: Saga) -> Shape | None:
        """The outline of the version the saga runs: as the registered definition of that
        version has it (a saga started before versions were recorded runs under its type's
        default), else as its audit trail recorded it (the old code is gone)."""
        try:
            definition = self.engine(True).definitions(saga.saga_type, saga.definition_version)
        except (UnknownDefinitionVersion, UnknownSagaType):
            return Shape.from_audit(self.reads.shape_rows(saga.saga_id), saga.definition_version)
        return Shape.of(definition, saga.definition_version)

    @staticmethod
    def _refused(saga: Saga, target: SagaDefinition, dry_run: bool, reason: str) -> MigrationResult:
        return MigrationResult(
            saga_id=saga.saga_id,
            state=saga.state.value,
            from_version=saga.definition_version,
            to_version=target.version,
            dry_run=dry_run,
            refused=reason,
            completed_steps=saga.completed_steps,
            compensated_steps=saga.compensated_steps,
        )
