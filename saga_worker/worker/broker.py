"""A Redis transport that drops list items which are not kombu envelopes, and survives a
Redis restart with messages in flight.

kombu's Redis channel decodes every item it pops from a queue list; an item that is not
a JSON envelope raises inside the worker's event loop and stops the worker ("Unrecoverable
error"). Any service sharing the broker could push one. This transport logs and drops such
an item instead; well-formed messages take kombu's normal path.
"""

from __future__ import annotations

import binascii
import logging
from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

log = logging.getLogger(__name__)


# kombu's envelopes are a few levels deep (headers.stamps is the deepest Celery writes). A
# deeper one could still be decoded, then fail to be encoded again (RecursionError) when
# kombu's QoS stores it in the unacked hash, closer to the recursion limit.
MAX_ENVELOPE_DEPTH = 32


def _too_deep(value: Any, limit: int) -> bool:
    """Whether lists and objects nest deeper than `limit` (iteratively: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        if isinstance(node, list):
            if depth >= limit:
                return True
            stack.extend((child, depth + 1) for child in node)
    return False


def envelope_problem(message: Any) -> str | None:
    """Why a decoded queue item cannot become a kombu Message, or None."""
    if not isinstance(message, dict):
        return f"item is a JSON {type(message).__name__}, not an envelope object"
    if _too_deep(message, MAX_ENVELOPE_DEPTH):
        return f"envelope nests deeper than {MAX_ENVELOPE_DEPTH} levels"
    properties = message.get("properties")
    if not isinstance(properties, dict) or "delivery_tag" not in properties:
        return "envelope has no properties.delivery_tag"
    if not isinstance(message.get("body", ""), str):
        return "envelope body is not a string"
    headers = message.get("headers")
    if headers is not None and not isinstance(headers, dict):
        return "envelope headers is not an object"
    if headers and headers.get("compression"):
        # kombu would decompress it in the worker's main process (a 1 MB gzip body can hold
        # 1 GB); saga_worker never compresses its messages.
        return "compressed message refused: saga_worker sends none"
    tag = properties["delivery_tag"]
    if not isinstance(tag, str) or not tag:
        # kombu keys its unacked hash by the tag: a list or an object cannot be one.
        return "envelope properties.delivery_tag is not a string"
    delivery_info = properties.get("delivery_info")
    if not isinstance(delivery_info, dict) or not all(
        isinstance(delivery_info.get(key), str) for key in ("exchange", "routing_key")
    ):
        # kombu's QoS reads both to put the message back after a restart.
        return "envelope delivery_info has no exchange and routing_key strings"
    encoding = properties.get("body_encoding")
    if encoding not in (None, "base64"):
        return f"envelope body_encoding {str(encoding)[:40]!r} is not one kombu knows"
    if encoding == "base64":
        try:
            binascii.a2b_base64(message.get("body") or "")
        except (binascii.Error, ValueError):
            return "envelope body is not valid base64"
    return None


class DetachableQoS(kombu_redis.QoS):
    """Redis ack emulation that survives a connection torn down under it.

    After a lost Redis connection Celery detaches the transport before it closes the old
    channel; kombu's QoS then fails to put unacked messages back (and later to ack the
    running task) with AttributeError, and the worker exits. Those messages either stay in
    Redis' unacked set (delivered again after the visibility timeout, then skipped as not
    pending) or were lost with Redis (the recovery sweep re-sends them).
    """

    def _detached(self) -> bool:
        return getattr(self.channel.connection, "client", None) is None

    def restore_unacked(self, client: Any = None) -> Any:
        if client is None and self._detached():
            log.warning(
                "broker connection lost: %d unacknowledged message(s) left to Redis' "
                "visibility timeout and the saga recovery",
                len(self._delivered),
            )
            self._delivered.clear()
            return None
        return super().restore_unacked(client)

    def ack(self, delivery_tag: Any) -> None:
        if self._detached():
            log.warning("ack of %s dropped: its broker connection was lost", delivery_tag)
            virtual.QoS.ack(self, delivery_tag)
            return
        super().ack(delivery_tag)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        if self._detached():
            log.warning("reject of %s dropped: its broker connection was lost", delivery_tag)
            virtual.QoS.ack(self, delivery_tag)
            return
        super().reject(delivery_tag, requeue)


class GuardedChannel(kombu_redis.Channel):
    """kombu's Redis channel (redis://, rediss://), guarded.

    It survives queue items that are not JSON at all, and a connection lost under it.

    It also reuses one synchronous redis-py client per connection pool. kombu builds a new
    `redis.Redis` for every publish, ack and event; with redis-py 8 each construction copies
    ~170 response callbacks (about 50 us), several times per task in the worker's main
    process. The client holds no connection of its own (each command checks one out of the
    pool), so sharing it changes nothing else. Asynchronous clients keep kombu's handling:
    the poller stores a connection on them.
    """

    QoS = DetachableQoS

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        pool = self.pool
        cached: tuple[Any, Any] | None = self.__dict__.get("_saga_sync_client")
        if cached is None or cached[0] is not pool:
            cached = (pool, super()._create_client(asynchronous=False))
            self.__dict__["_saga_sync_client"] = cached
        return cached[1]

    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)
        except self._passthrough():
            raise
        # The item is off the list. Decoding it raised: not JSON (ValueError), nesting too
        # deep (RecursionError), or one of kombu's typed objects ({"__type__": "uuid",
        # "__value__": ...}) whose value its decoder cannot take (TypeError, AttributeError,
        # anything). The transport's _deliver drops what decodes but cannot be delivered.
        except Exception as exc:
            log.error("dropped a queue item that is not a kombu message: %s", _brief(exc))
            return True

    def _get(self, queue: Any, timeout: Any = None) -> Any:
        # basic_get builds a Message and appends it to the QoS straight from this result,
        # without the transport's _deliver: the envelope is checked here too.
        try:
            message = super()._get(queue)
        except self._passthrough():
            raise
        except Exception as exc:
            log.error(
                "dropped a queue item of %s that is not a kombu message: %s", queue, _brief(exc)
            )
            raise Empty() from None
        problem = envelope_problem(message)
        if problem is not None:
            log.error("dropped a queue item of %s: %s", queue, problem)
            raise Empty()
        return message

    def _passthrough(self) -> tuple[type[BaseException], ...]:
        """Errors of the connection or of Redis itself (Empty included), left to kombu and
        Celery, which reconnect: not a problem of one item."""
        transport = self.connection
        return (Empty, *transport.connection_errors, *transport.channel_errors)


# Python's method order puts GuardedChannel's overrides before SentinelChannel's pool logic.
class GuardedSentinelChannel(GuardedChannel, kombu_redis.SentinelChannel):
    """kombu's Redis Sentinel channel (sentinel://), guarded."""


