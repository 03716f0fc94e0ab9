"""The Celery app factory: at-least-once settings, JSON only, tasks and beat schedule."""

from __future__ import annotations

import importlib
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import Celery
from celery.app.defaults import _TO_NEW_KEY as OLD_SETTING_NAMES
from celery.app.defaults import DEFAULTS as CELERY_SETTINGS
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    beat_init,
    worker_init,
    worker_process_init,
)

from .. import registry
from ..audit.redaction import Redactor, install_log_redaction
from ..config import Settings
from ..engine import utcnow
from ..errors import ConfigurationError
from ..metrics.serve import install as install_metrics
from ..recovery import sweep
from .broker import guarded_transport
from .consumer import CONSUMER_PATH
from .expiry import install_expiry_reports
from .guard import GuardedTask
from .heartbeat import install_versions
from .runtime import RuntimeFactory
from .shutdown import size_soft_shutdown
from .steps import register_step_tasks
from .tasks import register_core_tasks
from .timers import install_timer_compaction

log = logging.getLogger(__name__)
#: Exit code of a configuration error, as the CLI gives it.
EXIT_CONFIG = 6


def broker_options(settings: Settings) -> dict[str, Any]:
    """Transport options; the embedded filesystem broker gets its folders under SAGA_HOME."""
    if settings.is_embedded_broker:
        root = Path(settings.broker_url.removeprefix("filesystem://") or settings.home / "broker")
        if not root.is_absolute():
            root = settings.home / "broker"
        folders = {
            "data_folder_in": root / "queue",
            "data_folder_out": root / "queue",
            "control_folder": root / "control",
            "processed_folder": root / "processed",
        }
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        return {**{k: str(v) for k, v in folders.items()}, "polling_interval": 0.05}
    scheme = settings.broker_url.partition("://")[0].lower()
    if scheme in ("redis", "rediss", "sentinel"):
        return {"visibility_timeout": 3600}
    if scheme in ("amqp", "amqps", "pyamqp"):
        # Publisher confirms: without them py-amqp's basic_publish returns before RabbitMQ
        # has the message, and one the broker drops (a full disk, a missing queue, a lost
        # connection) is lost after its transition was committed, until the recovery sweep
        # re-sends it. With them each publish waits for the broker's ack or raises.
        return {"confirm_publish": True}
    return {}


# What the saga engine's guarantees rest on: SAGA_CELERY_CONFIG may not change these.
PINNED_SETTINGS = (
    "task_serializer",
    "result_serializer",
    "accept_content",
    "event_serializer",
    "result_accept_content",
    "task_acks_late",
    "task_acks_on_failure_or_timeout",
    "task_reject_on_worker_lost",
    "task_send_sent_event",
    "task_annotations",  # would set acks_late and the like per task
    "task_default_queue",
    "task_queues",
    "task_routes",
    "task_ignore_result",
    "result_backend",  # step outputs would be stored outside the audited database
    "broker_url",  # SAGA_BROKER_URL
    "broker_transport",  # the guarded Redis and AMQP transports
    "worker_consumer",  # the guarded consumer
    "task_protocol",  # the workers accept protocol 2 only
    "task_default_delivery_mode",  # transient messages die with a broker restart
    "task_always_eager",  # would run steps in the sender, outside any worker
    "enable_utc",
    "timezone",
)
RECOVERY_ENTRY = "saga-recover"
ANCHOR_ENTRY = "saga-anchor"


def _beat_schedule(settings: Settings) -> dict[str, Any]:
    # No `expires` on the sweep: Celery turns it into an absolute time by the beat's clock,
    # so a worker clock ahead by more than it, or a backlog longer than it on the saga
    # queue, would drop every sweep and switch recovery off. Sweeps that pile up behind a
    # backlog are coalesced by the worker instead (SweepGate).
    schedule: dict[str, Any] = {
        RECOVERY_ENTRY: {
            "task": "saga.recover",
            "schedule": settings.recovery_interval_seconds,
        }
    }
    if settings.anchor_interval_seconds is not None:
        # No `expires`: Celery turns it into a wall-clock time, which a skewed worker clock
        # or a backlog makes drop every anchor; the task itself skips one that comes too soon.
        schedule[ANCHOR_ENTRY] = {
            "task": "saga.anchor",
            "schedule": settings.anchor_interval_seconds,
        }
    return schedule


