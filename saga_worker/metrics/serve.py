"""Process wiring: which process counts transitions, into what, and who serves them.

The worker's main process creates the multiprocess directory before the pool forks, counts
into it and serves the sum on SAGA_METRICS_PORT with the database gauges; pool children
count and do not serve; the beat serves the gauges only (it runs no transitions).
`install` connects these to Celery's signals. `operator_hooks` lets a process outside the
worker (the CLI, a console) count its own transitions into a worker's directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server, values

from .. import registry as saga_registry
from ..config import Settings
from .gauges import SagaStateCollector
from .hooks import MetricsHook, SagaMetrics
from .multiprocess import (
    CompactingMultiProcessCollector,
    enable_multiprocess,
    remove_orphaned_directories,
)

log = logging.getLogger(__name__)


@dataclass
class _Served:
    server: WSGIServer | None
    directory: str | None


_served: _Served | None = None


def _serve(port: int, registry: CollectorRegistry) -> WSGIServer:
    server, _thread = start_http_server(port, registry=registry)
    return server


def start_worker_metrics(hook: MetricsHook, settings: Settings, port: int) -> _Served | None:
    """In the worker's main process, before forking: private dir, file values, HTTP server."""
    global _served
    if _served is not None:
        return _served
    remove_orphaned_directories()
    directory = tempfile.mkdtemp(prefix=f"saga-metrics-{os.getpid()}-")
    enable_multiprocess(directory)
    hook.metrics = SagaMetrics()
    hook.metrics.preinitialize(saga_registry.all_definitions())
    registry = CollectorRegistry()
    registry.register(CompactingMultiProcessCollector(directory))
    registry.register(SagaStateCollector(settings.database_url))
    try:
        server = _serve(port, registry)
    except OSError as exc:
        log.error("metrics: cannot serve on port %s (%s); counting without an endpoint", port, exc)
        _served = _Served(None, directory)
        return _served
    _served = _Served(server, directory)
    return _served


def start_beat_metrics(settings: Settings, port: int) -> _Served | None:
    """In the beat: the saga state gauges (the beat runs no transitions itself)."""
    global _served
    if _served is not None:  # an embedded beat (worker -B) shares the worker's endpoint
        return _served
    registry = CollectorRegistry()
    registry.register(SagaStateCollector(settings.database_url))
    try:
        server = _serve(port, registry)
    except OSError as exc:
        log.error("metrics: cannot serve on port %s (%s)", port, exc)
        return None
    _served = _Served(server, None)
    log.info("metrics: beat serving on port %s", server.server_port)
    return _served


def forget_in_child() -> None:
    """In a forked pool child: close the inherited listening socket (the parent serves)."""
    global _served
    if _served is not None and _served.server is not None:
        _served.server.socket.close()
    _served = None


def stop() -> None:
    """In the process that started the endpoint: stop it and remove the private directory."""
    global _served
    served, _served = _served, None
    if served is None:
        return
    if served.server is not None:
        served.server.shutdown()
        served.server.server_close()
    if served.directory is not None:
        values.close_all_multiprocess_files()  # type: ignore[no-untyped-call]
        shutil.rmtree(served.directory, ignore_errors=True)


def install(app: Any, settings: Settings) -> MetricsHook:
    """Connect the Celery signals that set metrics up; returns the hook for the engine."""
    from celery import signals

    hook = MetricsHook()
    port = settings.metrics_port

    def on_worker_init(sender: Any = None, **_: Any) -> None:
        if port is not None and getattr(sender, "app", None) is app:
            start_worker_metrics(hook, settings, port)

    def on_beat_init(sender: Any = None, **_: Any) -> None:
        if port is not None and getattr(sender, "app", None) is app:
            start_beat_metrics(settings, port)

    def on_worker_ready(sender: Any = None, **_: Any) -> None:
        # Logged here, not at worker_init: Celery sets logging up after that signal.
        if _served is not None and _served.server is not None:
            log.info(
                "metrics: serving on port %s (files in %s)",
                _served.server.server_port,
                _served.directory,
            )

    def on_process_init(**_: Any) -> None:
        forget_in_child()

    def on_shutdown(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app:
            stop()

    signals.worker_init.connect(on_worker_init, weak=False)
    signals.beat_init.connect(on_beat_init, weak=False)
    signals.worker_ready.connect(on_worker_ready, weak=False)
    signals.worker_process_init.connect(on_process_init, weak=False)
    signals.worker_shutdown.connect(on_shutdown, weak=False)
    return hook
