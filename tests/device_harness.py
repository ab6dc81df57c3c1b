"""The device protocol in memory: a real ``Gateway`` and ``DeviceFactory`` on a ``Clock``,
a ``StringTransport`` for the socket, and helpers to build and parse WebSocket frames.

No socket, no thread, no real time: what a device's bytes make the gateway write is fully
determined by those bytes and how they are cut into reads, so two gateways (lean path on and
off) can be fed the same reads and compared byte for byte.
"""

from __future__ import annotations

import base64
import os
import struct

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from elevgw.core.gateway import Gateway
from elevgw.events.model import NullSink
from elevgw.south.protocol import DeviceFactory
from elevgw.stores.interfaces import Device, IDeviceStore, hash_token

DEVICE_ID = "dev_0123456789abcdef"
TOKEN = "token-for-tests"
#: A text frame holding this makes the harness's gateway end the session.
CLOSE_ME = b"close-me"


@implementer(IDeviceStore)
class OneDeviceStore:
    """A store that knows one device and keeps its logs in a list."""

    def __init__(self) -> None:
        self.device = Device(DEVICE_ID, "lift 1", hash_token(TOKEN), created=0.0)
        self.logs: list = []

    def get_device(self, device_id):
        return succeed(self.device if device_id == DEVICE_ID else None)

    def append_log(self, device_id, entry):
        self.logs.append((device_id, entry))
        return succeed(None)

    def record_last_seen(self, seen):
        return succeed(None)

    def ping(self):
        return succeed(None)


class NoSnapshots:
    """Every snapshot is refused as not an image, which answers with an error frame."""

    def put(self, device_id, data, taken_at_ms):
        raise ValueError("not a PNG, JPEG or WebP image")


class DeviceTransport(StringTransport):
    """A ``StringTransport`` that, like a TCP transport, lets Autobahn unregister a producer
    it never registered (it does when it drops the connection)."""

    def unregisterProducer(self):
        self.producer = None


class Harness:
    """One gateway and one device connection on a ``StringTransport``."""

    def __init__(
        self, lean: bool, max_message_size: int = 8 * 1024 * 1024, slim: bool | None = None
    ) -> None:
        """``slim`` (slim connections) defaults to ``lean``: on together or off together."""
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = OneDeviceStore()
        self.gateway = Gateway(
            self.store, NoSnapshots(), NullSink(), clock=self.clock, heartbeat_timeout=30
        )
        self.factory = DeviceFactory(
            self.gateway,
            max_message_size,
            reactor=self.clock,
            lean_path=lean,
            slim_connections=lean if slim is None else slim,
        )
        # Autobahn's handshake timers run on the global reactor: off in unit tests.
        self.factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0)
        text_received = self.gateway.text_received

        def text_received_or_close(session, data):
            """Like the gateway, except that ``close-me`` anywhere in a frame makes it end
            the session (4000), as a rate limit or a takeover would, mid-read."""
            if CLOSE_ME in data:
                self.gateway.registry.end(session, "test", 4000)
            else:
                text_received(session, data)

        self.gateway.text_received = text_received_or_close  # type: ignore[method-assign]
        self.protocol = self.factory.buildProtocol(None)
        self.transport = DeviceTransport()
        self.protocol.makeConnection(self.transport)
        self.protocol.dataReceived(upgrade_request())
        head = self.transport.value()
        assert head.startswith(b"HTTP/1.1 101 "), head
        self.transport.clear()
        assert self.protocol._lean is lean

    def feed(self, data: bytes) -> bytes:
        """Hand ``data`` to the protocol as one read; what it wrote in answer."""
        self.protocol.dataReceived(data)
        written = self.transport.value()
        self.transport.clear()
        return written

    def observed(self) -> dict:
        """Everything a device or an operator could tell apart, besides the bytes written."""
        protocol = self.protocol
        return {
            "state": protocol.state,
            "disconnecting": self.transport.disconnecting,
            "frames_in": dict(self.gateway.metrics.frames_in),
            "frames_out": dict(self.gateway.metrics.frames_out),
            "logs": list(self.store.logs),
            "sessions": len(self.gateway.registry),
            "too_big": (
                protocol.wasMaxFramePayloadSizeExceeded,
                protocol.wasMaxMessagePayloadSizeExceeded,
            ),
        }


def upgrade_request(device_id: str = DEVICE_ID, token: str = TOKEN) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET /ws?device_id={device_id}&token={token} HTTP/1.1\r\n"
        "Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def client_frame(
    opcode: int,
    payload: bytes,
    fin: bool = True,
    rsv: int = 0,
    key: bytes | None = b"\x37\xfa\x21\x3d",
    long_length: bool = False,
) -> bytes:
    """A frame as a device sends it: masked with ``key`` (``None``: unmasked), with the
    shortest length encoding unless ``long_length`` asks for a (non-minimal) 16-bit one."""
    n = len(payload)
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if key is not None else 0
    if n < 126 and not long_length:
        header = bytes((first, mask_bit | n))
    elif n <= 0xFFFF:
        header = bytes((first, mask_bit | 126)) + struct.pack("!H", n)
    else:
        header = bytes((first, mask_bit | 127)) + struct.pack("!Q", n)
    if key is None:
        return header + payload
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return header + key + masked


def server_frames(data: bytes) -> list[tuple[int, bool, bytes]]:
    """``(opcode, fin, payload)`` of each unmasked frame in ``data`` (what the gateway wrote)."""
    frames = []
    pos = 0
    while pos < len(data):
        first, second = data[pos], data[pos + 1]
        assert not second & 0x80, "a server frame must not be masked"
        n = second & 0x7F
        pos += 2
        if n == 126:
            (n,) = struct.unpack("!H", data[pos : pos + 2])
            pos += 2
        elif n == 127:
            (n,) = struct.unpack("!Q", data[pos : pos + 8])
            pos += 8
        frames.append((first & 0x0F, bool(first & 0x80), data[pos : pos + n]))
        pos += n
    return frames


def close_code(payload: bytes) -> int | None:
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
