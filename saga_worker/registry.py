"""The process-wide table of saga definitions that modules register at import time."""

from __future__ import annotations

import importlib
import importlib.util
import threading
from collections.abc import Callable, Iterable

from .core.definition import SagaDefinition
from .errors import (
    ConfigurationError,
    DuplicateSagaType,
    UnknownDefinitionVersion,
    UnknownSagaType,
)

#: saga_type -> version -> definition, in registration order (the last is the newest).
_definitions: dict[str, dict[str, SagaDefinition]] = {}
_listeners: list[Callable[[SagaDefinition], None]] = []
_lock = threading.Lock()


def register(definition: SagaDefinition) -> SagaDefinition:
    """Make a saga type startable by name; registering the same definition twice is a no-op.

    Several versions of one type may be registered (docs/deploys.md): new starts use the
    one marked `default=True`, else the one registered last.
    """
    with _lock:
        versions = _definitions.setdefault(definition.saga_type, {})
        existing = versions.get(definition.version)
        if existing is definition:
            return definition
        if existing is not None:
            raise DuplicateSagaType(
                f"saga type {definition.saga_type!r} version {definition.version!r} is "
                "already registered by another definition; give one of them another "
                "version= label (or another name)"
            )
        if definition.default and any(d.default for d in versions.values()):
            raise DuplicateSagaType(
                f"saga type {definition.saga_type!r} has two versions marked default=True; mark one"
            )
        versions[definition.version] = definition
        listeners = list(_listeners)
    for listener in listeners:
        listener(definition)
    return definition


def get(saga_type: str) -> SagaDefinition:
    """The definition new starts of a saga type use, or UnknownSagaType naming the
    registered ones."""
    versions = _definitions.get(saga_type)
    if not versions:
        raise UnknownSagaType(saga_type, [t for t, v in _definitions.items() if v])
    marked = [d for d in versions.values() if d.default]
    return marked[0] if marked else list(versions.values())[-1]


def get_version(saga_type: str, version: str | None) -> SagaDefinition:
    """The definition a saga of `version` runs under (None: a saga started before versions
    were recorded, which runs under the default), or UnknownDefinitionVersion."""
    if version is None:
        return get(saga_type)
    found = _definitions.get(saga_type, {}).get(version)
    if found is None:
        raise UnknownDefinitionVersion(saga_type, version, list(_definitions.get(saga_type, {})))
    return found


def versions_of(saga_type: str) -> list[SagaDefinition]:
    """Every registered version of a saga type, oldest registration first."""
    return list(_definitions.get(saga_type, {}).values())


def version_keys() -> set[tuple[str, str]]:
    """Every registered (saga_type, version): what this process can run."""
    return {(d.saga_type, d.version) for d in all_definitions()}


def all_definitions() -> list[SagaDefinition]:
    """Every registered definition, every version of every type."""
    return [d for versions in _definitions.values() for d in versions.values()]


def on_register(listener: Callable[[SagaDefinition], None]) -> None:
    """Call `listener` for every definition, already registered or registered later."""
    with _lock:
        _listeners.append(listener)
        current = all_definitions()
    for definition in current:
        listener(definition)


def import_modules(modules: Iterable[str]) -> None:
    """Import the SAGA_IMPORTS modules (which register their sagas).

    A module that is missing or fails to import is a ConfigurationError naming the module and
    the variable, not a traceback; other errors of the module (an invalid definition) pass.
    """
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            raise _not_found(module, exc.name or module) from None


def check_modules(modules: Iterable[str]) -> None:
    """Fail as `import_modules` would when a SAGA_IMPORTS module does not exist, without
    running it (its parent packages are imported): for commands that hand over to Celery."""
    for module in modules:
        try:
            found = importlib.util.find_spec(module)
        except ModuleNotFoundError as exc:
            raise _not_found(module, exc.name or module) from None
        if found is None:
            raise _not_found(module, module)


def _not_found(module: str, missing: str) -> ConfigurationError:
    if module == missing or module.startswith(missing + "."):
        return ConfigurationError(
            f"SAGA_IMPORTS lists module {module!r}, which cannot be found: fix SAGA_IMPORTS or "
            "install the package that provides it (and check PYTHONPATH)"
        )
    return ConfigurationError(
        f"SAGA_IMPORTS module {module!r} cannot be imported: it needs module {missing!r}, "
        "which is not installed"
    )
