"""The southbound WebSocket: Autobahn's protocol, translated into ``Gateway`` calls.

Handshake credentials come from the query (``?device_id=…&token=…``) or, for the token, an
``Authorization: Bearer`` header. Refusals are plain HTTP answers (401, 503) before any
socket exists, so a device in a reconnect loop costs one store lookup and no more.

What one connection may cost is bounded here, where the bytes are: the handshake's size and
time (on the factory's reactor), and the bytes queued for a device that does not read
(``check_outbound``). The message rate and pending store work are the gateway's
(``Gateway.frame_allowed``), asked before any frame is handled.
"""

from __future__ import annotations

from typing import Any

import autobahn.twisted.websocket as autobahn_twisted
import autobahn.websocket.protocol as autobahn_protocol
import txaio
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import Deferred, succeed

from elevgw.core.gateway import Gateway, HandshakeRefused
from elevgw.core.sessions import CLOSE_POLICY
from elevgw.south import fast_write, lean_frames, slim
from elevgw.south.refusals import WS_PATH, PlainRefusalsProtocol

_OPEN = WebSocketServerProtocol.STATE_OPEN

#: A handshake (request line and headers) larger than this is refused with 431: Autobahn
#: buffers it whole, and 400 sockets sending an endless header line held 1.7 GB.
MAX_HANDSHAKE_BYTES = 16 * 1024
MAX_HANDSHAKE_LINES = 64

#: Credentials longer than this are refused without a store lookup.
MAX_CREDENTIAL_CHARS = 256

#: Seconds a device refused with 503 (busy, full, store down) is asked to wait.
RETRY_AFTER_SECONDS = 5

_CONNECTING = WebSocketServerProtocol.STATE_CONNECTING


def _unformatted(value: Any, *args: Any, **kwargs: Any) -> str:
    return ""


#: What ``skip_debug_formatting`` replaces, per Autobahn module.
PATCHED_NAMES = {
    autobahn_protocol: ("hltype", "hlval", "pformat"),
    autobahn_twisted: ("hltype", "hlval"),
}
_patched = False


def skip_debug_formatting() -> bool:
    """Stop Autobahn formatting the arguments of debug lines nobody will see.

    Autobahn formats the arguments of its per-frame debug lines (``hltype``, ``hlval``:
    ``inspect`` and string work) before its logger drops them: a visible share of a loaded
    gateway's CPU in profiles; and ``_connectionMade`` pretty-prints every protocol option of
    every new connection (``pformat``) for a debug line. Applied
    once per process, only when Autobahn's log level is above debug, and only if every name
    is still there (``tests/test_south.py`` fails if Autobahn renames one). ``True`` if the
    patch is in place.
    """
    global _patched
    if _patched:
        return True
    if txaio.get_global_log_level() in ("debug", "trace"):  # type: ignore[attr-defined]
        return False
    if not all(hasattr(m, name) for m, names in PATCHED_NAMES.items() for name in names):
        return False
    for module, names in PATCHED_NAMES.items():
        for name in names:
            setattr(module, name, _unformatted)
    _patched = True
    return True


def _first(params: dict, name: str) -> str:
    values = params.get(name) or [""]
    return values[0].strip()


def credentials(request: Any) -> tuple[str, str]:
    """``(device_id, token)`` from an Autobahn ``ConnectionRequest``; empty strings when absent."""
    device_id = _first(request.params, "device_id")
    token = _first(request.params, "token")
    if not token:
        authorization = request.headers.get("authorization", "")
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer":
            token = value.strip()
    return device_id, token


