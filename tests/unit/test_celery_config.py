"""SAGA_CELERY_CONFIG: a module of extra Celery settings, applied over the app's defaults."""

from __future__ import annotations

import ssl
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from saga_worker.config import Settings
from saga_worker.errors import ConfigurationError
from saga_worker.worker.app import create_app


@pytest.fixture()
def config_module(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    name = f"celeryconf_{uuid.uuid4().hex[:8]}"
    sys.path.insert(0, str(tmp_path))
    try:
        yield tmp_path / f"{name}.py", name
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)


def _settings(tmp_path: Path, module: str | None) -> Settings:
    env = {"SAGA_HOME": str(tmp_path), "SAGA_BROKER_URL": "redis://127.0.0.1:1/0"}
    if module:
        env["SAGA_CELERY_CONFIG"] = module
    return Settings.from_env(env)


def test_settings_apply_and_transport_options_merge(
    config_module: tuple[Path, str], tmp_path: Path
) -> None:
    path, name = config_module
    path.write_text(
        "import ssl\n"
        "broker_use_ssl = {'ssl_cert_reqs': ssl.CERT_REQUIRED}\n"
        "broker_transport_options = {'master_name': 'mymaster', 'visibility_timeout': 7200}\n"
        "worker_prefetch_multiplier = 4\n"
        "not_a_celery_setting = 1\n"
    )
    app = create_app(_settings(tmp_path, name))
    assert app.conf.broker_use_ssl == {"ssl_cert_reqs": 2}
    assert app.conf.worker_prefetch_multiplier == 4
    options = app.conf.broker_transport_options
    assert options == {"master_name": "mymaster", "visibility_timeout": 7200}
    # The saga's own guarantees stay.
    assert app.conf.accept_content == ["json"]
    assert app.conf.task_default_queue == "saga"


def test_without_it_the_defaults_hold(tmp_path: Path) -> None:
    app = create_app(_settings(tmp_path, None))
    assert app.conf.broker_transport_options == {"visibility_timeout": 3600}
    assert app.conf.task_routes == {"saga.*": {"queue": "saga"}}


@pytest.mark.parametrize(
    "line",
    ["accept_content = ['json', 'pickle']", "task_acks_late = False", "task_default_queue = 'x'"],
)
def test_it_may_not_change_what_the_engine_relies_on(
    config_module: tuple[Path, str], tmp_path: Path, line: str
) -> None:
    path, name = config_module
    path.write_text(line + "\n")
    with pytest.raises(ConfigurationError, match=line.split(" ")[0]):
        create_app(_settings(tmp_path, name))


def test_a_module_that_cannot_be_imported_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="SAGA_CELERY_CONFIG='no_such_module_x'"):
        create_app(_settings(tmp_path, "no_such_module_x"))


