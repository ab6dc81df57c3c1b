"""The event log end to end: a real gateway (SQLite and Redis), real devices, real HTTP,
webhooks to a real backend, and the Server-Sent Events stream read off a socket."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor
from twisted.internet.protocol import Protocol

from test_webhooks_gateway import backend  # noqa: F401  (fixture)
from webhook_receiver import within
from wsclient import connect_device

pytest_plugins = ["redis_support"]


@pytest.fixture(params=["sqlite", "redis"])
def store_settings(request):
    if request.param == "sqlite":
        return {}
    return {"store": request.getfixturevalue("redis_url")}


async def cycle(gateway, times=1):
    """Register a device, connect and disconnect it ``times`` times; its id."""
    creds = await gateway.register()
    for _ in range(times):
        device = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
        await device.request({"type": "heartbeat"})
        await device.close()
    return creds["device_id"]


async def events_until(gateway, count, path="/api/v1/events"):
    """The first page of the log, once it holds ``count`` entries (offline events are
    appended on the turn after the socket closes)."""
    for _ in range(200):
        status, body = await gateway.call("GET", path)
        assert status == 200, body
        if len(body["events"]) >= count:
            return body
        await defer.succeed(None)
        d = defer.Deferred()
        reactor.callLater(0.02, d.callback, None)
        await d
    raise AssertionError(f"the log never held {count} entries: {body}")


@pytest_twisted.ensureDeferred
async def test_replay_lists_each_event_once_oldest_first_with_growing_cursors(
    gateway_factory, store_settings
):
    gateway = await gateway_factory(**store_settings)
    device_id = await cycle(gateway, times=2)
    body = await events_until(gateway, 4)
    events = body["events"]
    assert [(e["type"], e["device_id"], e["status"], e["reason"]) for e in events] == [
        ("status", device_id, "online", "connected"),
        ("status", device_id, "offline", "closed"),
    ] * 2
    assert body["next"] == events[-1]["cursor"]
    assert len({e["event_id"] for e in events}) == 4
    assert all(isinstance(e["ts"], int) for e in events)

    status, page = await gateway.call("GET", f"/api/v1/events?after={events[0]['cursor']}&limit=2")
    assert status == 200
    assert [e["cursor"] for e in page["events"]] == [e["cursor"] for e in events[1:3]]
    status, rest = await gateway.call("GET", f"/api/v1/events?after={page['next']}")
    assert [e["cursor"] for e in rest["events"]] == [events[3]["cursor"]]
    status, empty = await gateway.call("GET", f"/api/v1/events?after={rest['next']}")
    assert empty == {"events": [], "next": rest["next"]}


@pytest_twisted.ensureDeferred
async def test_replay_filters_by_device_and_type(gateway_factory):
    gateway = await gateway_factory()
    first = await cycle(gateway)
    second = await cycle(gateway)
    await events_until(gateway, 4)
    status, body = await gateway.call("GET", f"/api/v1/events?device_id={second}")
    assert {e["device_id"] for e in body["events"]} == {second} and len(body["events"]) == 2
    status, body = await gateway.call("GET", "/api/v1/events?type=snapshot")
    assert body["events"] == []
    assert first


@pytest.mark.parametrize(
    "query, code",
    [
        ("after=nonsense", "bad_cursor"),
        ("limit=0", "bad_limit"),
        ("limit=1001", "bad_limit"),
        ("limit=x", "bad_limit"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_replay_arguments_are_400(gateway, query, code):
    status, body = await gateway.call("GET", "/api/v1/events?" + query)
    assert (status, body["error"]) == (400, code)


@pytest_twisted.ensureDeferred
async def test_event_routes_want_the_api_key(gateway_factory):
    gateway = await gateway_factory(api_key="k" * 32)
    for path in ("/api/v1/events", "/api/v1/events/stream"):
        status, body = await gateway.call("GET", path, headers={"Authorization": "Bearer wrong"})
        assert (status, body["error"]) == (401, "unauthorized")


@pytest_twisted.ensureDeferred
async def test_with_the_log_off_the_routes_say_so_and_webhooks_carry_no_cursor(
    backend,  # noqa: F811  (before gateway_factory: gateways stop first)
    gateway_factory,
):
    gateway = await gateway_factory(event_log=False, backend_url=backend.url)
    status, body = await gateway.call("GET", "/api/v1/events")
    assert (status, body["error"]) == (404, "event_log_off")
    device_id = await cycle(gateway)
    await within(backend.wait_for_requests(2))
    assert all("cursor" not in body for body in backend.bodies(device_id))


@pytest_twisted.ensureDeferred
async def test_each_webhook_carries_its_entry_cursor_and_event_id(
    backend,  # noqa: F811
    gateway_factory,
    store_settings,
):
    gateway = await gateway_factory(backend_url=backend.url, **store_settings)
    device_id = await cycle(gateway)
    await within(backend.wait_for_requests(2))
    body = await events_until(gateway, 2)
    by_cursor = {e["cursor"]: e for e in body["events"]}
    for received in backend.requests:
        entry = by_cursor[received.json["cursor"]]
        assert received.event_id == entry["event_id"]
        assert received.json["status"] == entry["status"]
        assert received.json["ts"] == entry["ts"]
        assert entry["device_id"] == device_id


# The live stream


class _SSEReader(Protocol):
    """Collects a Server-Sent Events body: every event's fields, and the comments."""

    def __init__(self) -> None:
        self.buffer = b""
        self.events: list[dict] = []
        self.comments: list[bytes] = []
        self.waiters: list = []
        self.done = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n\n" in self.buffer:
            block, self.buffer = self.buffer.split(b"\n\n", 1)
            fields: dict = {}
            for line in block.split(b"\n"):
                if line.startswith(b":"):
                    self.comments.append(line)
                elif line:
                    name, _, value = line.partition(b": ")
                    fields[name.decode()] = value.decode()
            if "data" in fields:
                fields["data"] = json.loads(fields["data"])
                self.events.append(fields)
        waiters, self.waiters = self.waiters, []
        for check, d in waiters:
            if check():
                d.callback(None)
            else:
                self.waiters.append((check, d))

    def until(self, check):
        d = defer.Deferred()
        if check():
            d.callback(None)
        else:
            self.waiters.append((check, d))
        return within(d)

    def connectionLost(self, reason) -> None:
        self.done.callback(None)


