"""Slim connections: what a device connection keeps once its WebSocket is open.

An Autobahn protocol instance holds about 90 attributes (a 3.3 KB ``__dict__``): every protocol
option copied from the factory, the handshake's request, headers, parsed URL and response,
an empty send queue (a ``deque`` allocates 760 bytes up front), traffic counters, and close
bookkeeping that is all ``False`` and ``None`` until the connection closes. On a gateway
holding 15,000 mostly idle devices that is most of the memory per device. Here:

- the protocol options live once, on the factory's protocol class (``class_options``):
  Autobahn copies an option to the instance only when the instance does not already see
  it, so its connections never hold their own copies;
- once open (``after_open``), the handshake leftovers are dropped, attributes whose value
  equals the class default (``OPEN_DEFAULTS``) are dropped so the class answers for them,
  the send queue becomes an empty list until something is queued, the traffic counters are
  one set shared by all connections (nothing reads them), and the ``__dict__`` is rebuilt at its new size
  (a dict never shrinks by deleting keys).

Attribute reads give the same values as before; an attribute Autobahn sets later (a close
code, a timer) goes back into the instance as usual. ``tests/test_slim.py`` fails if a
name relied on here disappears from Autobahn.
"""

from __future__ import annotations

import types
from typing import Any

from autobahn.websocket.protocol import TrafficStats, WebSocketProtocol

#: What the opening handshake leaves behind and nothing reads once the connection is open.
HANDSHAKE_LEFTOVERS = (
    "http_headers",
    "http_request_data",
    "http_response_data",
    "http_request_uri",
    "http_request_path",
    "http_request_params",
    "http_request_host",
    "http_status_line",
    "websocket_origin",
    "websocket_protocols",
    "websocket_extensions",
    "_wskey",
    "is_open",
)


class SendQueue(list):
    """Autobahn's send queue (``append``, ``popleft``, ``len``) as a list, which allocates
    nothing until something is queued; only chopped or synchronous sends queue, and the
    gateway makes neither."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


#: One set of Autobahn's traffic counters for every slim connection: Autobahn still adds to
#: them (in C, as on its own counters), nobody reads them, and each connection saves its own.
SHARED_TRAFFIC = TrafficStats()


#: Values an open connection has until something happens to it; the protocol class holds
#: them, so an instance only stores what differs.
OPEN_DEFAULTS: dict[str, Any] = {
    **dict.fromkeys(HANDSHAKE_LEFTOVERS),
    "state": WebSocketProtocol.STATE_OPEN,
    "send_state": WebSocketProtocol.SEND_STATE_GROUND,
    "data": b"",
    "triggered": False,
    "inside_message": False,
    "current_frame": None,
    "trackedTimings": None,
    "_perMessageCompress": None,
    "websocket_protocol_in_use": None,
    "wasMaxFramePayloadSizeExceeded": False,
    "wasMaxMessagePayloadSizeExceeded": False,
    "closedByMe": False,
    "failedByMe": False,
    "droppedByMe": False,
    "wasClean": False,
    "wasNotCleanReason": None,
    "wasServerConnectionDropTimeout": False,
    "wasOpenHandshakeTimeout": False,
    "wasCloseHandshakeTimeout": False,
    "wasServingFlashSocketPolicyFile": False,
    "localCloseCode": None,
    "localCloseReason": None,
    "remoteCloseCode": None,
    "remoteCloseReason": None,
    "openHandshakeTimeoutCall": None,
    "closeHandshakeTimeoutCall": None,
    "autoPingTimeoutCall": None,
    "autoPingPending": None,
    "autoPingPendingCall": None,
    "autoPingPendingSeq": 0,
    "autoPingPendingSent": None,
    "_handshake_timer": None,
    "_handshake_bytes": 0,
    "_handshake_lines": 0,
    "websocket_version": 13,
    "websocket_extensions_in_use": (),
    "_valid_events": ("message",),
    "_results": None,
    "utf8validator": None,
    "trafficStats": SHARED_TRAFFIC,
}

_IMMUTABLE = (type(None), bool, int, float, str, bytes)

#: Instance values that the class default (above) stands in for, under a condition.
_DROPPED_WHEN = {
    # no extension was negotiated
    "websocket_extensions_in_use": lambda protocol, value: value == [],
    # the event registry of Autobahn's ObservableMixin, while nobody listens (``restore_events``)
    "_valid_events": lambda protocol, value: protocol._listeners is None,
    "_results": lambda protocol, value: protocol._listeners is None,
    # incoming UTF-8 is not validated (the gateway answers bad UTF-8 itself)
    "utf8validator": lambda protocol, value: not protocol.utf8validateIncoming,
    # nothing reads Autobahn's traffic counters unless it tracks timings
    "trafficStats": lambda protocol, value: not protocol.trackedTimings,
    # the handshake's size, counted while it came in
    "_handshake_bytes": lambda protocol, value: True,
    "_handshake_lines": lambda protocol, value: True,
}


def class_options(factory: Any) -> dict[str, Any]:
    """The factory's protocol options as class attributes of its protocol class."""
    options = {}
    for name in factory.protocol.CONFIG_ATTRS:
        value = getattr(factory, name)
        if isinstance(value, (types.FunctionType, types.BuiltinFunctionType)):
            value = staticmethod(value)  # an option that is a callable stays unbound
        options[name] = value
    return options


def after_open(protocol: Any) -> None:
    """Drop what an open ``protocol`` no longer needs (see the module docstring)."""
    cls = type(protocol)
    kept = {}
    for name, value in vars(protocol).items():
        if name in OPEN_DEFAULTS:
            if name in HANDSHAKE_LEFTOVERS:
                continue
            default = OPEN_DEFAULTS[name]
            if value is default or (
                isinstance(value, _IMMUTABLE) and type(value) is type(default) and value == default
            ):
                continue
            if name in _DROPPED_WHEN and _DROPPED_WHEN[name](protocol, value):
                continue
        elif name in cls.CONFIG_ATTRS and getattr(cls, name, _MISSING) is value:
            continue
        kept[name] = value
    queue = kept.get("send_queue")
    if queue is not None and not queue:
        kept["send_queue"] = SendQueue()
    protocol.__dict__ = kept


_MISSING = object()


def restore_events(protocol: Any) -> None:
    """Give ``protocol`` back its own event registry before someone listens to it."""
    if "_results" not in vars(protocol):
        protocol.set_valid_events(["message"])