def test_the_signing_key_can_come_from_a_file(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("k" * 64 + "\n")
    settings = Settings.from_env({"SAGA_SIGNING_KEY_FILE": str(key_file)})
    assert settings.signing_key == "k" * 64
    with pytest.raises(ConfigurationError, match="not both"):
        Settings.from_env({"SAGA_SIGNING_KEY_FILE": str(key_file), "SAGA_SIGNING_KEY": "x"})
    with pytest.raises(ConfigurationError, match="cannot be read"):
        Settings.from_env({"SAGA_SIGNING_KEY_FILE": str(tmp_path / "missing")})
    key_file.write_text("\n")
    with pytest.raises(ConfigurationError, match="is empty"):
        Settings.from_env({"SAGA_SIGNING_KEY_FILE": str(key_file)})


@pytest.mark.parametrize(
    "line",
    [
        "task_annotations = {'*': {'acks_late': False}}",
        "broker_transport = 'redis'",
        "broker_url = 'redis://elsewhere/0'",
        "result_backend = 'redis://elsewhere/1'",
        "task_ignore_result = False",
        "task_acks_on_failure_or_timeout = False",
        "task_protocol = 1",
        "worker_consumer = 'celery.worker.consumer:Consumer'",
        "task_default_delivery_mode = 'transient'",
        "task_always_eager = True",
        "broker_transport_options = {'confirm_publish': False}",
    ],
)
def test_it_may_not_bypass_the_pins_another_way(
    config_module: tuple[Path, str], tmp_path: Path, line: str
) -> None:
    path, name = config_module
    path.write_text(line + "\n")
    with pytest.raises(ConfigurationError, match=line.split(" ")[0]):
        create_app(_settings(tmp_path, name))


def test_old_style_setting_names_are_refused_with_the_new_name(
    config_module: tuple[Path, str], tmp_path: Path
) -> None:
    path, name = config_module
    path.write_text("CELERY_ACKS_LATE = False\nCA_FILE = '/etc/ssl/ca.pem'\n")
    with pytest.raises(ConfigurationError, match=r"CELERY_ACKS_LATE -> task_acks_late"):
        create_app(_settings(tmp_path, name))


def test_its_beat_schedule_is_added_to_the_recovery_sweep(
    config_module: tuple[Path, str], tmp_path: Path
) -> None:
    path, name = config_module
    path.write_text("beat_schedule = {'report': {'task': 'x.report', 'schedule': 60}}\n")
    app = create_app(_settings(tmp_path, name))
    assert set(app.conf.beat_schedule) == {"saga-recover", "saga-anchor", "report"}
    path.write_text("beat_schedule = {'saga-recover': {'task': 'x', 'schedule': 60}}\n")
    sys.modules.pop(name, None)
    with pytest.raises(ConfigurationError, match="saga-recover"):
        create_app(_settings(tmp_path, name))


@pytest.mark.parametrize(
    ("url", "transport"),
    [
        ("redis://h:6379/0", "GuardedRedisTransport"),
        ("rediss://h:6380/0", "GuardedRedisTransport"),
        ("sentinel://h:26379", "GuardedSentinelTransport"),
    ],
)
def test_every_redis_flavour_gets_the_guarded_transport(
    tmp_path: Path, url: str, transport: str
) -> None:
    app = create_app(Settings.from_env({"SAGA_HOME": str(tmp_path), "SAGA_BROKER_URL": url}))
    assert app.conf.broker_transport == f"saga_worker.worker.broker:{transport}"
    tls = app.conf.broker_use_ssl
    # TLS for rediss:// verifies the server unless SAGA_CELERY_CONFIG says how.
    assert (tls == {"ssl_cert_reqs": ssl.CERT_REQUIRED}) is url.startswith("rediss")


def test_broker_use_ssl_of_the_config_module_wins_for_rediss(
    config_module: tuple[Path, str], tmp_path: Path
) -> None:
    path, name = config_module
    path.write_text("broker_use_ssl = {'ssl_cert_reqs': 2, 'ssl_ca_certs': '/ca.pem'}\n")
    env = {"SAGA_HOME": str(tmp_path), "SAGA_BROKER_URL": "rediss://h:6380/0"}
    app = create_app(Settings.from_env({**env, "SAGA_CELERY_CONFIG": name}))
    assert app.conf.broker_use_ssl == {"ssl_cert_reqs": 2, "ssl_ca_certs": "/ca.pem"}


def test_the_beat_appends_an_audit_anchor_every_hour_unless_turned_off(tmp_path: Path) -> None:
    schedule = create_app(_settings(tmp_path, None)).conf.beat_schedule
    assert schedule["saga-anchor"]["task"] == "saga.anchor"
    assert schedule["saga-anchor"]["schedule"] == 3600.0
    for off in ("0", "off"):
        settings = Settings.from_env(
            {"SAGA_HOME": str(tmp_path), "SAGA_ANCHOR_INTERVAL_SECONDS": off}
        )
        assert "saga-anchor" not in create_app(settings).conf.beat_schedule
    every_minute = Settings.from_env(
        {"SAGA_HOME": str(tmp_path), "SAGA_ANCHOR_INTERVAL_SECONDS": "60"}
    )
    assert create_app(every_minute).conf.beat_schedule["saga-anchor"]["schedule"] == 60.0
