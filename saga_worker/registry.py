"""The process-wide table of saga definitions that modules register at import time."""

from __future__ import annotations

import importlib
import importlib.util
import threading
from collections.abc import Callable, Iterable

from .core.definition import SagaDefinition
from .errors import ConfigurationError, DuplicateSagaType, UnknownSagaType

_definitions: dict[str, SagaDefinition] = {}
_listeners: list[Callable[[SagaDefinition], None]] = []
_lock = threading.Lock()


def register(definition: SagaDefinition) -> SagaDefinition:
    """Make a saga type startable by name; registering the same definition twice is a no-op."""
    with _lock:
        existing = _definitions.get(definition.saga_type)
        if existing is definition:
            return definition
        if existing is not None:
            raise DuplicateSagaType(
                f"saga type {definition.saga_type!r} is already registered by another "
                "definition; give one of them a different name"
            )
        _definitions[definition.saga_type] = definition
        listeners = list(_listeners)
    for listener in listeners:
        listener(definition)
    return definition


def get(saga_type: str) -> SagaDefinition:
    """The definition of a saga type, or UnknownSagaType naming the registered ones."""
    try:
        return _definitions[saga_type]
    except KeyError:
        raise UnknownSagaType(saga_type, list(_definitions)) from None


def all_definitions() -> list[SagaDefinition]:
    return list(_definitions.values())


def on_register(listener: Callable[[SagaDefinition], None]) -> None:
    """Call `listener` for every definition, already registered or registered later."""
    with _lock:
        _listeners.append(listener)
        current = list(_definitions.values())
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
