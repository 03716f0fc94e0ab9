"""Per-process wiring of settings, store and engine (rebuilt after a prefork fork)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from ..audit.redaction import Redactor
from ..config import Settings
from ..engine import EngineHooks, SagaEngine
from ..errors import ConfigurationError
from ..store.connect import create_db_engine
from ..store.keyring import signing_key_for
from ..store.repository import SagaStore
from .dispatch import CeleryDispatcher

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """Everything a task needs; one per process because database pools must not cross fork."""

    settings: Settings
    store: SagaStore
    engine: SagaEngine
    dispatcher: CeleryDispatcher
    signing_key: str


@dataclass
class RuntimeFactory:
    """Builds the `Runtime` lazily, once per process id."""

    app: Any
    settings: Settings
    hooks: list[EngineHooks] = field(default_factory=list)
    #: Called with the reason of each refused message (metrics: saga_rejected_total).
    rejection_hooks: list[Callable[[str], None]] = field(default_factory=list)
    _runtime: Runtime | None = None
    _pid: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self) -> Runtime:
        pid = os.getpid()
        if self._runtime is not None and self._pid == pid:
            return self._runtime
        with self._lock:
            if self._runtime is None or self._pid != pid:
                try:
                    self._runtime = self._build()
                except ConfigurationError as exc:
                    self._refuse_to_work(exc)
                self._pid = pid
            return self._runtime

    def _refuse_to_work(self, exc: ConfigurationError) -> NoReturn:
        """A process without the database's signing key must not consume messages.

        The start-up check could not reach the database; this first task did. The message
        goes back to the queue for a worker with the right key (a failed acks_late task
        would be acknowledged, and lost), and this worker is asked to shut down.
        """
        from celery import current_task
        from celery.exceptions import Reject

        log.critical("%s; this worker stops and leaves its messages to the others", exc)
        hostname = getattr(getattr(current_task, "request", None), "hostname", None)
        if hostname:
            try:
                self.app.control.shutdown(destination=[hostname])
            except Exception:
                log.exception("could not ask worker %s to shut down", hostname)
        raise Reject(str(exc), requeue=True) from None

    def rejected(self, reason: str) -> None:
        """Tell the rejection hooks that a message was refused (and nothing written)."""
        for hook in self.rejection_hooks:
            hook(reason)

    def _build(self) -> Runtime:
        settings = self.settings
        store = SagaStore(create_db_engine(settings.database_url), Redactor(settings.redact_keys))
        key = signing_key_for(settings, store)
        dispatcher = CeleryDispatcher(self.app, settings, key)
        engine = SagaEngine(store, dispatcher, settings.limits(), hooks=self.hooks)
        return Runtime(settings, store, engine, dispatcher, key)

    def check_signing_key(self) -> None:
        """Refuse to run with a missing key, or one the database was not set up with.

        ConfigurationError when the key is wrong or missing; a database that cannot be
        reached now is left to the first task (which checks again).
        """
        from sqlalchemy.exc import DBAPIError

        store = SagaStore(
            create_db_engine(self.settings.database_url, pool=False),
            Redactor(self.settings.redact_keys),
        )
        try:
            signing_key_for(self.settings, store)
        except DBAPIError as exc:
            log.warning(
                "cannot check the signing key against the database now (%s); the first task "
                "checks it again",
                type(exc.orig).__name__,
            )
        finally:
            store.engine.dispose()