async def open_stream(gateway, headers=None, query=""):
    response = await treq.get(
        gateway.base + "/api/v1/events/stream" + query,
        headers=gateway._headers(headers),
        unbuffered=True,
        reactor=reactor,
        timeout=10,
    )
    reader = _SSEReader()
    response.deliverBody(reader)
    return response, reader


@pytest_twisted.ensureDeferred
async def test_the_stream_sends_new_entries_live_with_their_cursor_as_id(
    gateway_factory, store_settings
):
    gateway = await gateway_factory(**store_settings)
    response, reader = await open_stream(gateway)
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["text/event-stream; charset=utf-8"]
    device_id = await cycle(gateway)
    await reader.until(lambda: len(reader.events) >= 2)
    assert [(e["data"]["device_id"], e["data"]["status"]) for e in reader.events] == [
        (device_id, "online"),
        (device_id, "offline"),
    ]
    assert all(e["id"] == e["data"]["cursor"] for e in reader.events)
    await gateway.service.stopService()
    await within(reader.done)


@pytest_twisted.ensureDeferred
async def test_the_stream_resumes_after_last_event_id(gateway_factory, store_settings):
    gateway = await gateway_factory(**store_settings)
    await cycle(gateway, times=2)
    events = (await events_until(gateway, 4))["events"]
    response, reader = await open_stream(gateway, headers={"Last-Event-ID": events[1]["cursor"]})
    await reader.until(lambda: len(reader.events) >= 2)
    assert [e["id"] for e in reader.events] == [e["cursor"] for e in events[2:]]
    device_id = await cycle(gateway)
    await reader.until(lambda: len(reader.events) >= 4)
    assert [e["data"]["device_id"] for e in reader.events[2:]] == [device_id] * 2
    await gateway.service.stopService()


@pytest_twisted.ensureDeferred
async def test_the_stream_sends_keep_alive_comments(gateway_factory):
    gateway = await gateway_factory()
    gateway.service.api.keepalive_interval = 0.05
    response, reader = await open_stream(gateway)
    await reader.until(lambda: b": keep-alive" in reader.comments)
    await gateway.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_stream_with_a_bad_last_event_id_is_400(gateway):
    status, body = await gateway.call(
        "GET", "/api/v1/events/stream", headers={"Last-Event-ID": "garbage"}
    )
    assert (status, body["error"]) == (400, "bad_cursor")


async def eventually(check, timeout=5.0):
    for _ in range(int(timeout / 0.01)):
        if check():
            return
        d = defer.Deferred()
        reactor.callLater(0.01, d.callback, None)
        await d
    raise AssertionError("never happened")


@pytest_twisted.ensureDeferred
async def test_a_client_that_leaves_is_unsubscribed(gateway_factory):
    gateway = await gateway_factory()
    clients = gateway.service.event_log.metrics.stream_clients
    response, reader = await open_stream(gateway)
    await eventually(lambda: clients._value.get() == 1)
    reader.transport.stopProducing()  # the client closes its connection
    await eventually(lambda: clients._value.get() == 0)


# Health


@pytest_twisted.ensureDeferred
async def test_device_health_counts_the_sessions_it_saw(gateway):
    device_id = await cycle(gateway, times=2)
    creds_device = device_id
    await events_until(gateway, 4)
    status, report = await gateway.call("GET", f"/api/v1/devices/{creds_device}/health")
    assert status == 200, report
    assert report["device_id"] == device_id
    assert report["connects"] == 2
    assert report["disconnects"] == {"closed": 2}
    assert report["flaps"] == 2  # both sessions lasted well under a minute
    assert report["online"] is False and report["node"] is None
    assert report["last_disconnect"]["reason"] == "closed"
    assert 0.0 <= report["online_pct_24h"] <= 100.0
    assert isinstance(report["last_seen"], int)


