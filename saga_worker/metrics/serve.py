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
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server, values

from .. import registry as saga_registry
from ..config import Settings
from ..engine import EngineHooks
from .gauges import SagaStateCollector
from .hooks import MetricsHook, SagaMetrics
from .multiprocess import (
    CompactingMultiProcessCollector,
    claim_directory,
    enable_multiprocess,
    private_directory,
)

log = logging.getLogger(__name__)


@dataclass
class _Served:
    server: WSGIServer | None
    directory: str | None
    #: Descriptor holding the claim on SAGA_METRICS_DIR; None for a private directory.
    claim: int | None = None


_served: _Served | None = None
#: The directory this process counts operator transitions into, and the hook doing it.
_operator: tuple[Path, MetricsHook] | None = None


def _serve(port: int, registry: CollectorRegistry) -> WSGIServer:
    server, _thread = start_http_server(port, registry=registry)
    return server


def _worker_directory(settings: Settings) -> tuple[str, int | None]:
    """SAGA_METRICS_DIR when set and free, else a private directory; and the claim on it."""
    if settings.metrics_dir is not None:
        try:
            claim = claim_directory(settings.metrics_dir)
            why = "is served by another worker"
        except OSError as exc:
            claim, why = None, f"cannot be used ({exc})"
        if claim is not None:
            return str(settings.metrics_dir), claim
        log.error(
            "metrics: SAGA_METRICS_DIR=%s %s; counting in a private directory, where "
            "operator actions (saga-worker abort/retry) are not counted",
            settings.metrics_dir,
            why,
        )
    return private_directory(), None


def start_worker_metrics(hook: MetricsHook, settings: Settings, port: int) -> _Served | None:
    """In the worker's main process, before forking: directory, file values, HTTP server."""
    global _served
    if _served is not None:
        return _served
    directory, claim = _worker_directory(settings)
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
        _served = _Served(None, directory, claim)
        return _served
    _served = _Served(server, directory, claim)
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
    if _served is not None and _served.claim is not None:
        # The claim then ends with the main process, not with its last child.
        os.close(_served.claim)
    _served = None


def stop() -> None:
    """In the process that started the endpoint: stop it, remove a private directory, and
    release SAGA_METRICS_DIR (its files stay: the next worker goes on from their totals)."""
    global _served
    served, _served = _served, None
    if served is None:
        return
    if served.server is not None:
        served.server.shutdown()
        served.server.server_close()
    if served.directory is not None:
        values.close_all_multiprocess_files()  # type: ignore[no-untyped-call]
        if served.claim is None:
            shutil.rmtree(served.directory, ignore_errors=True)
        else:
            os.close(served.claim)


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


def operator_hooks(settings: Settings) -> list[EngineHooks]:
    """Engine hooks that count this process's transitions in what the workers serve.

    For a process that is not a worker but applies transitions through the engine: the
    operator CLI's `SagaClient` (abort, retry), later the web console. With SAGA_METRICS_DIR
    set, this process writes its counters as files into that directory, and the worker that
    serves it sums them into its /metrics like its own pool's (after this process exits,
    they are folded into the worker's archive). Run such a process on the worker's host and
    in its pid namespace (`docker compose exec worker saga-worker abort ...`): the worker
    tells a finished process's files from a live one's by its pid.

    Without SAGA_METRICS_DIR this returns []: a worker's default directory is private to its
    process group and not known here, and counters kept in this process's memory would be
    gone when it exits, before anything scraped them. The database gauges
    (`saga_running_current`, ...) show the new states at the next scrape either way.

    A process writes to one directory only (prometheus_client's value type is global): a
    second call naming another directory gets [] and a warning.
    """
    global _operator
    directory = settings.metrics_dir
    if directory is None:
        return []
    if _operator is None:
        # A directory this process cannot write costs the count, never the operator action.
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("metrics: SAGA_METRICS_DIR=%s: %s; not counted", directory, exc)
            return []
        if not os.access(directory, os.W_OK | os.X_OK):
            log.warning("metrics: cannot write to SAGA_METRICS_DIR=%s; not counted", directory)
            return []
        enable_multiprocess(str(directory))
        _operator = (directory, MetricsHook(SagaMetrics()))
    elif _operator[0] != directory:
        log.warning(
            "metrics: this process already counts into %s; transitions of a client for %s "
            "are not counted",
            _operator[0],
            directory,
        )
        return []
    return [_operator[1]]
