"""Canaries for the private APIs saga_worker relies on: each fails on a release that breaks it.

pyproject.toml bounds celery, kombu and prometheus-client below the next minor release; before
raising a bound, run these (and the integration tests named in each docstring) on the new one.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, Task
from celery.app.defaults import _TO_NEW_KEY as OLD_SETTING_NAMES
from celery.app.defaults import DEFAULTS
from celery.worker.consumer import Consumer
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from prometheus_client import mmap_dict, multiprocess, values

from saga_worker.worker.app import PINNED_SETTINGS
from saga_worker.worker.broker import (
    DetachableQoS,
    GuardedChannel,
    GuardedRedisTransport,
    GuardedSentinelChannel,
    GuardedSentinelTransport,
)


def _params(function: Any) -> list[str]:
    return list(inspect.signature(function).parameters)


# -- kombu's Redis transport (saga_worker/worker/broker.py) ---------------------------------
# Behaviour: tests/integration/test_broker.py (client reuse, acks), test_hostile_input.py
# (items that are not kombu messages), test_chaos.py (Redis restart with messages in flight).


def test_kombu_redis_channel_hooks_keep_their_signatures() -> None:
    channel = kombu_redis.Channel
    assert _params(channel._create_client) == ["self", "asynchronous"]
    assert _params(channel._brpop_read) == ["self", "options"]
    assert _params(channel._get)[:2] == ["self", "queue"]
    assert isinstance(inspect.getattr_static(channel, "pool"), property)
    assert callable(channel.conn_or_acquire)
    assert GuardedChannel.QoS is DetachableQoS
    assert issubclass(kombu_redis.Channel.QoS, virtual.QoS)


def test_kombu_redis_qos_hooks_keep_their_signatures() -> None:
    qos = kombu_redis.QoS
    assert _params(qos.restore_unacked) == ["self", "client"]
    assert _params(qos.ack) == ["self", "delivery_tag"]
    assert _params(qos.reject) == ["self", "delivery_tag", "requeue"]
    assert _params(virtual.QoS.ack) == ["self", "delivery_tag"]
    # DetachableQoS clears the messages it cannot put back through this attribute.
    assert "_delivered" in inspect.getsource(virtual.QoS.__init__)


def test_kombu_transport_delivers_through_deliver() -> None:
    assert _params(virtual.Transport._deliver) == ["self", "message", "queue"]
    assert GuardedRedisTransport.Channel is GuardedChannel
    # _deliver is what the channel's brpop path calls with each decoded item.
    assert "_deliver" in inspect.getsource(kombu_redis.Channel._brpop_read)


# -- Celery (saga_worker/worker/guard.py, worker/app.py) -------------------------------------
# Behaviour: tests/integration/test_hostile_input.py (malformed bodies are dropped).


def test_celery_task_strategy_hook_keeps_its_signature() -> None:
    assert _params(Task.start_strategy) == ["self", "app", "consumer", "kwargs"]


def test_celery_consumer_task_handler_hook_keeps_its_shape() -> None:
    # saga_worker/worker/consumer.py wraps the handler it returns and lets the connection and
    # channel errors it keeps in these attributes through. Behaviour: test_rabbitmq.py.
    assert _params(Consumer.create_task_handler) == ["self", "promise"]
    source = inspect.getsource(Consumer.__init__)
    assert "self.connection_errors =" in source and "self.channel_errors =" in source
    assert DEFAULTS["worker_consumer"] == "celery.worker.consumer:Consumer"
    # Native delayed delivery counts whole seconds (dispatch.py rounds countdowns up).
    assert "int(countdown)" in inspect.getsource(Celery.send_task)


def test_celery_settings_table_knows_every_setting_we_pin() -> None:
    # apply_celery_config tells settings from other module attributes by this table.
    assert set(PINNED_SETTINGS) <= set(DEFAULTS)
    assert "broker_transport_options" in DEFAULTS


# -- prometheus_client multiprocess internals (saga_worker/metrics/multiprocess.py) ----------
# Behaviour: tests/integration/test_metrics.py (prefork-exact counters, compaction).


def test_prometheus_mmap_files_round_trip(tmp_path: Path) -> None:
    path = str(tmp_path / "counter_1.db")
    written = mmap_dict.MmapedDict(path)  # type: ignore[no-untyped-call]
    written.write_value("key-a", 3.0, 0.0)  # type: ignore[no-untyped-call]
    assert written.read_value("key-a") == (3.0, 0.0)  # type: ignore[no-untyped-call]
    written.close()  # type: ignore[no-untyped-call]
    entries = list(mmap_dict.MmapedDict.read_all_values_from_file(path))  # type: ignore[no-untyped-call]
    assert [(key, value) for key, value, _timestamp, _pos in entries] == [("key-a", 3.0)]


def test_prometheus_value_class_takes_a_process_identifier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(values, "ValueClass", values.ValueClass)
    value_class = values.MultiProcessValue(lambda: "canary")  # type: ignore[no-untyped-call]
    value = value_class("counter", "m", "m_total", (), (), "help")
    value.inc(2)
    assert os.path.exists(tmp_path / "counter_canary.db")
    merged = multiprocess.MultiProcessCollector.merge(  # type: ignore[no-untyped-call]
        [str(tmp_path / "counter_canary.db")], accumulate=True
    )
    samples = [s for metric in merged for s in metric.samples]
    assert [s.value for s in samples] == [2.0]
    values.close_all_multiprocess_files()  # type: ignore[no-untyped-call]


def test_celery_old_setting_names_table_maps_old_to_new() -> None:
    # SAGA_CELERY_CONFIG refuses old-style names by this table, naming the new one.
    assert OLD_SETTING_NAMES["CELERY_ACKS_LATE"] == "task_acks_late"
    assert OLD_SETTING_NAMES["BROKER_URL"] == "broker_url"


def test_kombu_sentinel_channel_and_transport_still_extend_the_redis_ones() -> None:
    # GuardedSentinelChannel/Transport put the guarded Redis classes first in the MRO.
    assert issubclass(kombu_redis.SentinelChannel, kombu_redis.Channel)
    assert issubclass(kombu_redis.SentinelTransport, kombu_redis.Transport)
    assert GuardedSentinelTransport.default_port == kombu_redis.SentinelTransport.default_port
    assert GuardedSentinelChannel.__mro__[1:3] == (GuardedChannel, kombu_redis.SentinelChannel)


# -- kombu's py-amqp transport (saga_worker/worker/amqp_broker.py) ----------------------------
# Behaviour: tests/integration/test_rabbitmq.py (the gzip bomb case).


def test_kombu_pyamqp_builds_messages_through_the_channel_message_class() -> None:
    from kombu.transport import pyamqp

    assert _params(pyamqp.Message.__init__)[:3] == ["self", "msg", "channel"]
    assert "self.Message(" in inspect.getsource(pyamqp.Channel.message_to_python)
    assert pyamqp.Transport.Connection is pyamqp.Connection
    assert pyamqp.Connection.Channel is pyamqp.Channel
    assert issubclass(pyamqp.SSLTransport, pyamqp.Transport)
    # kombu decompresses in Message.__init__: the reason the guard sits there.
    from kombu.message import Message

    assert "decompress(" in inspect.getsource(Message.__init__)
