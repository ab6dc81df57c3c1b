"""Slim connections (``elevgw.south.slim``): an open connection keeps only what it uses, and
every attribute still reads as it did."""

import struct

import pytest_twisted
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from device_harness import Harness, client_frame, close_code, server_frames
from elevgw.south import slim
from wsclient import connect_device

HEARTBEAT = b'{"type":"heartbeat"}'

#: What slim connections change on purpose (see the module docstring).
CHANGED = {
    "send_queue",
    "trafficStats",
    "is_open",
    "utf8validator",
    "_valid_events",
    "_results",
    "_handshake_bytes",
    "_handshake_lines",
}


def test_every_name_slim_relies_on_is_still_set_by_autobahn():
    """If Autobahn renames or stops setting one of these, slimming would keep a stale
    default: this fails first."""
    harness = Harness(lean=False, slim=False)
    names = set(vars(harness.protocol))
    missing = (set(slim.OPEN_DEFAULTS) | set(slim.HANDSHAKE_LEFTOVERS)) - names
    assert not missing
    assert set(harness.protocol.CONFIG_ATTRS) <= names
    assert isinstance(harness.protocol.send_queue, type(harness.protocol.send_queue))
    assert hasattr(harness.protocol.send_queue, "popleft")


def test_an_open_slim_connection_reads_every_attribute_as_a_full_one():
    full = Harness(lean=True, slim=False).protocol
    slimmed = Harness(lean=True, slim=True).protocol
    for name in set(vars(full)) - CHANGED - set(slim.HANDSHAKE_LEFTOVERS):
        if name in ("transport", "factory", "session", "_transport_details", "is_closed"):
            continue  # per connection by nature
        value = getattr(full, name)
        if callable(value):  # a callable option: each factory has its own
            assert callable(getattr(slimmed, name)), name
            continue
        read = getattr(slimmed, name)
        assert read == value or (value == [] and read == ()), (name, read, value)
    for name in slim.HANDSHAKE_LEFTOVERS:
        assert getattr(slimmed, name) is None
    # The counters are shared by every slim connection of the process (earlier tests' traffic
    # is in them), so the test is that this connection has no counters of its own.
    assert len(slimmed.send_queue) == 0 and slimmed.trafficStats is slim.SHARED_TRAFFIC


def test_an_open_slim_connection_holds_few_attributes_of_its_own():
    full = Harness(lean=True, slim=False).protocol
    slimmed = Harness(lean=True, slim=True).protocol
    assert len(vars(full)) > 80
    assert len(vars(slimmed)) <= 12, sorted(vars(slimmed))


def test_protocol_options_set_after_the_factory_was_built_reach_its_connections():
    harness = Harness(lean=True, slim=True)
    harness.factory.setProtocolOptions(closeHandshakeTimeout=7)
    assert harness.factory.protocol.closeHandshakeTimeout == 7
    assert "closeHandshakeTimeout" not in vars(harness.protocol)
    assert harness.protocol.closeHandshakeTimeout == 7


def test_a_slim_connection_goes_through_the_close_handshake_and_counts_its_code():
    harness = Harness(lean=True, slim=True)
    out = harness.feed(client_frame(1, HEARTBEAT) + client_frame(8, struct.pack("!H", 1001)))
    frames = server_frames(out)
    assert frames[0][0] == 1 and frames[1][0] == 8 and close_code(frames[1][2]) == 1000
    assert harness.transport.disconnecting
    harness.protocol.connectionLost(Failure(ConnectionDone()))
    assert len(harness.gateway.registry) == 0
    assert vars(harness.protocol)["remoteCloseCode"] == 1001  # set again on the instance


def test_queued_sends_still_work_on_a_slim_connection():
    harness = Harness(lean=False, slim=True)
    harness.protocol.sendMessage(b"first", sync=True)  # Autobahn queues synchronous sends
    harness.protocol.sendMessage(b"second")
    while harness.protocol.send_queue:
        harness.protocol._send()
    payloads = [payload for _, _, payload in server_frames(harness.transport.value())]
    assert payloads == [b"first", b"second"]
    harness.protocol._send()  # the queue ran dry: no further write is scheduled
    assert harness.protocol.triggered is False


def test_listening_to_messages_gives_a_slim_connection_its_event_registry_back():
    harness = Harness(lean=False, slim=True)
    heard = []
    harness.protocol.on("message", lambda payload, is_binary: heard.append(payload))
    harness.feed(client_frame(1, HEARTBEAT))
    assert heard == [HEARTBEAT]
    assert "_results" in vars(harness.protocol)


def test_listening_to_messages_takes_a_connection_off_the_lean_path():
    harness = Harness(lean=True, slim=True)
    heard = []
    harness.protocol.on("message", lambda payload, is_binary: heard.append(payload))
    harness.feed(client_frame(1, HEARTBEAT))
    assert heard == [HEARTBEAT] and not harness.protocol._lean


@pytest_twisted.ensureDeferred
async def test_devices_are_served_with_slim_connections_off(gateway_factory):
    gateway = await gateway_factory(slim_connections=False)
    creds = await gateway.register()
    device = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    (protocol,) = gateway.service.device_factory.open_connections
    assert protocol.http_headers is not None
    assert (await device.request({"type": "heartbeat"}))["type"] == "pong"
    await device.close()


@pytest_twisted.ensureDeferred
async def test_devices_are_served_with_slim_connections_on(gateway):
    creds = await gateway.register()
    device = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    (protocol,) = gateway.service.device_factory.open_connections
    assert protocol.http_headers is None and "factory" in vars(protocol)
    assert (await device.request({"type": "heartbeat"}))["type"] == "pong"
    await device.close()
