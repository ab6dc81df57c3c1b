"""A test device: a real Autobahn WebSocket client driven with Deferreds."""

from __future__ import annotations

import json
from urllib.parse import urlencode

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, endpoints, reactor, ssl


class _Protocol(WebSocketClientProtocol):
    def onOpen(self):
        self.factory.device._opened(self)

    def onMessage(self, payload, isBinary):
        self.factory.device._received(payload, isBinary)

    def onClose(self, wasClean, code, reason):
        self.factory.device._closed_with(code, reason)


class TestDevice:
    """Connects as a device; ``frame()`` fires with the next frame as a dict."""

    def __init__(self) -> None:
        self.protocol = None
        self._frames: defer.DeferredQueue = defer.DeferredQueue()
        self._open = defer.Deferred()
        self.closed = defer.Deferred()
        self.close_code = None

    def _opened(self, protocol):
        self.protocol = protocol
        if not self._open.called:
            self._open.callback(self)

    def _received(self, payload, is_binary):
        self._frames.put(payload if is_binary else json.loads(payload))

    def _closed_with(self, code, reason):
        self.close_code = code
        if not self._open.called:
            self._open.errback(ConnectionError(f"closed before open: {code} {reason}"))
        if not self.closed.called:
            self.closed.callback((code, reason))

    def frame(self, timeout: float = 5.0) -> defer.Deferred:
        return self._frames.get().addTimeout(timeout, reactor)

    def pending_frames(self) -> int:
        return len(self._frames.pending)

    def send(self, value) -> None:
        if isinstance(value, bytes):
            self.protocol.sendMessage(value, isBinary=False)
        else:
            self.protocol.sendMessage(json.dumps(value).encode("utf-8"), isBinary=False)

    def send_binary(self, data: bytes) -> None:
        self.protocol.sendMessage(data, isBinary=True)

    async def request(self, value, timeout: float = 5.0) -> dict:
        self.send(value)
        return await self.frame(timeout)

    def close(self, code: int = 1000) -> defer.Deferred:
        if self.protocol is not None and not self.closed.called:
            self.protocol.sendClose(code)
        return self.closed

    def drop(self) -> defer.Deferred:
        """Vanish without a close handshake, as a device losing power does."""
        if self.protocol is not None and self.protocol.transport is not None:
            self.protocol.transport.abortConnection()
        return self.closed


async def connect_device(
    port: int,
    device_id: str,
    token: str,
    path: str = "/ws",
    headers=None,
    max_size: int = 0,
    tls: bool = False,
) -> TestDevice:
    query = (
        urlencode({"device_id": device_id, "token": token})
        if token
        else urlencode({"device_id": device_id})
    )
    url = f"{'wss' if tls else 'ws'}://127.0.0.1:{port}{path}?{query}"
    device = TestDevice()
    factory = WebSocketClientFactory(url, headers=headers or {})
    factory.protocol = _Protocol
    factory.device = device
    factory.setProtocolOptions(autoPingInterval=0, openHandshakeTimeout=5, closeHandshakeTimeout=2)
    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    if tls:  # the test certificate is self-signed: encrypt, do not verify
        endpoint = endpoints.wrapClientTLS(ssl.CertificateOptions(), endpoint)
    await endpoint.connect(factory)
    return await device._open


async def online_device(gateway) -> tuple[str, TestDevice]:
    """Register a device on a running gateway (``conftest.RunningGateway``) and connect it."""
    creds = await gateway.register()
    device = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    return creds["device_id"], device
