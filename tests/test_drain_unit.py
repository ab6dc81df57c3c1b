"""The service tree on a MemoryReactorClock: start order, start failure, and the drain."""

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock

from elevgw.config import Settings
from elevgw.core.sessions import CLOSE_GOING_AWAY
from elevgw.service import GatewayService
from elevgw.stores.interfaces import Device
from elevgw.testing import FakeConnection, MemoryDeviceStore, MemorySnapshotStore, RecordingSink


def make_service(store=None):
    reactor = MemoryReactorClock()
    reactor.advance(1_700_000_000)
    sink = RecordingSink()
    store = store or MemoryDeviceStore()
    service = GatewayService(
        Settings(
            ws_endpoint="tcp:8080",
            api_endpoint="tcp:8000:interface=127.0.0.1",
            node_id="unit",
            drain_timeout=4.0,
        ),
        reactor,
        store=store,
        snapshots=MemorySnapshotStore(),
        event_sink=sink,
    )
    return service, reactor, sink, store


def test_starting_binds_both_listeners_and_fires_ready():
    service, reactor, *_ = make_service()
    service.privilegedStartService()
    service.startService()
    assert sorted(port for port, *_ in reactor.tcpServers) == [8000, 8080]
    assert service.ready.called
    service.stopService()


def test_a_store_that_cannot_start_fails_ready_with_its_reason():
    store = MemoryDeviceStore()
    store.available = False
    service, reactor, *_ = make_service(store)
    service.privilegedStartService()
    service.startService()
    failures = []
    service.ready.addErrback(failures.append)
    [failure] = failures
    assert "memory store switched off" in failure.getErrorMessage()
    service.stopService()


def test_the_drain_closes_sessions_with_1001_emits_offline_and_records_last_seen():
    service, reactor, sink, store = make_service()
    service.privilegedStartService()
    service.startService()
    store.devices["dev_1"] = Device("dev_1", "lobby", "x", 1.0)
    connections = {}
    for device_id in ("dev_1", "dev_2"):
        connections[device_id] = FakeConnection()
        service.gateway.connected(device_id, connections[device_id])
    reactor.advance(3)

    stopped = service.stopService()
    reactor.advance(0)  # the last_seen flush runs on the next turn
    assert [c.closed_with[0] for c in connections.values()] == [CLOSE_GOING_AWAY] * 2
    assert sorted(sink.statuses()) == [
        ("dev_1", "offline", "shutdown"),
        ("dev_1", "online", "connected"),
        ("dev_2", "offline", "shutdown"),
        ("dev_2", "online", "connected"),
    ]
    assert stopped.called
    assert store.devices["dev_1"].last_seen == 1_700_000_000
    assert service.api.draining
    assert not service.running


def test_the_drain_ends_on_time_when_webhooks_never_drain():
    service, reactor, sink, _ = make_service()
    sink.drain = lambda timeout: Deferred()  # a backend that never answers
    service.privilegedStartService()
    service.startService()
    stopped = service.stopService()
    assert not stopped.called
    reactor.advance(4.0)
    assert stopped.called