class DeviceProtocol(PlainRefusalsProtocol):
    # No ``log = Logger()`` here: it would replace Autobahn's txaio logger, which drops its
    # per-frame debug lines, with one that formats and writes every one of them.
    session = None
    _device_id: str | None = None
    _lost = False
    _closed_by_gateway = False
    #: Whether this connection reads and writes its frames on the lean path (set when open).
    _lean = False
    #: Whether the factory offers the lean path; ``DeviceFactory`` sets both on its subclass.
    lean_frames_enabled = False
    lean_limit = lean_frames.MAX_LEAN_PAYLOAD
    #: Whether open connections drop what the handshake left (``slim``); set by the factory.
    slim_enabled = False
    _handshake_timer: Any = None
    _retry_after: int | None = None
    _handshake_bytes = 0
    _handshake_lines = 0

    def onConnect(self, request):
        handshake = self.factory.gateway.metrics.handshake
        if request.path != WS_PATH:
            handshake["refused"].inc()
            raise ConnectionDeny(
                404, f"no WebSocket at {request.path}; devices connect to {WS_PATH}"
            )
        device_id, token = credentials(request)
        if not device_id or not token:
            handshake["unauthorized"].inc()
            raise ConnectionDeny(401, "device_id and token are required")
        if len(device_id) > MAX_CREDENTIAL_CHARS or len(token) > MAX_CREDENTIAL_CHARS:
            handshake["unauthorized"].inc()
            raise ConnectionDeny(401, "unknown device or invalid token")
        d = self.factory.gateway.authenticate(device_id, token)

        def admitted(device):
            if self._lost:
                handshake["refused"].inc()
                raise ConnectionDeny(400, "connection closed during the handshake")
            handshake["accepted"].inc()
            self._device_id = device.device_id

        def refused(failure):
            failure.trap(HandshakeRefused)
            status = failure.value.status
            handshake["unauthorized" if status == 401 else "unavailable"].inc()
            self._retry_after = failure.value.retry_after
            raise ConnectionDeny(status, failure.value.reason)

        return d.addCallbacks(admitted, refused)

    def succeedHandshake(self, res):
        super().succeedHandshake(res)
        if self.slim_enabled and self.state == _OPEN:
            slim.after_open(self)

    def on(self, event, handler):
        if self.slim_enabled:
            slim.restore_events(self)
        if event == "message":
            self._lean = False  # the lean path does not fire Autobahn's message event
        super().on(event, handler)

    def onOpen(self):
        self._stop_handshake_timer()
        if self.lean_frames_enabled and lean_frames.eligible(self):
            self._lean = True
        self.session = self.factory.gateway.connected(self._device_id, self)

    def onMessage(self, payload, isBinary):
        session = self.session
        if session is None or session.ended:
            return
        if isBinary:
            self.factory.gateway.binary_received(session, payload)
        else:
            self.factory.gateway.text_received(session, payload)

    def onClose(self, wasClean, code, reason):
        if self.session is not None:
            if self.wasMaxMessagePayloadSizeExceeded or self.wasMaxFramePayloadSizeExceeded:
                code = 1009
            if not self._closed_by_gateway:
                # Autobahn's 1009, or the device closed (its code) or vanished (1006).
                self.factory.gateway.metrics.closes.labels(str(code or 1006)).inc()
            self.factory.gateway.disconnected(self.session)

    def onPing(self, payload):
        session = self.session
        if session is not None and not self.factory.gateway.frame_allowed(
            session, self.factory.reactor.seconds()
        ):
            return
        super().onPing(payload)

    def failHandshake(self, reason, code=400, responseHeaders=None):
        if code in (429, 503):
            wait = self._retry_after or RETRY_AFTER_SECONDS
            responseHeaders = [*(responseHeaders or ()), ("Retry-After", wait)]
        super().failHandshake(reason, code, responseHeaders)

    def connectionMade(self):
        super().connectionMade()
        self.factory.open_connections.add(self)
        if self.factory.fast_writes:
            fast_write.install(self.transport)
        self._handshake_timer = self.factory.reactor.callLater(
            self.factory.handshake_timeout, self._handshake_timed_out
        )

    def dataReceived(self, data):
        if self.state == _CONNECTING and not self._handshake_fits(data):
            return
        # The answers to every frame in this read leave in one send (see fast_write).
        transport = self.transport
        held = fast_write.hold(transport)
        try:
            if (
                self._lean
                and self.state == _OPEN
                and self.current_frame is None
                and not self.inside_message
            ):
                lean_frames.receive(self, data)
            else:
                super().dataReceived(data)
        finally:
            if held is not None:
                fast_write.release(transport, held)
        self.check_outbound()

    def connectionLost(self, reason=None):  # type: ignore[override]
        self._lost = True
        self._stop_handshake_timer()
        super().connectionLost(reason)
        self.factory.connection_gone(self)

    # Limits of one connection.

    def _handshake_fits(self, data: bytes) -> bool:
        """Count what the handshake sent so far; past the limits, refuse it with 431."""
        if self._handshake_bytes < 0:  # refused already
            return False
        self._handshake_bytes += len(data)
        self._handshake_lines += data.count(b"\n")
        if (
            self._handshake_bytes <= MAX_HANDSHAKE_BYTES
            and self._handshake_lines <= MAX_HANDSHAKE_LINES
        ):
            return True
        self._handshake_bytes = -1
        self.factory.gateway.metrics.limit_hit("handshake_size")
        self.factory.gateway.metrics.handshake["refused"].inc()
        self.data = b""
        self.failHandshake(
            "request header over {} bytes or {} lines".format(
                MAX_HANDSHAKE_BYTES, MAX_HANDSHAKE_LINES
            ),
            431,
        )
        return False

    def _handshake_timed_out(self) -> None:
        self._handshake_timer = None
        if self.state == _CONNECTING and self.transport is not None:
            self.factory.gateway.metrics.limit_hit("handshake_timeout")
            self.factory.gateway.metrics.handshake["refused"].inc()
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _stop_handshake_timer(self) -> None:
        timer, self._handshake_timer = self._handshake_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def check_outbound(self) -> None:
        """Close the device (1008) if more than ``--max-outbound-buffer`` bytes wait for it to
        read them: a device that does not read must not hold the gateway's memory.

        Called after every write that does not answer a read (``send_frame``) and once after
        each read (whose answers, pongs included, leave together)."""
        if fast_write.queued_bytes(self.transport) <= self.factory.max_outbound_buffer:
            return
        session = self.session
        if session is not None:
            self.factory.gateway.close_for_policy(
                session,
                "outbound_buffer",
                "over {} bytes waiting to be read".format(self.factory.max_outbound_buffer),
            )
        # The device is not reading: the close frame cannot reach it either. Free the queue.
        self.transport.abortConnection()  # type: ignore[union-attr]

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resume_reading(self) -> None:
        if self.transport is not None and not self._lost:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    # The Connection interface the session registry talks to.

    def send_frame(self, data: bytes) -> None:
        if self._lean and lean_frames.send_text(self, data):
            pass
        elif self.state == _OPEN:
            self.sendMessage(data, isBinary=False)
        else:
            # Closing or gone (an answer to a store write that finished after the close):
            # the device can no longer get it.
            return
        if getattr(self.transport, "elevgw_held", None) is None:
            self.check_outbound()  # (while a read's answers are held, checked after the read)

    def close(self, code: int, reason: str) -> None:
        """Close with ``code``; ``elevgw_closes_total`` counts the code the gateway chose,
        not what the device echoes back."""
        if not self._closed_by_gateway:
            self._closed_by_gateway = True
            self.factory.gateway.metrics.closes.labels(str(code)).inc()
        if code == 1000 or 3000 <= code <= 4999:
            self.sendClose(code, reason)
        else:
            # Autobahn's public sendClose refuses protocol codes such as 1001 (going away),
            # which the drain must send.
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123], isReply=False)
        if code == CLOSE_POLICY and self.transport is not None:
            # Final: nothing more is read from a device closed for a limit (a flooder would
            # keep the gateway parsing until its close reply); the socket closes once the
            # close frame is out.
            self.transport.loseConnection()


