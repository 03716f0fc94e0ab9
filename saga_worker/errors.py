"""The exceptions saga_worker raises, each with a stable code and a message that says what to fix.

Standard library only, so that the pure core can raise them too.
"""

from __future__ import annotations

from collections.abc import Sequence


class SagaError(Exception):
    """Base of every error saga_worker raises on purpose."""

    code = "saga_error"


class ConfigurationError(SagaError):
    """A SAGA_* setting is missing or malformed."""

    code = "configuration_error"


class InvalidSagaDefinition(SagaError):
    """A saga definition has one or more problems; all of them are listed at once."""

    code = "invalid_saga_definition"

    def __init__(self, saga_type: str, problems: Sequence[str]) -> None:
        self.saga_type = saga_type
        self.problems = tuple(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"saga definition {saga_type!r} is invalid:\n{lines}")


class UnknownSagaType(SagaError):
    """A start names a saga type that no imported module registered."""

    code = "unknown_saga_type"

    def __init__(self, saga_type: str, known: Sequence[str]) -> None:
        self.saga_type = saga_type
        known_list = ", ".join(sorted(known)) or "none"
        shown = saga_type if len(saga_type) <= 100 else saga_type[:100] + "..."
        super().__init__(
            f"unknown saga_type {shown!r} (registered: {known_list}); "
            "did you forget to list its module in SAGA_IMPORTS?"
        )


class UnknownDefinitionVersion(SagaError):
    """A saga runs a version of its definition that this process has not registered."""

    code = "unknown_definition_version"

    def __init__(
        self, saga_type: str, version: str, known: Sequence[str], why: str | None = None
    ) -> None:
        self.saga_type = saga_type
        self.version = version
        known_list = ", ".join(known) or "none"
        why = why or f"is not registered here (registered: {known_list})"
        super().__init__(
            f"saga type {saga_type!r} version {version!r} {why}; run it where that version "
            "is deployed, or move the saga with `saga-worker migrate`"
        )


class DuplicateSagaType(SagaError):
    """Two different definitions were registered under one saga type."""

    code = "duplicate_saga_type"


class InvalidRequest(SagaError):
    """A saga.start / saga.abort message broke a rule; `field` names what to fix."""

    code = "invalid_request"

    def __init__(self, field: str, rule: str) -> None:
        self.field = field
        self.rule = rule
        super().__init__(f"{field}: {rule}")


class UnstorableRequest(SagaError):
    """The database refused a value of a message for good (a DataError or IntegrityError).

    Validation should have refused it first; this names what the database said, so that
    the message is refused once instead of being retried for ever.
    """

    code = "unstorable"

    def __init__(self, detail: str) -> None:
        self.field = None
        super().__init__(
            f"the database refused a value of this message ({detail}); it is not retried: "
            "send text without control characters, within the documented lengths"
        )


class SagaNotFound(SagaError):
    """No checkpoint exists for this saga_id."""

    code = "saga_not_found"

    def __init__(self, saga_id: str) -> None:
        self.saga_id = saga_id
        super().__init__(f"no saga with saga_id {saga_id!r}")


class ConcurrencyConflict(SagaError):
    """Another process advanced the saga first; the caller reloads and decides again."""

    code = "concurrency_conflict"


class NonRetryableStepError(SagaError):
    """Raise from a step to fail it at once, without its remaining attempts."""

    code = "non_retryable_step_error"


class GrantRefused(SagaError):
    """`saga-worker db grant` cannot give a role the run-time privileges safely: the role is
    unknown, owns the tables or is a superuser, or the connection cannot grant."""

    code = "grant_refused"


class DatabaseUnavailable(SagaError):
    """The saga database cannot be reached, or it has no saga tables yet."""

    code = "database_unavailable"


class BrokerUnavailable(SagaError):
    """The broker of SAGA_BROKER_URL cannot be reached."""

    code = "broker_unavailable"


class InvalidFilter(SagaError):
    """A list/export filter, paging option or export file argument is not valid."""

    code = "invalid_filter"


class OperationRefused(SagaError):
    """retry/abort does not apply to the saga in its current state."""

    code = "operation_refused"


class MigrationRefused(OperationRefused):
    """`saga-worker migrate` would skip a step or a compensation, or the saga cannot move."""

    code = "migration_refused"
