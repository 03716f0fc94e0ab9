"""Reading sagas and sending producer messages; shared by library users and the CLI."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from .audit import Redactor
from .config import Settings
from .core.model import Saga
from .store.repository import SagaStore, create_db_engine


class SagaClient:
    """Talks to the saga database directly and to the workers through the broker."""

    def __init__(self, settings: Settings | None = None, app: Any = None) -> None:
        self.settings = settings or Settings.from_env()
        self.store = SagaStore(
            create_db_engine(self.settings.database_url), Redactor(self.settings.redact_keys)
        )
        self._app = app

    @property
    def app(self) -> Any:
        if self._app is None:
            from .worker.app import create_app

            self._app = create_app(self.settings)
        return self._app

    def start(self, saga_type: str, context: dict[str, Any], **fields: Any) -> None:
        """Send saga.start exactly as a producer would."""
        self.app.send_task(
            "saga.start",
            kwargs={"saga_type": saga_type, "context": context, **fields},
            queue=self.settings.queue,
        )

    def abort(self, saga_id: str, reason: str, user_id: str | None = None) -> None:
        self.app.send_task(
            "saga.abort",
            kwargs={"saga_id": saga_id, "reason": reason, "user_id": user_id},
            queue=self.settings.queue,
        )

    def get(self, saga_id: str) -> Saga | None:
        return self.store.load(saga_id)

    def audit_trail(self, saga_id: str) -> list[dict[str, Any]]:
        return self.store.audit_trail(saga_id)

    def wait_terminal(
        self, saga_ids: Iterable[str], timeout: float = 60.0
    ) -> dict[str, Saga | None]:
        """Poll until every saga is terminal or `timeout` passes; returns the last seen states."""
        ids = list(saga_ids)
        deadline = time.monotonic() + timeout
        while True:
            seen = {saga_id: self.store.load(saga_id) for saga_id in ids}
            done = all(s is not None and s.state.is_terminal for s in seen.values())
            if done or time.monotonic() > deadline:
                return seen
            time.sleep(0.2)
