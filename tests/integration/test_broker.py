"""The hardened Redis transport against a real Redis: client reuse and plain round trips."""

from __future__ import annotations

import uuid
from typing import cast

from kombu.connection import Connection
from kombu.simple import SimpleQueue
from kombu.transport import redis as kombu_redis

from saga_worker.worker.broker import TRANSPORT_PATH


def test_sync_client_is_reused_per_pool_and_async_clients_are_not(broker_url: str) -> None:
    with Connection(broker_url, transport=TRANSPORT_PATH) as conn:
        channel = conn.default_channel
        first = channel._create_client()
        assert channel._create_client() is first
        with channel.conn_or_acquire() as client:
            assert client is first
            assert client.ping()
        # kombu builds a new pool after a reconnect: the client must follow it.
        channel._pool = None
        rebuilt = channel._create_client()
        assert rebuilt is not first
        assert rebuilt.connection_pool is channel.pool
        assert rebuilt.ping()
        # The poller stores a connection on async clients: each caller gets its own.
        assert channel._create_client(asynchronous=True) is not channel._create_client(
            asynchronous=True
        )


def test_messages_round_trip_and_are_acked_through_the_shared_client(broker_url: str) -> None:
    name = f"test-broker-{uuid.uuid4().hex[:8]}"
    with Connection(broker_url, transport=TRANSPORT_PATH) as conn:
        queue: SimpleQueue = conn.SimpleQueue(name)
        try:
            for i in range(20):
                queue.put({"i": i})
            got = []
            for _ in range(20):
                message = queue.get(timeout=5)
                got.append(message.payload["i"])
                message.ack()
            assert got == list(range(20))
            channel = cast(kombu_redis.Channel, queue.channel)
            with channel.conn_or_acquire() as client:
                # Every ack removed its message from the unacked bookkeeping.
                assert client.hlen(channel.unacked_key) == 0
                assert client.zcard(channel.unacked_index_key) == 0
        finally:
            queue.clear()
            queue.close()
