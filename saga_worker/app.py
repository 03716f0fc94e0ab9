"""The Celery app of `celery -A saga_worker.app worker|beat|flower`, built from SAGA_* settings."""

from __future__ import annotations

from .worker.app import create_app

app = create_app()
