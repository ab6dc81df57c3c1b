"""What the device port tells whoever is not a device: plain refusals, no software named."""

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import globalLogPublisher

from elevgw.south.refusals import refusal

UPGRADE = (
    b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


class Raw(Protocol):
    """Sends one request and collects every byte until the server closes (or ``until``)."""

    def __init__(self, request: bytes, until: bytes | None = None) -> None:
        self.request = request
        self.until = until
        self.received = b""
        self.done: Deferred = Deferred()

    def connectionMade(self):
        self.transport.write(self.request)

    def dataReceived(self, data):
        self.received += data
        if self.until is not None and self.until in self.received and not self.done.called:
            self.done.callback(self.received)
            self.transport.loseConnection()

    def connectionLost(self, reason=None):
        if not self.done.called:
            self.done.callback(self.received)


async def raw(port: int, request: bytes, until: bytes | None = None) -> tuple[int, dict, bytes]:
    """``(status, headers with lower-case names, body)`` of one raw request."""
    protocol = Raw(request, until)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol)
    answer = await protocol.done
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def assert_anonymous(headers: dict, body: bytes) -> None:
    assert "server" not in headers
    assert b"autobahn" not in body.lower() and b"<html" not in body.lower()
    assert not any("autobahn" in value.lower() for value in headers.values())


@pytest.mark.parametrize("path", ["/", "/index.html", "/ws/", "/admin?x=1", "/favicon.ico"])
@pytest_twisted.ensureDeferred
async def test_a_plain_get_off_ws_is_404_with_no_banner(gateway, path):
    request = f"GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n".encode()
    status, headers, body = await raw(gateway.ws_port, request)
    assert status == 404
    assert_anonymous(headers, body)
    assert int(headers["content-length"]) == len(body)


@pytest_twisted.ensureDeferred
async def test_a_plain_get_on_ws_is_426_upgrade_required(gateway):
    status, headers, body = await raw(gateway.ws_port, b"GET /ws HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert status == 426
    assert headers["upgrade"] == "websocket"
    assert_anonymous(headers, body)
    assert b"/ws" in body


@pytest_twisted.ensureDeferred
async def test_handshake_answers_name_no_software(gateway):
    creds = await gateway.register()
    refused = b"GET /ws?device_id=dev_nobody&token=x HTTP/1.1\r\nHost: gw\r\n" + UPGRADE + b"\r\n"
    status, headers, body = await raw(gateway.ws_port, refused)
    assert status == 401
    assert_anonymous(headers, body)
    admitted = (
        "GET /ws?device_id={}&token={} HTTP/1.1\r\nHost: gw\r\n".format(
            creds["device_id"], creds["token"]
        ).encode()
        + UPGRADE
        + b"\r\n"
    )
    status, headers, body = await raw(gateway.ws_port, admitted, until=b"\r\n\r\n")
    assert status == 101
    assert_anonymous(headers, b"")


@pytest_twisted.ensureDeferred
async def test_refused_handshakes_leave_no_autobahn_lines_in_the_log(gateway):
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        await raw(gateway.ws_port, b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
        refused = b"GET /ws?device_id=dev_x&token=x HTTP/1.1\r\nHost: gw\r\n" + UPGRADE + b"\r\n"
        await raw(gateway.ws_port, refused)
    finally:
        globalLogPublisher.removeObserver(events.append)
    namespaces = {event.get("log_namespace", "") for event in events}
    assert not [n for n in namespaces if n.startswith("autobahn")], namespaces


def test_a_refusal_is_a_whole_http_answer():
    answer = refusal(503, "busy", [("Retry-After", "5")])
    assert answer == (
        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: 5\r\n"
        b"Connection: close\r\n\r\nbusy\n"
    )


@pytest.mark.parametrize(
    "request_line", [b"GET /healthz", b"GET /nowhere", b"POST /api/send", b"GET /metrics"]
)
@pytest_twisted.ensureDeferred
async def test_the_api_port_names_no_software_either(gateway, request_line):
    port = gateway.service.api_port()
    request = request_line + b" HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
    if request_line.startswith(b"POST"):
        request += b"Content-Length: 2\r\n\r\n{}"
    else:
        request += b"\r\n"
    status, headers, body = await raw(port, request)
    assert status in (200, 400, 404)
    assert "server" not in headers
    assert b"twisted" not in body.lower()
