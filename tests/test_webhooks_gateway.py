"""Webhooks from a running gateway to a real HTTP backend on loopback."""

import hashlib
import hmac
import time

import pytest_twisted
from twisted.internet import endpoints, reactor
from twisted.internet.defer import ensureDeferred

from images import tiny_png
from test_metrics import scrape, value
from webhook_receiver import HANG, Receiver, TrackingSite
from wsclient import connect_device

SECRET = "webhook-secret"


@pytest_twisted.async_yield_fixture
async def backend():
    """A webhook receiver; tests name it before ``gateway_factory`` so gateways stop first
    (and close their pooled connections to it) before it stops listening."""
    receiver = Receiver()
    site = TrackingSite(receiver)
    port = await endpoints.serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(site)
    receiver.url = "http://127.0.0.1:{}".format(port.getHost().port)
    yield receiver
    await port.stopListening()
    for connection in list(site.open_connections):
        await connection


def statuses(receiver, device_id):
    return [
        (body["status"], body["reason"]) for body in receiver.bodies(device_id) if "status" in body
    ]


async def gateway_with(gateway_factory, backend, **settings):
    return await gateway_factory(backend_url=backend.url, webhook_secret=SECRET, **settings)


@pytest_twisted.ensureDeferred
async def test_connect_disconnect_cycles_arrive_in_order_with_growing_seq(
    backend, gateway_factory
):
    gateway = await gateway_with(gateway_factory, backend)
    creds = await gateway.register()
    for _ in range(3):
        device = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
        await device.request({"type": "heartbeat"})
        await device.close()
    await backend.wait_for_requests(6)
    assert (
        statuses(backend, creds["device_id"])
        == [("online", "connected"), ("offline", "closed")] * 3
    )
    bodies = backend.bodies(creds["device_id"])
    seqs = [body["seq"] for body in bodies]
    assert seqs == sorted(seqs) and len(set(seqs)) == 6
    assert all(isinstance(body["ts"], int) for body in bodies)
    for request in backend.requests:
        assert request.path == "/api/device/status"
        expected = hmac.new(SECRET.encode(), request.body, hashlib.sha256).hexdigest()
        assert request.headers["x-elevgw-signature"] == "sha256=" + expected
        assert request.headers["x-elevgw-event-id"]
    assert len({r.headers["x-elevgw-event-id"] for r in backend.requests}) == 6
    samples = await scrape(gateway)
    assert value(samples, "elevgw_webhook_deliveries_total", outcome="delivered") == 6
    assert value(samples, "elevgw_webhook_seconds_count", outcome="delivered") == 6
    assert value(samples, "elevgw_webhook_queue") == 0


@pytest_twisted.ensureDeferred
async def test_takeover_emits_no_offline(backend, gateway_factory):
    gateway = await gateway_with(gateway_factory, backend)
    creds = await gateway.register()
    first = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    second = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    await first.closed
    await second.close()
    await backend.wait_for_requests(3)
    assert statuses(backend, creds["device_id"]) == [
        ("online", "connected"),
        ("online", "takeover"),
        ("offline", "closed"),
    ]


@pytest_twisted.ensureDeferred
async def test_silent_device_goes_offline_with_reason_timeout(backend, gateway_factory):
    gateway = await gateway_with(
        gateway_factory, backend, heartbeat_timeout=0.3, sweep_interval=0.1
    )
    creds = await gateway.register()
    device = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    code, _ = await device.closed
    assert code == 4000
    await backend.wait_for_requests(2)
    assert statuses(backend, creds["device_id"]) == [
        ("online", "connected"),
        ("offline", "timeout"),
    ]


@pytest_twisted.ensureDeferred
async def test_revoked_device_goes_offline_with_reason_revoked(backend, gateway_factory):
    gateway = await gateway_with(gateway_factory, backend)
    creds = await gateway.register()
    device = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    await gateway.call("DELETE", "/api/v1/devices/" + creds["device_id"])
    await device.closed
    await backend.wait_for_requests(2)
    assert statuses(backend, creds["device_id"])[-1] == ("offline", "revoked")


@pytest_twisted.ensureDeferred
async def test_snapshot_callback_carries_the_url_and_the_request_id(backend, gateway_factory):
    gateway = await gateway_with(gateway_factory, backend)
    creds = await gateway.register()
    device = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    waiting = ensureDeferred(
        gateway.call("GET", "/api/v1/devices/remote/{}/snapshot".format(creds["device_id"]))
    )
    command = await device.frame()
    device.send_binary(tiny_png())
    status, body = await waiting
    assert status == 200
    await backend.wait_for_requests(2)
    [callback] = [r for r in backend.requests if r.path.endswith("/snapshot/callback")]
    assert callback.path == "/api/v1/devices/remote/snapshot/callback"
    assert callback.json["url"] == body["url"]
    assert callback.json["request_id"] == command["id"]
    assert callback.json["device_id"] == creds["device_id"]
    await device.close()


@pytest_twisted.ensureDeferred
async def test_a_hanging_backend_does_not_slow_heartbeats_or_the_api(backend, gateway_factory):
    backend.default = HANG
    gateway = await gateway_with(gateway_factory, backend)
    devices = []
    for number in range(5):
        creds = await gateway.register("L{}".format(number))
        devices.append(await connect_device(gateway.ws_port, creds["device_id"], creds["token"]))
    await backend.wait_for_requests(5)  # every online event is stuck at the backend
    round_trips = []
    for _ in range(20):
        for device in devices:
            started = time.monotonic()
            assert (await device.request({"type": "heartbeat"}))["type"] == "pong"
            round_trips.append(time.monotonic() - started)
    assert max(round_trips) < 0.5, max(round_trips)
    started = time.monotonic()
    status, _ = await gateway.call("GET", "/api/v1/devices")
    assert status == 200 and time.monotonic() - started < 0.5
    for device in devices:
        await device.close()


@pytest_twisted.ensureDeferred
async def test_shutdown_delivers_the_offline_events_before_exit(backend, gateway_factory):
    gateway = await gateway_with(gateway_factory, backend, drain_timeout=5.0)
    device_ids = []
    devices = []
    for number in range(3):
        creds = await gateway.register("L{}".format(number))
        device_ids.append(creds["device_id"])
        devices.append(await connect_device(gateway.ws_port, creds["device_id"], creds["token"]))
    await backend.wait_for_requests(3)
    await gateway.service.stopService()
    for device_id in device_ids:
        assert statuses(backend, device_id) == [("online", "connected"), ("offline", "shutdown")]
    for device in devices:
        code, _ = await device.closed
        assert code == 1001


@pytest_twisted.ensureDeferred
async def test_shutdown_with_a_dead_backend_ends_within_the_drain_timeout(
    backend, gateway_factory
):
    backend.default = HANG
    gateway = await gateway_with(gateway_factory, backend, drain_timeout=1.0)
    creds = await gateway.register()
    await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    started = time.monotonic()
    await gateway.service.stopService()
    assert time.monotonic() - started < 3.0
