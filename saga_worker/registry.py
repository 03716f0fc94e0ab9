"""The process-wide table of saga definitions that modules register at import time."""

from __future__ import annotations

import threading
from collections.abc import Callable

from .core.definition import SagaDefinition
from .errors import DuplicateSagaType, UnknownSagaType

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
