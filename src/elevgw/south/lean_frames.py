"""The lean frame path: complete, masked text frames go straight to the gateway once open.

Autobahn handles every incoming frame in general-purpose Python: a ``FrameHeader``, an
XOR-masker object, the begin/data/end hooks of its streaming API, its traffic counters and a
Deferred for its ``message`` observers, for a 40-byte heartbeat. Against a Go gateway that
made elevgw three times slower at the tail. After the opening handshake this module reads
the one frame shape devices send all day, a complete (FIN), unfragmented, masked text frame
with no RSV bits and at most ``MAX_LEAN_PAYLOAD`` bytes, and hands its payload to
``DeviceProtocol.onMessage``, the same method Autobahn calls, so every check behind it (the
gateway's ``text_received``) runs for both paths.

Everything else goes to Autobahn from that frame on, unchanged: fragments (and so control
frames between fragments), pings, pongs, close frames, binary frames, frames over the size
limits (1009), unmasked or RSV-flagged frames (1002), and every frame once the connection is
closing. A read that holds several frames is walked frame by frame; a frame cut by the end
of a read waits, unparsed, in Autobahn's own buffer (``protocol.data``), so whichever path
reads next sees the same bytes. Autobahn is only ever handed bytes at a frame boundary and
only while it is between messages, which is the state it was in before the lean path took
those frames.

Frames to the device leave behind a header built here (two bytes for up to 125 bytes of
payload) instead of through ``sendMessage``'s frame builder; the bytes on the wire are
the same. Close frames and anything sent while the connection is not open still go
through Autobahn.

What the lean path does not keep: Autobahn's ``trafficStats`` counters and its per-frame
debug logging (neither is used by the gateway), and its ``message`` observer event. The
lean path switches itself off for a connection that uses any of them (``eligible``).
"""

from __future__ import annotations

from typing import Any

from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.xormasker import create_xor_masker

#: The largest payload read on the lean path: frames with a 16-bit length, which covers
#: heartbeats, logs and command acks. Larger frames (snapshots) go to Autobahn.
MAX_LEAN_PAYLOAD = 0xFFFF

#: Below this many bytes one big-integer XOR unmasks faster than Autobahn's masker object
#: (which wins on large payloads).
_INT_UNMASK_BELOW = 2048

_OPEN = WebSocketProtocol.STATE_OPEN
_TEXT_FIN = 0x81
_SHORT_HEADERS = tuple(bytes((_TEXT_FIN, n)) for n in range(126))


def unmask(key: bytes, payload: bytes) -> bytes:
    """``payload`` XOR the 4-byte masking ``key`` repeated (RFC 6455 section 5.3)."""
    n = len(payload)
    if n >= _INT_UNMASK_BELOW:
        return create_xor_masker(key, n).process(payload)
    if not n:
        return b""
    keys = (key * ((n >> 2) + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(keys, "little")).to_bytes(
        n, "little"
    )


def text_frame(payload: bytes) -> bytes:
    """An unmasked, unfragmented text frame (what a server sends) carrying ``payload``."""
    n = len(payload)
    if n < 126:
        return _SHORT_HEADERS[n] + payload
    if n <= 0xFFFF:
        return b"\x81\x7e" + n.to_bytes(2, "big") + payload
    return b"\x81\x7f" + n.to_bytes(8, "big") + payload


def lean_limit(protocol: Any) -> int:
    """The largest payload the lean path reads for ``protocol``: anything larger may be over
    Autobahn's frame or message limit and must get its 1009 there."""
    limit = MAX_LEAN_PAYLOAD
    for bound in (protocol.maxFramePayloadSize, protocol.maxMessagePayloadSize):
        if bound > 0:
            limit = min(limit, bound)
    return limit


def eligible(protocol: Any) -> bool:
    """Whether an open ``protocol`` can use the lean path: no Autobahn feature that the
    lean path skips is in use on it."""
    return bool(
        protocol.applyMask
        and protocol._perMessageCompress is None
        and not protocol.logOctets
        and not protocol.logFrames
        and not protocol.trackedTimings
        and not protocol.autoPingInterval
        and not (protocol._listeners and protocol._listeners.get("message"))
    )


def receive(protocol: Any, data: bytes) -> None:
    """Handle one read of ``data`` for an open ``protocol`` between messages.

    The caller checks ``protocol.state == STATE_OPEN``, ``protocol.current_frame is None``
    and ``not protocol.inside_message``: Autobahn is between frames, and whatever it holds
    in ``protocol.data`` is the unparsed start of the next one.
    """
    buffered = protocol.data
    if buffered:
        data = buffered + data
        protocol.data = b""
    end = len(data)
    pos = 0
    limit = protocol.lean_limit
    on_message = protocol.onMessage
    while end - pos >= 2:
        second = data[pos + 1]
        length = second & 0x7F
        if data[pos] != _TEXT_FIN or second < 0x80:
            break  # not a complete masked text frame without RSV bits
        if length < 126:
            start = pos + 6
        elif length == 126:
            if end - pos < 4:
                protocol.data = data[pos:]
                return
            length = (data[pos + 2] << 8) | data[pos + 3]
            if length < 126:
                break  # not the minimal length encoding: a protocol error for Autobahn
            start = pos + 8
        else:
            break
        if length > limit:
            break
        frame_end = start + length
        if frame_end > end:
            protocol.data = data[pos:]
            return
        payload = unmask(data[start - 4 : start], data[start:frame_end])
        pos = frame_end
        on_message(payload, False)
        if protocol.state != _OPEN:
            break
    else:
        if pos < end:
            protocol.data = data[pos:]
        return
    protocol._dataReceived(data[pos:] if pos else data)


def send_text(protocol: Any, payload: bytes) -> bool:
    """Write ``payload`` as a text frame if the lean path can; ``False`` if Autobahn must
    (the connection is not open, or Autobahn has queued or half-sent frames whose order
    must be kept, or the payload is over Autobahn's message limit)."""
    if (
        protocol.state != _OPEN
        or protocol.send_queue
        or protocol.send_state != WebSocketProtocol.SEND_STATE_GROUND
        or 0 < protocol.maxMessagePayloadSize < len(payload)
    ):
        return False
    protocol.transport.write(text_frame(payload))
    return True
