"""A stand-in for a Celery app where a test only needs what the dispatcher sends."""

from __future__ import annotations

from typing import Any


class FakeApp:
    """Records send_task calls; signature() returns its options."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def send_task(self, name: str, **options: Any) -> None:
        self.sent.append((name, options))

    def signature(self, name: str, **options: Any) -> dict[str, Any]:
        return {"task": name, **options}
