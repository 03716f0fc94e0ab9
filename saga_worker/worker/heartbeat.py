"""This worker's definition versions: the queues it consumes and its heartbeat row.

A worker consumes the base queue (starts, aborts, the sweep) and one queue per definition
version it registered, where every message about a saga of that version goes
(docs/deploys.md). Its main process keeps a `saga_workers` row fresh, so that a sweep on any
worker can tell whether some live worker has a saga's version, and deletes it on a warm
shutdown.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Collection
from datetime import UTC, datetime
from typing import Any

from celery import Celery
from celery.signals import celeryd_after_setup, worker_ready, worker_shutdown

from .. import registry
from ..config import Settings
from ..store import workers
from ..store.connect import create_db_engine
from ..store.port import HEARTBEAT_SECONDS, VersionKey
from .dispatch import version_queue

log = logging.getLogger(__name__)

#: Random bytes of a worker's instance id (hex in its heartbeat row's key).
INSTANCE_BYTES = 4


def version_queues(base: str, versions: Collection[VersionKey]) -> list[str]:
    return [version_queue(base, saga_type, version) for saga_type, version in sorted(versions)]


class Heartbeat:
    """Refreshes this worker's row every HEARTBEAT_SECONDS from a thread of the main process.

    The row is keyed by the node name plus `instance`, drawn here once per worker (its main
    process and pool): another worker with the same node name keeps a row of its own.
    """

    def __init__(self, settings: Settings, node: str, versions: Collection[VersionKey]) -> None:
        self.settings = settings
        self.node = node
        self.instance = secrets.token_hex(INSTANCE_BYTES)
        self.versions = set(versions)
        self.stopped = threading.Event()
        self.engine = create_db_engine(settings.database_url, pool=False)
        self.thread = threading.Thread(target=self._run, name="saga-heartbeat", daemon=True)

    def start(self) -> None:
        self._prune()
        # At once, not after HEARTBEAT_SECONDS: worker_ready fires once the consumer has
        # started, so messages may already be taken; sweeps elsewhere should see this worker's
        # versions as soon as possible.
        self._beat()
        self.thread.start()
        log.info(
            "heartbeat of %s (instance %s) lists %d definition version(s)",
            self.node,
            self.instance,
            len(self.versions),
        )

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
        try:
            workers.forget(self.engine, self.node, self.instance)
        except Exception as exc:  # the row then ages out (LIVE_WINDOW)
            log.warning("could not delete this worker's heartbeat row: %s", exc)
        self.engine.dispose()

    def _run(self) -> None:
        while not self.stopped.wait(HEARTBEAT_SECONDS):
            self._beat()

    def _prune(self) -> None:
        """Delete rows of workers killed long ago (a warm shutdown deletes its own)."""
        try:
            pruned = workers.prune(self.engine, datetime.now(UTC))
        except Exception as exc:  # harmless: the rows are not live; the next start tries again
            log.warning("old heartbeat rows not pruned: %s", exc)
            return
        if pruned:
            log.info("deleted %d heartbeat row(s) older than %s", pruned, workers.PRUNE_AFTER)

    def _beat(self) -> None:
        try:
            workers.beat(
                self.engine,
                self.node,
                self.instance,
                self.settings.queue,
                self.versions,
                datetime.now(UTC),
            )
        except Exception as exc:  # a database outage: the next beat tries again
            log.warning("heartbeat not written: %s", exc)


def install_versions(app: Celery, settings: Settings) -> None:
    """Consume the version queues and keep the heartbeat row of this app's workers."""
    beats: list[Heartbeat] = []

    def add_queues(sender: Any = None, instance: Any = None, **_: Any) -> None:
        if getattr(instance, "app", None) is not app:
            return
        queues = instance.app.amqp.queues
        for name in version_queues(settings.queue, registry.version_keys()):
            # Looked up first: a missing queue is made as a sender makes it (its type from
            # task_create_missing_queue_type), so both declare it alike on RabbitMQ.
            queues.select_add(queues[name])

    def start(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not app:
            return
        beat = Heartbeat(settings, str(sender.hostname), registry.version_keys())
        beat.start()
        beats.append(beat)

    def stop(sender: Any = None, **_: Any) -> None:
        while beats:
            beats.pop().stop()

    celeryd_after_setup.connect(add_queues, weak=False)
    worker_ready.connect(start, weak=False)
    worker_shutdown.connect(stop, weak=False)
