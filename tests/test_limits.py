"""Limits over real sockets: a flooding, non-reading or half-connected client is stopped, and
every other device keeps its pongs and handshakes meanwhile."""

import json
import re

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, formatEvent

from elevgw.core.gateway import Gateway
from elevgw.events import model as events
from elevgw.observe import logs
from elevgw.south.protocol import MAX_HANDSHAKE_BYTES, DeviceFactory
from rawclient import metric, raw_connect
from wsclient import connect_device


class DeviceTransport(StringTransport):
    """A ``StringTransport`` that, like a TCP transport, lets Autobahn unregister a producer
    it never registered."""

    def unregisterProducer(self):
        self.producer = None


def handshake(query: str, extra: str = "") -> bytes:
    return (
        f"GET /ws?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


def sleep(seconds):
    return deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_a_flooding_device_is_closed_while_the_others_keep_their_pongs(gateway_factory):
    gateway = await gateway_factory(message_rate=50.0, message_burst=100)
    flooder_creds = await gateway.register()
    other_creds = await gateway.register()
    flooder = await connect_device(
        gateway.ws_port, flooder_creds["device_id"], flooder_creds["token"]
    )
    other = await connect_device(gateway.ws_port, other_creds["device_id"], other_creds["token"])
    for n in range(3000):  # pipelined, as fast as the socket takes them
        flooder.send({"type": "log", "payload": {"n": n}, "id": f"l{n}"})
    assert (await other.request({"type": "heartbeat"}, timeout=5))["type"] == "pong"
    code, _ = await defer.Deferred.fromCoroutine(_closed(flooder))
    assert code == 1008
    frames = []
    while flooder.pending_frames():
        frames.append(await flooder.frame())
    errors = [f for f in frames if f["type"] == "error"]
    assert [e["error"] for e in errors] == ["rate_limited"]
    assert len([f for f in frames if f["type"] == "ack"]) <= 300
    # Others are still served, and a new device still gets in.
    assert (await other.request({"type": "heartbeat"}, timeout=5))["type"] == "pong"
    late = await gateway.register()
    newcomer = await connect_device(gateway.ws_port, late["device_id"], late["token"])
    assert (await newcomer.request({"type": "heartbeat"}))["type"] == "pong"
    assert await metric(gateway, "elevgw_limit_hits_total", limit="message_rate_close") == 1
    assert await metric(gateway, "elevgw_closes_total", code="1008") == 1
    # Reconnecting at once gets no fresh burst: 429 until the cooldown ends.
    client = await raw_connect(gateway.ws_port)
    client.transport.write(
        handshake(f"device_id={flooder_creds['device_id']}&token={flooder_creds['token']}")
    )
    received = await client.lost.addTimeout(5, reactor)
    assert received.startswith(b"HTTP/1.1 429 ")
    assert re.search(rb"\r\nRetry-After: \d+\r\n", received), received
    await other.close()
    await newcomer.close()


async def _closed(device):
    return await device.closed


@pytest_twisted.ensureDeferred
async def test_a_device_that_does_not_read_is_closed_and_send_says_so(gateway_factory):
    gateway = await gateway_factory(max_outbound_buffer=256 * 1024)
    creds = await gateway.register()
    device = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    device.protocol.transport.pauseProducing()  # the device stops reading its socket
    blob = "x" * 60_000
    answers = []
    for _ in range(3000):
        status, body = await gateway.call(
            "POST",
            "/api/send",
            {"device_id": creds["device_id"], "command": "FILL", "data": {"blob": blob}},
        )
        answers.append((status, body))
        if status != 200:
            break
    status, body = answers[-1]
    assert (status, body["error"]) == (503, "device_not_reading"), answers[-1]
    assert len(answers) < 500  # kernel buffers plus 256 KB, not 3,000 × 60 KB
    status, body = await gateway.call(
        "POST", "/api/send", {"device_id": creds["device_id"], "command": "NEXT"}
    )
    assert (status, body["error"]) == (404, "device_offline")
    assert await metric(gateway, "elevgw_limit_hits_total", limit="outbound_buffer_close") == 1
    assert await metric(gateway, "elevgw_closes_total", code="1008") == 1
    device.protocol.transport.resumeProducing()
    await device.closed
    assert gateway.service.device_factory.open_connections == set()


@pytest_twisted.ensureDeferred
async def test_a_ping_flood_from_a_device_that_does_not_read_is_closed(gateway_factory):
    gateway = await gateway_factory(message_rate=20.0, message_burst=20)
    creds = await gateway.register()
    device = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    device.protocol.transport.pauseProducing()
    for _ in range(500):
        device.protocol.sendPing(b"p" * 125)
    await sleep(0.3)
    assert gateway.service.gateway.registry.get(creds["device_id"]) is None
    assert await metric(gateway, "elevgw_limit_hits_total", limit="message_rate_close") == 1
    device.protocol.transport.resumeProducing()
    await device.closed


@pytest_twisted.ensureDeferred
async def test_an_endless_header_line_is_refused_with_431(gateway):
    client = await raw_connect(gateway.ws_port)
    client.transport.write(b"GET /ws?device_id=a&token=b HTTP/1.1\r\nX-Long: ")
    for _ in range(40):  # 40 KB of one header line, in pieces
        client.transport.write(b"a" * 1024)
        await sleep(0)
    received = await client.lost.addTimeout(5, reactor)
    assert received.startswith(b"HTTP/1.1 431 ")
    assert await metric(gateway, "elevgw_limit_hits_total", limit="handshake_size") == 1


@pytest_twisted.ensureDeferred
async def test_too_many_header_lines_are_refused_with_431(gateway):
    client = await raw_connect(gateway.ws_port)
    client.transport.write(b"GET /ws?device_id=a&token=b HTTP/1.1\r\n" + b"X: y\r\n" * 200)
    received = await client.lost.addTimeout(5, reactor)
    assert received.startswith(b"HTTP/1.1 431 ")


@pytest_twisted.ensureDeferred
async def test_a_handshake_that_never_finishes_is_dropped_after_the_timeout(gateway_factory):
    gateway = await gateway_factory(handshake_timeout=0.3)
    client = await raw_connect(gateway.ws_port)
    client.transport.write(b"GET /ws?device_id=a&token=b HTTP/1.1\r\n")
    await client.lost.addTimeout(5, reactor)
    assert await metric(gateway, "elevgw_limit_hits_total", limit="handshake_timeout") == 1


def test_the_handshake_timeout_runs_on_the_factorys_reactor():
    clock = Clock()
    gateway = Gateway(None, None, events.NullSink(), clock)
    factory = DeviceFactory(gateway, 1024, reactor=clock, handshake_timeout=10)
    connection = factory.buildProtocol(None)
    transport = DeviceTransport()
    connection.makeConnection(transport)
    connection.dataReceived(b"GET /ws?device_id=a&token=b HTTP/1.1\r\n")
    clock.advance(9.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.aborted if hasattr(transport, "aborted") else transport.disconnecting
    assert clock.getDelayedCalls() == []


def test_the_handshake_size_is_counted_across_reads():
    clock = Clock()
    gateway = Gateway(None, None, events.NullSink(), clock)
    factory = DeviceFactory(gateway, 1024, reactor=clock)
    connection = factory.buildProtocol(None)
    transport = DeviceTransport()
    connection.makeConnection(transport)
    for _ in range(MAX_HANDSHAKE_BYTES // 1000):
        connection.dataReceived(b"a" * 1000)
    assert transport.value() == b""
    connection.dataReceived(b"a" * 1000)
    assert transport.value().startswith(b"HTTP/1.1 431 ")
    assert connection.data == b""  # what it sent is let go


@pytest_twisted.ensureDeferred
async def test_a_full_gateway_answers_503_with_retry_after(gateway_factory):
    gateway = await gateway_factory(max_sessions=1)
    first, second = await gateway.register(), await gateway.register()
    device = await connect_device(gateway.ws_port, first["device_id"], first["token"])
    client = await raw_connect(gateway.ws_port)
    client.transport.write(handshake(f"device_id={second['device_id']}&token={second['token']}"))
    received = await client.lost.addTimeout(5, reactor)
    assert received.startswith(b"HTTP/1.1 503 ")
    assert re.search(rb"\r\nRetry-After: \d+\r\n", received)
    assert await metric(gateway, "elevgw_limit_hits_total", limit="sessions") == 1
    # The device that holds the place may come back (a takeover is no new session).
    again = await connect_device(gateway.ws_port, first["device_id"], first["token"])
    assert (await again.request({"type": "heartbeat"}))["type"] == "pong"
    await device.closed
    await again.close()


@pytest_twisted.ensureDeferred
async def test_a_frame_nested_990_deep_gets_an_error_frame_and_the_socket_stays(gateway):
    creds = await gateway.register()
    device = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    deep = b'{"type": "log", "payload": ' + b"[" * 990 + b"]" * 990 + b"}"
    error = await device.request(deep)
    assert (error["type"], error["error"]) == ("error", "bad_json")
    assert (await device.request({"type": "heartbeat"}))["type"] == "pong"
    await device.close()


@pytest_twisted.ensureDeferred
async def test_a_megabyte_type_is_not_echoed_back(gateway_factory):
    gateway = await gateway_factory(max_message_size=8 * 1024 * 1024)
    creds = await gateway.register()
    device = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    error = await device.request({"type": "x" * (1024 * 1024)})
    assert error["error"] == "unknown_type" and len(json.dumps(error)) < 300
    await device.close()


def test_log_fields_from_outside_cannot_forge_a_line_or_fill_the_log():
    seen = []
    observer = logs.GatewayLogFilter(seen.append, LogLevel.info, "node-1")
    forged = "dev_1\n2026-12-01T08:00:00+0000 [elevgw] device dev_admin revoked"
    observer(
        {
            "log_level": LogLevel.info,
            "log_format": "handshake refused for {device_id}",
            "device_id": forged,
            "location": "x" * (7 * 1024 * 1024),
            "note": "上海中心01号",
        }
    )
    (event,) = seen
    line = formatEvent(event)
    assert "\n" not in line and "\\x0a" in line
    assert len(event["location"]) < 1000
    assert event["note"] == "上海中心01号"  # printable text is left alone