class GuardedRedisTransport(kombu_redis.Transport):
    """kombu's Redis transport with envelope checks (select with broker_transport)."""

    Channel = GuardedChannel

    def _deliver(self, message: Any, queue: str) -> None:
        problem = envelope_problem(message)
        if problem is not None:
            log.error("dropped a queue item of %s: %s", queue, problem)
            return
        super()._deliver(message, queue)


class GuardedSentinelTransport(GuardedRedisTransport, kombu_redis.SentinelTransport):
    """kombu's Redis Sentinel transport with envelope checks."""

    Channel = GuardedSentinelChannel


def _brief(exc: BaseException) -> str:
    """An exception as one short line: items can be megabytes, and so can their errors."""
    return f"{type(exc).__name__}: {exc}"[:300]


TRANSPORT_PATH = f"{__name__}:GuardedRedisTransport"
SENTINEL_TRANSPORT_PATH = f"{__name__}:GuardedSentinelTransport"


def guarded_transport(broker_url: str) -> str | None:
    """The guarded transport for a Redis (plain, TLS, Sentinel) or AMQP URL, else None.

    Selecting a transport class by path hides the URL's scheme from kombu, which reads
    `rediss` as "TLS on": the app then turns TLS on itself (worker/app.py).
    """
    from .amqp_broker import AMQP_TRANSPORT_PATH, AMQPS_TRANSPORT_PATH

    scheme = broker_url.partition("://")[0].lower()
    return {
        "redis": TRANSPORT_PATH,
        "rediss": TRANSPORT_PATH,
        "sentinel": SENTINEL_TRANSPORT_PATH,
        "amqp": AMQP_TRANSPORT_PATH,
        "pyamqp": AMQP_TRANSPORT_PATH,
        "amqps": AMQPS_TRANSPORT_PATH,
    }.get(scheme)
