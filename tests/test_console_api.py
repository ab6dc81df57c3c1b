"""The console's server side without a browser: its files, the key, paging, node status."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urljoin

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

import elevgw
from elevgw.events.model import OFFLINE_CLOSED
from elevgw.north import device_pages
from elevgw.north.console import STATIC
from elevgw.observe.metrics import Metrics
from elevgw.observe.status import NodeStatus
from elevgw.presence.interfaces import Holder
from elevgw.stores.interfaces import Device
from elevgw.testing import MemoryDeviceStore
from wsclient import connect_device

API_KEY = "console-api-key"
SOURCE_STATIC = Path(__file__).resolve().parent.parent / "src/elevgw/north/console/static"


async def fetch(gateway, path: str, headers=None):
    response = await treq.get(
        gateway.base + path,
        headers=headers or {},
        reactor=reactor,
        timeout=30,
        allow_redirects=False,
    )
    return response, await response.content()


def header(response, name: str) -> str | None:
    values = response.headers.getRawHeaders(name)
    return values[0] if values else None


# -- the static files


def test_the_console_files_ship_inside_the_elevgw_package():
    """Under tox elevgw is an installed wheel: the files must have come with it."""
    assert STATIC.is_relative_to(Path(elevgw.__file__).resolve().parent)
    shipped = sorted(p.name for p in STATIC.iterdir())
    assert shipped == sorted(p.name for p in SOURCE_STATIC.iterdir())
    assert "index.html" in shipped


@pytest_twisted.ensureDeferred
async def test_every_console_file_is_served_as_shipped_without_the_key(gateway_factory):
    gateway = await gateway_factory(api_key=API_KEY)
    for path in sorted(SOURCE_STATIC.iterdir()):
        response, body = await fetch(gateway, "/console/" + path.name)
        assert response.code == 200, path.name
        assert body == path.read_bytes(), path.name
    response, body = await fetch(gateway, "/console/")
    assert response.code == 200 and body == (SOURCE_STATIC / "index.html").read_bytes()
    assert header(response, "Content-Type") == "text/html; charset=utf-8"
    response, _ = await fetch(gateway, "/console/console.js")
    assert header(response, "Content-Type") == "text/javascript; charset=utf-8"


@pytest_twisted.ensureDeferred
async def test_a_current_copy_in_the_browser_is_answered_304(gateway):
    response, _ = await fetch(gateway, "/console/console.js")
    etag = header(response, "ETag")
    response, body = await fetch(gateway, "/console/console.js", {"If-None-Match": [etag]})
    assert response.code == 304 and body == b""
    response, body = await fetch(gateway, "/console/console.js", {"If-None-Match": ['"old"']})
    assert response.code == 200 and body


@pytest_twisted.ensureDeferred
async def test_console_pages_are_same_origin_only(gateway):
    response, _ = await fetch(gateway, "/console/", {"Origin": ["http://evil.example"]})
    policy = header(response, "Content-Security-Policy")
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy
    assert header(response, "X-Content-Type-Options") == "nosniff"
    assert header(response, "Referrer-Policy") == "no-referrer"
    for path in ("/console/", "/api/v1/devices", "/api/v1/status"):
        response, _ = await fetch(gateway, path, {"Origin": ["http://evil.example"]})
        sent = [name for name, _ in response.headers.getAllRawHeaders()]
        assert not [n for n in sent if n.lower().startswith(b"access-control-")], path


@pytest_twisted.ensureDeferred
async def test_console_without_its_slash_redirects_to_it(gateway):
    response, _ = await fetch(gateway, "/console")
    assert response.code == 302
    location = urljoin(gateway.base + "/console", header(response, "Location"))
    assert location == gateway.base + "/console/"


@pytest.mark.parametrize(
    "path",
    [
        "/console/missing.js",
        "/console/static/",
        "/console/%2e%2e/setup.cfg",
        "/console/..%2fapi.py",
    ],
)
@pytest_twisted.ensureDeferred
async def test_nothing_but_the_console_files_is_served(gateway, path):
    response, body = await fetch(gateway, path)
    assert response.code == 404, (path, body[:200])


@pytest_twisted.ensureDeferred
async def test_the_data_behind_the_console_wants_the_key(gateway_factory):
    gateway = await gateway_factory(api_key=API_KEY)
    for path in ("/api/v1/devices?limit=1", "/api/v1/status", "/api/v1/devices"):
        response, _ = await fetch(gateway, path)
        assert response.code == 401, path
        response, _ = await fetch(gateway, path, {"Authorization": [f"Bearer {API_KEY}"]})
        assert response.code == 200, path


@pytest_twisted.ensureDeferred
async def test_the_key_never_reaches_the_log(gateway_factory):
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        gateway = await gateway_factory(api_key=API_KEY)
        await gateway.register()
        await gateway.call("GET", "/api/v1/devices?limit=5")
        await gateway.call("GET", "/api/v1/status")
        await gateway.call("GET", "/api/v1/devices", headers={"Authorization": "Bearer wrong"})
        await fetch(gateway, "/console/")
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert seen, "the gateway logged nothing at all"
    assert not [event for event in seen if API_KEY in repr(event)]


# -- paging GET /api/v1/devices


async def list_pages(gateway, query: str) -> list[list[str]]:
    pages, after = [], None
    while True:
        path = "/api/v1/devices?" + query + (f"&after={after}" if after else "")
        status, body = await gateway.call("GET", path)
        assert status == 200, body
        pages.append([d["device_id"] for d in body["devices"]])
        after = body["next"]
        if after is None:
            return pages
        assert len(pages) < 50


@pytest_twisted.ensureDeferred
async def test_device_list_without_arguments_is_whole_as_before(gateway):
    registered = [await gateway.register(f"楼{n}") for n in range(3)]
    status, body = await gateway.call("GET", "/api/v1/devices")
    assert status == 200 and set(body) == {"devices"}
    assert [d["device_id"] for d in body["devices"]] == [r["device_id"] for r in registered]
    assert set(body["devices"][0]) >= {"device_id", "location", "online", "last_seen", "node"}


@pytest_twisted.ensureDeferred
async def test_device_list_pages_in_order_and_searches(gateway):
    registered = [
        await gateway.register(f"上海中心{n:02}号" if n % 2 else f"Tower {n}") for n in range(7)
    ]
    ids = [r["device_id"] for r in registered]
    pages = await list_pages(gateway, "limit=3")
    assert pages == [ids[0:3], ids[3:6], ids[6:7]]
    assert await list_pages(gateway, "limit=2&q=" + "上海中心") == [[ids[1], ids[3]], [ids[5]]]
    assert await list_pages(gateway, "q=tower") == [[ids[0], ids[2], ids[4], ids[6]]]
    assert await list_pages(gateway, "q=" + ids[4][-6:].upper()) == [[ids[4]]]


@pytest_twisted.ensureDeferred
async def test_device_list_filters_on_online(gateway):
    registered = [await gateway.register(f"楼{n}") for n in range(5)]
    connected = []
    for creds in registered[1:3]:
        connected.append(await connect_device(gateway.ws_port, creds["device_id"], creds["token"]))
    ids = [r["device_id"] for r in registered]
    try:
        assert await list_pages(gateway, "online=true") == [ids[1:3]]
        assert await list_pages(gateway, "online=false&limit=2") == [[ids[0], ids[3]], [ids[4]]]
        status, body = await gateway.call("GET", "/api/v1/devices?online=1")
        assert all(d["online"] and d["node"] == "test-node" for d in body["devices"])
    finally:
        for device in connected:
            await device.close()


@pytest.mark.parametrize(
    "query, code",
    [
        ("limit=0", "bad_limit"),
        ("limit=1001", "bad_limit"),
        ("limit=ten", "bad_limit"),
        ("online=maybe", "bad_online"),
        ("after=dev_123", "bad_after"),
        ("after=nan~dev_1", "bad_after"),
        ("after=12.5~", "bad_after"),
        ("q=" + "x" * 201, "bad_q"),
        ("q=%ff", "bad_q"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_device_list_refuses_bad_paging_arguments(gateway, query, code):
    status, body = await gateway.call("GET", "/api/v1/devices?" + query)
    assert (status, body["error"]) == (400, code)


class Everyone:
    """Presence where the devices in ``online`` are connected."""

    def __init__(self, online):
        self.online = set(online)

    def holders(self, device_ids):
        from twisted.internet.defer import succeed

        return succeed({d: Holder("node-a", "s", 1.0) for d in device_ids if d in self.online})


@pytest_twisted.ensureDeferred
async def test_a_sparse_online_filter_answers_a_short_page_and_goes_on(monkeypatch):
    """One request scans a bounded part of the fleet; ``next`` carries on from there."""
    monkeypatch.setattr(device_pages, "STORE_CHUNK", 3)
    monkeypatch.setattr(device_pages, "MAX_STORE_CALLS", 2)
    store = MemoryDeviceStore()
    for n in range(20):
        await store.add_device(Device(f"dev_{n:02}", "x", "h", created=float(n)))
    presence = Everyone(["dev_01", "dev_17"])
    devices, _, cursor = await device_pages.page_of_devices(store, presence, None, 10, None, True)
    assert [d.device_id for d in devices] == ["dev_01"] and cursor is not None
    found = ["dev_01"]
    while cursor is not None:
        after = device_pages.decode_cursor(cursor)
        devices, holders, cursor = await device_pages.page_of_devices(
            store, presence, after, 10, None, True
        )
        found += [d.device_id for d in devices]
        assert set(holders) == {d.device_id for d in devices}
    assert found == ["dev_01", "dev_17"]


@pytest_twisted.ensureDeferred
async def test_a_filtered_page_stops_when_its_time_is_up():
    store = MemoryDeviceStore()
    for n in range(1000):
        await store.add_device(Device(f"dev_{n:04}", "x", "h", created=float(n)))
    ticks = iter(range(1000))
    devices, _, cursor = await device_pages.page_of_devices(
        store, Everyone([]), None, 50, None, True, now=lambda: next(ticks) * 0.15
    )
    # Started at 0; 0.15 after one chunk, 0.3 after the second: past the 0.2 s budget.
    assert devices == [] and cursor is not None
    assert device_pages.decode_cursor(cursor)[1] == f"dev_{2 * device_pages.STORE_CHUNK - 1:04}"


def test_cursors_survive_the_round_trip_exactly():
    position = (1764576000.123456789, "dev_0011aa")
    assert device_pages.decode_cursor(device_pages.encode_cursor(position)) == position


# -- node status


class Sessions:
    count = 0

    def __call__(self) -> int:
        return self.count


def node_status(store=None, sink=None):
    clock, metrics, sessions = Clock(), Metrics("node-a"), Sessions()
    status = NodeStatus(
        store or MemoryDeviceStore(),
        metrics,
        sink,
        "node-a",
        clock,
        sessions,
        tick=1.0,
        sample_every=60.0,
    )
    status.startService()
    return status, clock, metrics, sessions


@pytest_twisted.ensureDeferred
async def test_node_status_samples_each_minute_what_happened_in_it():
    status, clock, metrics, sessions = node_status()
    for _ in range(3):
        metrics.handshake["accepted"].inc()
    metrics.offline.labels(OFFLINE_CLOSED).inc()
    sessions.count = 2
    clock.pump([1.0] * 60)
    metrics.handshake["accepted"].inc()
    sessions.count = 3
    clock.pump([1.0] * 60)
    report = await status.report()
    assert [(s["online"], s["connects"], s["disconnects"]) for s in report["history"]] == [
        (2, 3, 1),
        (3, 1, 0),
    ]
    assert report["history"][1]["ts"] - report["history"][0]["ts"] == 60000
    assert report["sessions"] == 3 and report["node_id"] == "node-a"
    assert report["store"] == {"name": "memory", "ok": True, "latency_ms": 0.0, "error": None}
    assert report["webhooks"] is None
    status.stopService()
    assert not clock.getDelayedCalls()


@pytest_twisted.ensureDeferred
async def test_node_status_measures_how_late_the_reactor_runs_its_timer():
    status, clock, _, _ = node_status()
    clock.advance(1.0)
    assert status.lag == 0.0
    clock.advance(1.25)  # the reactor was busy for a quarter second past the tick
    report = await status.report()
    assert report["reactor"] == {"lag_ms": 250.0, "max_lag_ms": 250.0}
    clock.pump([1.0] * 60)
    assert status.samples[-1]["max_lag_ms"] == 250.0
    report = await status.report()
    assert report["reactor"]["lag_ms"] == 0.0
    status.stopService()


@pytest_twisted.ensureDeferred
async def test_node_status_reports_a_store_that_does_not_answer():
    store = MemoryDeviceStore()
    store.available = False
    status, *_ = node_status(store)
    report = await status.report()
    assert report["store"]["ok"] is False and "switched off" in report["store"]["error"]
    status.stopService()


@pytest_twisted.ensureDeferred
async def test_node_status_keeps_sampling_when_a_sample_fails():
    status, clock, metrics, sessions = node_status()

    def broken():
        raise RuntimeError("registry gone")

    status._sessions = broken
    clock.pump([1.0] * 61)
    assert not status.samples
    status._sessions = sessions
    clock.pump([1.0] * 60)
    assert len(status.samples) == 1
    status.stopService()


@pytest_twisted.ensureDeferred
async def test_status_endpoint_reports_this_node(gateway):
    creds = await gateway.register()
    device = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    try:
        status, body = await gateway.call("GET", "/api/v1/status")
    finally:
        await device.close()
    assert status == 200
    assert body["node_id"] == "test-node" and body["sessions"] == 1
    assert body["store"]["ok"] is True and body["store"]["name"] == "sqlite"
    assert body["version"] == elevgw.__version__
    assert isinstance(body["history"], list) and "lag_ms" in body["reactor"]