@pytest_twisted.ensureDeferred
async def test_health_of_an_unknown_device_is_404(gateway):
    status, body = await gateway.call("GET", "/api/v1/devices/dev_nobody/health")
    assert (status, body["error"]) == (404, "unknown_device")


@pytest_twisted.ensureDeferred
async def test_fleet_health_counts_states_and_lists_flappers_and_silent_devices(gateway):
    flapper = await cycle(gateway, times=3)
    await gateway.register()  # never connects
    online = await gateway.register()
    device = await connect_device(gateway.ws_port, online["device_id"], online["token"])
    await device.request({"type": "heartbeat"})
    await events_until(gateway, 7)
    status, body = await gateway.call("GET", "/api/v1/fleet/health?silent_after=0.001")
    assert status == 200, body
    assert body["counts"] == {
        "devices": 3,
        "online": 1,
        "offline": 2,
        "never_connected": 1,
        "silent": 1,
        "flapping": 1,
    }
    assert body["top_flapping"] == [{"device_id": flapper, "flaps_24h": 3}]
    assert [d["device_id"] for d in body["silent"]] == [flapper]
    status, body = await gateway.call("GET", "/api/v1/fleet/health")
    assert body["counts"]["silent"] == 0 and body["silent_after"] == 86400.0
    await device.close()


@pytest_twisted.ensureDeferred
async def test_fleet_health_refuses_a_bad_silent_after(gateway):
    status, body = await gateway.call("GET", "/api/v1/fleet/health?silent_after=-1")
    assert (status, body["error"]) == (400, "bad_silent_after")


@pytest_twisted.ensureDeferred
async def test_health_is_kept_with_the_event_log_off(gateway_factory):
    gateway = await gateway_factory(event_log=False)
    device_id = await cycle(gateway)
    status, report = await gateway.call("GET", f"/api/v1/devices/{device_id}/health")
    assert report["connects"] == 1


@pytest_twisted.ensureDeferred
async def test_the_status_page_reports_the_webhook_backlog_behind_the_event_log(
    backend,  # noqa: F811
    gateway_factory,
):
    gateway = await gateway_factory(backend_url=backend.url)
    await cycle(gateway)
    await within(backend.wait_for_requests(2))
    status, report = await gateway.call("GET", "/api/v1/status")
    assert status == 200, report
    assert report["webhooks"] is not None and report["webhooks"]["delivered"] == 2


@pytest_twisted.ensureDeferred
async def test_on_a_cluster_every_node_replays_and_streams_every_node_s_events(
    gateway_factory, redis_url
):
    node_a = await gateway_factory(store=redis_url, node_id="node-a")
    node_b = await gateway_factory(store=redis_url, node_id="node-b")
    response, reader = await open_stream(node_a)
    device_id = await cycle(node_b)
    await reader.until(lambda: len(reader.events) >= 2)  # polled from the shared stream
    assert [(e["data"]["device_id"], e["data"]["status"]) for e in reader.events] == [
        (device_id, "online"),
        (device_id, "offline"),
    ]
    on_a = (await events_until(node_a, 2))["events"]
    on_b = (await events_until(node_b, 2))["events"]
    assert on_a == on_b
    await node_a.service.stopService()


@pytest_twisted.ensureDeferred
async def test_the_offline_events_of_a_drain_are_in_the_log_when_the_gateway_has_stopped(
    gateway_factory, tmp_path
):
    from elevgw.stores.sqlite import SQLiteStore
    from elevgw.stores.sqlite_events import SQLiteEventLog

    gateway = await gateway_factory()
    creds = await gateway.register()
    device = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    await device.request({"type": "heartbeat"})
    await gateway.service.stopService()
    store = SQLiteStore(str(tmp_path / "elevgw.sqlite3"))
    await store.start()
    try:
        page = await SQLiteEventLog(store).read(None, 10)
    finally:
        await store.stop()
    assert [(r.body["status"], r.body["reason"]) for r in page.records] == [
        ("online", "connected"),
        ("offline", "shutdown"),
    ]


@pytest_twisted.ensureDeferred
async def test_a_stream_client_that_stops_reading_is_dropped_not_buffered_for(gateway_factory):
    from elevgw.events.model import SnapshotReady

    gateway = await gateway_factory()
    gateway.service.api.stream_max_buffered = 5
    events = gateway.service.event_log
    response, reader = await open_stream(gateway)
    await eventually(lambda: events.metrics.stream_clients._value.get() == 1)
    reader.transport.pauseProducing()  # the client stops reading its socket
    big = "http://x/" + "a" * 60_000
    for batch in range(40):  # about 15 MB: more than every socket buffer on the way holds
        for i in range(10):
            events.emit(SnapshotReady("dev_a", big, None, batch * 10 + i))
        await pause(0.02)
        if events.metrics.stream_dropped._value.get():
            break
    await eventually(lambda: events.metrics.stream_dropped._value.get() == 1)
    await eventually(lambda: events.metrics.stream_clients._value.get() == 0)
    reader.transport.resumeProducing()
    await within(reader.done)


async def pause(seconds):
    d = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    await d
