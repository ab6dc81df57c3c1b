"""The device handshake on a StringTransport: refusals are plain HTTP answers."""

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from elevgw.core.gateway import Gateway
from elevgw.south.protocol import DeviceFactory
from elevgw.stores.interfaces import Device, hash_token
from elevgw.testing import MemoryDeviceStore, MemorySnapshotStore, RecordingSink


class DeviceTransport(StringTransport):
    """A StringTransport that, like a TCP one, allows unregistering no producer."""

    def unregisterProducer(self):
        self.producer = None


def handshake(store, path="/ws?device_id=dev_1&token=secret", max_pending=2000):
    clock = Clock()
    gateway = Gateway(
        store,
        MemorySnapshotStore(),
        RecordingSink(),
        clock=clock,
        max_pending_handshakes=max_pending,
    )
    factory = DeviceFactory(gateway, 1 << 20, reactor=clock)
    # Autobahn's own handshake timers run on the global reactor: off in a unit test.
    factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0)
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = DeviceTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(
        b"GET " + path.encode() + b" HTTP/1.1\r\n"
        b"Host: gateway\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    status_line = transport.value().split(b"\r\n", 1)[0]
    return int(status_line.split()[1]), gateway, protocol


@pytest.fixture
def store():
    store = MemoryDeviceStore()
    store.devices["dev_1"] = Device("dev_1", "lobby", hash_token("secret"), 1.0)
    return store


def test_a_known_device_with_its_token_is_admitted(store):
    status, gateway, protocol = handshake(store)
    assert status == 101
    assert gateway.registry.get("dev_1") is protocol.session


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/ws", 401),
        ("/ws?device_id=dev_1", 401),
        ("/ws?device_id=dev_1&token=wrong", 401),
        ("/ws?device_id=dev_nobody&token=secret", 401),
        ("/other?device_id=dev_1&token=secret", 404),
    ],
)
def test_refusals_are_plain_http_statuses(store, path, expected):
    status, gateway, _ = handshake(store, path)
    assert status == expected
    assert len(gateway.registry) == 0
    outcome = "refused" if expected == 404 else "unauthorized"
    assert gateway.metrics.handshake[outcome]._value.get() == 1


def test_a_store_that_does_not_answer_gets_503(store):
    store.available = False
    status, gateway, _ = handshake(store)
    assert status == 503
    assert gateway.metrics.handshake["unavailable"]._value.get() == 1


def test_too_many_pending_lookups_get_a_quick_503(store):
    status, _, _ = handshake(store, max_pending=0)
    assert status == 503
