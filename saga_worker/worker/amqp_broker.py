"""kombu's py-amqp transport, refusing compressed messages before they are decompressed.

kombu decompresses a message whose `compression` header is set while it builds the Message,
in the worker's main process and before any check of ours: a 1 MB gzip body can expand to
1 GB there. saga_worker never compresses its messages, so such a message is turned into an
undecodable one, which Celery logs and acks without reading its body. The Redis transport
does the same in worker/broker.py.
"""

from __future__ import annotations

import sys
from typing import Any

from kombu.exceptions import ContentDisallowed
from kombu.transport import pyamqp


class CompressedMessageRefused(ContentDisallowed):
    """A message with a `compression` header: saga_worker sends none."""


class GuardedAmqpMessage(pyamqp.Message):
    def __init__(self, msg: Any, channel: Any = None, **kwargs: Any) -> None:
        headers = msg.properties.get("application_headers")
        if isinstance(headers, dict) and headers.get("compression"):
            compression = str(headers["compression"])[:100]
            # The body is never looked at: the one decompression kombu would do is skipped.
            msg.properties = {
                **msg.properties,
                "application_headers": {k: v for k, v in headers.items() if k != "compression"},
            }
            msg.body = b""
            super().__init__(msg, channel=channel, **kwargs)
            try:
                raise CompressedMessageRefused(
                    f"compressed message ({compression}) refused: saga_worker sends none"
                )
            except CompressedMessageRefused:
                self.errors.append(sys.exc_info())
            return
        super().__init__(msg, channel=channel, **kwargs)


class GuardedAmqpChannel(pyamqp.Channel):
    Message = GuardedAmqpMessage


class GuardedAmqpConnection(pyamqp.Connection):
    Channel = GuardedAmqpChannel


class GuardedAmqpTransport(pyamqp.Transport):
    """kombu's py-amqp transport (amqp://), guarded."""

    Connection = GuardedAmqpConnection


class GuardedAmqpSSLTransport(pyamqp.SSLTransport):
    """kombu's py-amqp TLS transport (amqps://), guarded."""

    Connection = GuardedAmqpConnection


AMQP_TRANSPORT_PATH = f"{__name__}:GuardedAmqpTransport"
AMQPS_TRANSPORT_PATH = f"{__name__}:GuardedAmqpSSLTransport"