class DeviceFactory(WebSocketServerFactory):
    protocol = DeviceProtocol
    noisy = False

    def logPrefix(self) -> str:
        """Names the listener in Twisted's "… starting on PORT" line."""
        return "elevgw device WebSocket"

    def __init__(
        self,
        gateway: Gateway,
        max_message_size: int,
        reactor: Any = None,
        fast_writes: bool = True,
        lean_path: bool = True,
        max_outbound_buffer: int = 1024 * 1024,
        handshake_timeout: float = 10.0,
        slim_connections: bool = True,
    ) -> None:
        """``fast_writes``: frames leave at once when nothing is queued (``fast_write``);
        ``lean_path``: small text frames skip Autobahn's per-frame work (``lean_frames``);
        ``slim_connections``: open connections keep only what they use (``slim``)."""
        self._slim = slim_connections
        # No Server header: the device port does not say what software it runs.
        super().__init__(reactor=reactor, server=None)
        skip_debug_formatting()
        self.gateway = gateway
        self.fast_writes = fast_writes
        self.max_outbound_buffer = max_outbound_buffer
        self.handshake_timeout = handshake_timeout
        self.open_connections: set[DeviceProtocol] = set()
        self._all_closed: list[Deferred] = []
        self.setProtocolOptions(
            maxFramePayloadSize=max_message_size,
            maxMessagePayloadSize=max_message_size,
            # Text frames are parsed as JSON by the gateway, which answers bad UTF-8 with an
            # error frame; Autobahn would instead drop the connection (1007).
            utf8validateIncoming=False,
            # Fail with a close frame (1009 for an oversized frame) instead of a bare drop,
            # so the device learns why.
            failByDrop=False,
            autoPingInterval=0,
            perMessageCompressionAccept=lambda offers: None,
            # The handshake timeout runs on this factory's reactor (``handshake_timeout``);
            # Autobahn's would run on the global one.
            openHandshakeTimeout=0,
            closeHandshakeTimeout=5,
            # A request without Upgrade is refused (see refusals), not shown a status page.
            webStatus=False,
        )
        # A subclass per factory carries what is the same for all its connections.
        self.protocol = type(  # type: ignore[assignment]
            "DeviceProtocol",
            (DeviceProtocol,),
            {"lean_frames_enabled": lean_path, "slim_enabled": slim_connections},
        )
        self._publish_options()

    def setProtocolOptions(self, *args: Any, **kwargs: Any) -> None:
        super().setProtocolOptions(*args, **kwargs)
        self._publish_options()

    def _publish_options(self) -> None:
        """Put the options where this factory's connections read them: its protocol class."""
        protocol = self.__dict__.get("protocol")
        if protocol is None:  # still in Autobahn's __init__
            return
        protocol.lean_limit = lean_frames.lean_limit(self)
        if self._slim:
            for name, value in {**slim.class_options(self), **slim.OPEN_DEFAULTS}.items():
                setattr(protocol, name, value)

    def connection_gone(self, protocol: DeviceProtocol) -> None:
        self.open_connections.discard(protocol)
        if not self.open_connections:
            waiting, self._all_closed = self._all_closed, []
            for d in waiting:
                d.callback(None)

    def connections_closed(self) -> Deferred:
        """Fire once no device connection is open (for the drain)."""
        if not self.open_connections:
            return succeed(None)
        d: Deferred = Deferred()
        self._all_closed.append(d)
        return d

    def abort_all(self) -> None:
        """Drop whatever connection did not finish its close handshake in time."""
        for protocol in list(self.open_connections):
            if protocol.transport is not None:
                protocol.transport.abortConnection()  # type: ignore[attr-defined]