class SweepGate:
    """Coalesces sweeps that arrive in a burst (those the beat sent while a backlog or an
    outage held them, or a second beat's): one that arrives less than `min_gap` seconds after
    this process's previous sweep *started* returns at once. Measured from the start, not the
    end, so a long sweep does not make the next due one look early: every sweep skipped was
    merged with one that scanned less than `min_gap` earlier. Measured on the monotonic clock,
    so no host's wall clock can skip a sweep."""

    def __init__(self, min_gap: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.min_gap = min_gap
        self.clock = clock
        self.last_start: float | None = None

    def open(self) -> bool:
        """True, and the sweep's start recorded, when a sweep may run now."""
        now = self.clock()
        if self.last_start is not None and now - self.last_start < self.min_gap:
            return False
        self.last_start = now
        return True


def apply_celery_config(app: Celery, module_name: str) -> None:
    """Apply the settings of the module SAGA_CELERY_CONFIG names (Sentinel, TLS, transport).

    Its Celery settings (lower-case names) override the defaults, except PINNED_SETTINGS;
    its `broker_transport_options` are merged over ours and its `beat_schedule` added to the
    recovery sweep's.
    """
    given = celery_config_settings(module_name)
    for name in ("broker_transport_options", "beat_schedule"):
        if name in given:
            given[name] = {**app.conf[name], **given[name]}
    app.conf.update(given)


def celery_config_settings(module_name: str) -> dict[str, Any]:
    """The Celery settings of the module SAGA_CELERY_CONFIG names, checked: ConfigurationError
    when it cannot be imported or sets anything saga_worker cannot honour. `saga-worker
    worker/beat` call it before handing over to Celery, so these are one line and exit 6,
    not a traceback of Celery's."""
    where = f"SAGA_CELERY_CONFIG={module_name!r}"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(
            f"{where} cannot be imported ({exc}); "
            "name a module on the Python path of every worker, beat and CLI process"
        ) from None
    names = [name for name in vars(module) if not name.startswith("_")]
    old_style = sorted(name for name in names if name in OLD_SETTING_NAMES)
    if old_style:
        renamed = ", ".join(f"{name} -> {OLD_SETTING_NAMES[name]}" for name in old_style)
        raise ConfigurationError(f"{where} uses old setting names; rename them: {renamed}")
    given = {name: getattr(module, name) for name in names if name in CELERY_SETTINGS}
    pinned = sorted(name for name in given if name in PINNED_SETTINGS)
    if pinned:
        raise ConfigurationError(
            f"{where} sets {', '.join(pinned)}, which saga_worker fixes (JSON only, late "
            "acks, its own queue, broker and transport); remove them from that module "
            "(SAGA_QUEUE and SAGA_BROKER_URL name the queue and the broker)"
        )
    for name in ("broker_transport_options", "beat_schedule"):
        if name in given and not isinstance(given[name], dict):
            raise ConfigurationError(f"{where}: {name} must be a dict")
    if given.get("broker_transport_options", {}).get("confirm_publish", True) is not True:
        raise ConfigurationError(
            f"{where}: broker_transport_options may not turn confirm_publish off: without "
            "publisher confirms RabbitMQ can drop a message after its transition committed"
        )
    if RECOVERY_ENTRY in given.get("beat_schedule", {}):
        raise ConfigurationError(
            f"{where}: beat_schedule may not replace {RECOVERY_ENTRY!r}, the recovery "
            "sweep (SAGA_RECOVERY_INTERVAL_SECONDS sets its period)"
        )
    return given


def _redact_logs(settings: Settings) -> None:
    """Mask secrets in every log record of the worker and beat (main and pool processes)."""
    redactor = Redactor(settings.redact_keys)

    def install(logger: logging.Logger | None = None, **_: Any) -> None:
        install_log_redaction(redactor, logger)

    # weak=False: the closures must outlive this call.
    after_setup_logger.connect(install, weak=False)
    after_setup_task_logger.connect(install, weak=False)
    worker_process_init.connect(install, weak=False)


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app running every registered saga, configured for at-least-once delivery."""
    settings = settings or Settings.from_env()
    broker_url = "filesystem://" if settings.is_embedded_broker else settings.broker_url
    app = Celery("saga_worker", broker=broker_url, set_as_current=False, task_cls=GuardedTask)
    transport = guarded_transport(settings.broker_url)
    if transport is not None:
        # kombu's own Redis or AMQP transport, hardened against queue items that are not
        # kombu messages and against compressed ones.
        app.conf.broker_transport = transport
        if settings.broker_url.lower().startswith("rediss://"):
            # kombu turns TLS on for the `rediss` scheme, which a transport path hides; here
            # it verifies the server against the system CAs. broker_use_ssl in
            # SAGA_CELERY_CONFIG replaces this (CA file, client certificate).
            app.conf.broker_use_ssl = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    app.conf.update(
        broker_transport_options=broker_options(settings),
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        result_accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Drops task messages whose headers or body would crash Celery's handler.
        worker_consumer=CONSUMER_PATH,
        # Every saga message on the saga's own queue, never Celery's default `celery`: a
        # worker of another application that consumes `celery` drops unknown task names.
        # No task_queues: Celery declares the saga queue from task_default_queue, with the
        # type of task_default_queue_type ("quorum": docs/rabbitmq.md; SAGA_CELERY_CONFIG).
        task_default_queue=settings.queue,
        task_routes={"saga.*": {"queue": settings.queue}},
        # Task events cost a Redis round trip each in the worker's single-threaded main
        # process (about a third of its CPU per task). Off unless someone watches: Flower
        # turns them on in every worker it sees (its default --enable_events), and
        # `worker -E` turns them on from the start. `task-sent` events stay off: Flower's
        # task list is built from the worker's received/started/succeeded events.
        task_send_sent_event=False,
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
        enable_utc=True,
        timezone="UTC",
        beat_schedule=_beat_schedule(settings),
    )
    if settings.celery_config:
        apply_celery_config(app, settings.celery_config)
    # The version queues (worker/heartbeat.py) are declared like the base queue: on RabbitMQ
    # a quorum base queue means quorum version queues, on a topic exchange when the base
    # queue's is one (native delayed delivery needs it, docs/rabbitmq.md).
    app.conf.task_create_missing_queue_type = app.conf.task_default_queue_type
    app.conf.task_create_missing_queue_exchange_type = app.conf.task_default_exchange_type
    _redact_logs(settings)
    runtimes = RuntimeFactory(app, settings)
    # Metrics subscribe to engine hooks; Celery signals set up their endpoint (SAGA_METRICS_PORT).
    metrics_hook = install_metrics(app, settings)
    runtimes.hooks.append(metrics_hook)
    runtimes.rejection_hooks.append(metrics_hook.on_rejected)
    app.saga_runtimes = runtimes
    register_core_tasks(app, runtimes)

    gate = SweepGate(settings.recovery_interval_seconds / 2)

    @app.task(name="saga.recover", acks_late=True, shared=False)  # type: ignore[untyped-decorator]
    def saga_recover() -> dict[str, int]:
        if not gate.open():
            return {"examined": 0, "recovered": 0, "failed": 0, "coalesced": 1}
        rt = runtimes.get()
        result = sweep(rt.store, rt.engine, utcnow())
        return {
            "examined": result.examined,
            "recovered": result.recovered,
            "failed": result.failed,
            "parked": result.parked,
            "resumed": result.resumed,
        }

    def _check_signing_key(sender: Any = None, **_: Any) -> None:
        # In the main process, before any task: a worker or beat with a missing or wrong
        # key would sign messages every other process refuses. SystemExit passes through
        # Celery's signal dispatch (it catches Exception only) and ends the start-up.
        if getattr(sender, "app", None) is not app:
            return
        try:
            runtimes.check_signing_key()
        except ConfigurationError as exc:
            log.critical("%s", exc)
            raise SystemExit(EXIT_CONFIG) from None

    worker_init.connect(_check_signing_key, weak=False)
    beat_init.connect(_check_signing_key, weak=False)

    @app.task(name="saga.anchor", acks_late=True, shared=False)  # type: ignore[untyped-decorator]
    def saga_anchor() -> dict[str, Any]:
        """Append an anchor of every chain head (docs/audit.md, Anchors) and log it, so
        that a copy lives outside the database (the log pipeline, for one)."""
        from ..audit.anchor import latest_anchor_time, make_anchor

        # Anyone who can publish can send this task, and anchors can never be deleted: at
        # most one per half period, and none when the schedule is off (`audit anchor`, run
        # by an operator, is not limited).
        interval = settings.anchor_interval_seconds
        if interval is None:
            log.warning("saga.anchor refused: SAGA_ANCHOR_INTERVAL_SECONDS is off")
            return {"skipped": "anchors on a schedule are off"}
        engine = runtimes.get().store.engine
        now = utcnow()
        latest = latest_anchor_time(engine)
        if latest is not None and (now - latest).total_seconds() < interval / 2:
            log.info("saga.anchor skipped: the last anchor is from %s", latest.isoformat())
            return {"skipped": f"an anchor was made at {latest.isoformat()}"}
        anchor = make_anchor(engine, now)
        log.info(
            "audit anchor %d: %d sagas, %d rows, root %s, hash %s",
            anchor.id,
            anchor.sagas,
            anchor.rows,
            anchor.root,
            anchor.hash,
        )
        return {"id": anchor.id, "sagas": anchor.sagas, "rows": anchor.rows, "hash": anchor.hash}

    step_tasks: set[str] = set()
    registry.on_register(
        lambda definition: step_tasks.update(register_step_tasks(app, runtimes, definition))
    )
    if not settings.is_embedded_broker:  # its transport keeps no redelivered flag
        redactor = Redactor(settings.redact_keys)
        install_expiry_reports(app, step_tasks.__contains__, lambda: redactor)
    for module in settings.imports:
        importlib.import_module(module)
    install_versions(app, settings)
    install_timer_compaction(app)
    # After the imports: sized from the sagas they registered (why: worker/shutdown.py).
    size_soft_shutdown(app, registry.all_definitions(), settings.default_step_timeout_seconds)
    return app
