"""Commands through the API over real HTTP and WebSocket, on SQLite and on a real Redis:
acks, waits, queues while offline, expiry, at-least-once redelivery, caps, collapse, cancel."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater

from images import tiny_png
from test_webhooks_gateway import SECRET, backend  # noqa: F401 (a fixture)
from wsclient import connect_device, online_device

pytest_plugins = ["redis_support"]


@pytest.fixture(params=["sqlite", "redis"])
def start(request, gateway_factory, tmp_path):
    """Start gateways on the parametrized store with ``await start(**settings)``; every one
    started by a test shares the same data."""
    store = {"sqlite": f"sqlite:{tmp_path / 'commands.sqlite3'}"}.get(request.param)
    if store is None:
        store = request.getfixturevalue("redis_url")
    return lambda **settings: gateway_factory(store=store, **settings)


async def registered(gateway):
    creds = await gateway.register()
    return creds["device_id"], creds


async def connect(gateway, creds):
    return await connect_device(gateway.ws_port, creds["device_id"], creds["token"])


async def commands_received(device, count):
    return [await device.frame() for _ in range(count)]


async def nothing_more(device):
    """The device got no frame but the pong of the heartbeat it sends now."""
    assert (await device.request({"type": "heartbeat"}))["type"] == "pong"
    assert device.pending_frames() == 0


def post(gateway, device_id, body):
    return gateway.call("POST", f"/api/v1/devices/{device_id}/commands", body)


async def sleep(seconds):
    await deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_an_ack_of_the_snapshot_command_is_a_receipt_and_the_image_answers(start):
    gateway = await start()
    device_id, device = await online_device(gateway)
    waiting = ensureDeferred(gateway.call("GET", f"/api/v1/devices/remote/{device_id}/snapshot"))
    command = await device.frame()
    assert command["payload"] == "snapshot"
    device.send({"type": "ack", "id": command["id"], "payload": "ok"})
    assert (await device.request({"type": "heartbeat"}))["type"] == "pong"
    assert not waiting.called
    device.send(
        {"type": "snapshot", "id": command["id"], "payload": base64.b64encode(tiny_png()).decode()}
    )
    assert (await device.frame())["type"] == "ack"
    status, body = await waiting
    assert status == 200, body
    assert body["content_type"] == "image/png" and body["url"]
    await device.close()


@pytest_twisted.ensureDeferred
async def test_wait_holds_the_call_until_the_device_acks(start):
    gateway = await start()
    device_id, device = await online_device(gateway)
    call = ensureDeferred(post(gateway, device_id, {"command": "VOLUME", "data": 3, "wait": 5}))
    frame = await device.frame()
    assert frame["payload"] == "VOLUME" and frame["data"] == 3
    assert not call.called
    device.send({"type": "ack", "id": frame["id"], "payload": {"volume": 3}})
    status, body = await call
    assert (status, body) == (200, {"id": frame["id"], "state": "acked", "result": {"volume": 3}})
    status, record = await gateway.call(
        "GET", f"/api/v1/devices/{device_id}/commands/{body['id']}"
    )
    assert status == 200
    assert record["state"] == "acked" and record["data"] == 3 and record["command"] == "VOLUME"
    assert record["created"] <= record["updated"]
    await device.close()


@pytest_twisted.ensureDeferred
async def test_an_ack_with_an_error_fails_the_command(start):
    gateway = await start()
    device_id, device = await online_device(gateway)
    call = ensureDeferred(post(gateway, device_id, {"command": "UPGRADE", "wait": 5}))
    frame = await device.frame()
    device.send({"type": "ack", "id": frame["id"], "error": "disk full"})
    status, body = await call
    assert status == 200
    assert body["state"] == "failed" and body["result"] == {"error": "disk full", "payload": None}
    await device.close()


@pytest_twisted.ensureDeferred
async def test_a_wait_without_an_ack_times_out_and_the_command_with_it(start):
    gateway = await start()
    device_id, device = await online_device(gateway)
    status, body = await post(gateway, device_id, {"command": "REBOOT", "wait": 0.3})
    assert status == 504 and body["error"] == "device_timeout"
    assert body["state"] == "timed_out" and body["id"].startswith("cmd_")
    frame = await device.frame()
    device.send({"type": "ack", "id": frame["id"], "payload": "late"})
    await nothing_more(device)
    _, record = await gateway.call("GET", f"/api/v1/devices/{device_id}/commands/{body['id']}")
    assert record["state"] == "timed_out" and record["result"] is None
    await device.close()


@pytest_twisted.ensureDeferred
async def test_a_device_disconnecting_releases_the_wait_at_once(start):
    gateway = await start()
    device_id, device = await online_device(gateway)
    call = ensureDeferred(post(gateway, device_id, {"command": "REBOOT", "wait": 30}))
    await device.frame()
    began = time.monotonic()
    await device.drop()
    status, body = await call
    assert time.monotonic() - began < 5
    assert status == 504 and body["error"] == "device_disconnected"
    assert body["state"] == "timed_out"


@pytest_twisted.ensureDeferred
async def test_a_queued_command_wait_released_on_disconnect_stays_pending(start):
    gateway = await start()
    device_id, creds = await registered(gateway)
    device = await connect(gateway, creds)
    call = ensureDeferred(post(gateway, device_id, {"command": "A", "wait": 30, "ttl": 60}))
    first = await device.frame()
    await device.drop()
    status, body = await call
    assert (status, body["error"], body["state"]) == (504, "device_disconnected", "sent")
    again = await connect(gateway, creds)
    assert (await again.frame())["id"] == first["id"]
    await again.close()


@pytest_twisted.ensureDeferred
async def test_without_ttl_an_offline_device_is_404_and_an_unknown_one_too(start):
    gateway = await start()
    device_id, _ = await registered(gateway)
    status, body = await post(gateway, device_id, {"command": "REBOOT"})
    assert (status, body["error"]) == (404, "device_offline")
    status, body = await post(gateway, "dev_nobody", {"command": "REBOOT", "ttl": 60})
    assert (status, body["error"]) == (404, "unknown_device")


@pytest.mark.parametrize(
    "body, code",
    [
        ({}, "bad_command"),
        ({"command": ""}, "bad_command"),
        ({"command": "X", "wait": 0}, "bad_wait"),
        ({"command": "X", "wait": "5"}, "bad_wait"),
        ({"command": "X", "ttl": -1}, "bad_ttl"),
        ({"command": "X", "ttl": True}, "bad_ttl"),
        ({"command": "X", "ttl": 10**9}, "bad_ttl"),
        ({"command": "X", "ttl": 5, "collapse_key": ""}, "bad_collapse_key"),
        ({"command": "X", "collapse_key": "k"}, "bad_collapse_key"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_command_calls_are_400(gateway, body, code):
    status, answer = await post(gateway, "dev_x", body)
    assert (status, answer["error"]) == (400, code) and answer["detail"]


@pytest_twisted.ensureDeferred
async def test_queued_commands_arrive_in_order_on_reconnect_and_once_acked_never_again(start):
    gateway = await start()
    device_id, creds = await registered(gateway)
    ids = []
    for number in range(5):
        status, body = await post(
            gateway, device_id, {"command": "SET", "data": number, "ttl": 60}
        )
        assert status == 202 and body["state"] == "queued"
        ids.append(body["id"])
    device = await connect(gateway, creds)
    frames = await commands_received(device, 5)
    assert [f["id"] for f in frames] == ids and [f["data"] for f in frames] == list(range(5))
    for frame in frames:
        device.send({"type": "ack", "id": frame["id"], "payload": "ok"})
    await nothing_more(device)
    await device.close()
    again = await connect(gateway, creds)
    await nothing_more(again)
    _, listed = await gateway.call("GET", f"/api/v1/devices/{device_id}/commands")
    assert [(c["id"], c["state"]) for c in listed["commands"]] == [(i, "acked") for i in ids]
    await again.close()


@pytest_twisted.ensureDeferred
async def test_sent_but_unacked_commands_are_sent_again_on_reconnect(start):
    gateway = await start()
    device_id, creds = await registered(gateway)
    device = await connect(gateway, creds)
    status, first = await post(gateway, device_id, {"command": "A", "ttl": 60})
    assert (status, first["state"]) == (202, "sent")
    _, second = await post(gateway, device_id, {"command": "B", "ttl": 60})
    frames = await commands_received(device, 2)
    device.send({"type": "ack", "id": frames[1]["id"]})
    await nothing_more(device)
    await device.drop()
    again = await connect(gateway, creds)
    resent = await again.frame()
    assert resent == frames[0]
    await nothing_more(again)
    await again.close()


@pytest_twisted.ensureDeferred
async def test_a_command_past_its_ttl_expires_visibly_and_is_never_delivered(backend, start):  # noqa: F811
    gateway = await start(backend_url=backend.url, webhook_secret=SECRET)
    device_id, creds = await registered(gateway)
    _, stale = await post(gateway, device_id, {"command": "OLD", "ttl": 0.2})
    _, fresh = await post(gateway, device_id, {"command": "NEW", "ttl": 60})
    await backend.wait_for_requests(1)  # the expiry pass runs every second
    event = backend.requests[0]
    assert event.path == "/api/device/command"
    assert {k: event.json[k] for k in ("device_id", "id", "command", "state", "result")} == {
        "device_id": device_id,
        "id": stale["id"],
        "command": "OLD",
        "state": "expired",
        "result": None,
    }
    assert isinstance(event.json["seq"], int) and isinstance(event.json["ts"], int)
    signature = hmac.new(SECRET.encode(), event.body, hashlib.sha256).hexdigest()
    assert event.headers["x-elevgw-signature"] == "sha256=" + signature
    _, record = await gateway.call("GET", f"/api/v1/devices/{device_id}/commands/{stale['id']}")
    assert record["state"] == "expired"
    device = await connect(gateway, creds)
    assert (await device.frame())["id"] == fresh["id"]
    await nothing_more(device)
    await device.close()


@pytest_twisted.ensureDeferred
async def test_acks_raise_the_command_webhook(backend, start):  # noqa: F811
    gateway = await start(backend_url=backend.url)
    device_id, device = await online_device(gateway)
    await backend.wait_for_requests(1)  # online
    _, body = await post(gateway, device_id, {"command": "PING", "ttl": 60})
    frame = await device.frame()
    device.send({"type": "ack", "id": frame["id"], "payload": [1, 2]})
    await backend.wait_for_requests(2)
    assert backend.requests[1].path == "/api/device/command"
    assert backend.requests[1].json["state"] == "acked"
    assert backend.requests[1].json["result"] == [1, 2]
    assert backend.requests[1].json["id"] == body["id"]
    await device.close()


@pytest_twisted.ensureDeferred
async def test_the_queue_survives_a_gateway_restart(start):
    first = await start()
    device_id, creds = await registered(first)
    _, queued = await post(first, device_id, {"command": "KEEP", "ttl": 60})
    device = await connect(first, creds)
    unacked = await device.frame()
    _, later = await post(first, device_id, {"command": "LATER", "ttl": 60})
    await device.frame()
    await first.service.stopService()
    second = await start()
    device = await connect(second, creds)
    frames = await commands_received(device, 2)
    assert [f["id"] for f in frames] == [queued["id"], later["id"]]
    assert frames[0] == unacked
    await device.close()


@pytest_twisted.ensureDeferred
async def test_past_the_cap_a_device_gets_429(start):
    gateway = await start(command_queue_size=2)
    device_id, creds = await registered(gateway)
    for _ in range(2):
        assert (await post(gateway, device_id, {"command": "X", "ttl": 60}))[0] == 202
    status, body = await post(gateway, device_id, {"command": "X", "ttl": 60})
    assert (status, body["error"]) == (429, "queue_full")
    other, _ = await registered(gateway)
    assert (await post(gateway, other, {"command": "X", "ttl": 60}))[0] == 202


@pytest_twisted.ensureDeferred
async def test_a_collapse_key_replaces_the_queued_command(start):
    gateway = await start()
    device_id, creds = await registered(gateway)
    _, old = await post(
        gateway, device_id, {"command": "VOL", "data": 1, "ttl": 60, "collapse_key": "v"}
    )
    _, other = await post(gateway, device_id, {"command": "DIM", "ttl": 60, "collapse_key": "d"})
    _, new = await post(
        gateway, device_id, {"command": "VOL", "data": 2, "ttl": 60, "collapse_key": "v"}
    )
    _, record = await gateway.call("GET", f"/api/v1/devices/{device_id}/commands/{old['id']}")
    assert record["state"] == "superseded"
    device = await connect(gateway, creds)
    frames = await commands_received(device, 2)
    assert [f["id"] for f in frames] == [other["id"], new["id"]]
    await nothing_more(device)
    await device.close()


@pytest_twisted.ensureDeferred
async def test_a_canceled_command_is_not_delivered_and_cannot_be_canceled_twice(start):
    gateway = await start()
    device_id, creds = await registered(gateway)
    _, body = await post(gateway, device_id, {"command": "X", "ttl": 60})
    path = f"/api/v1/devices/{device_id}/commands/{body['id']}"
    status, record = await gateway.call("DELETE", path)
    assert (status, record["state"]) == (200, "canceled")
    status, again = await gateway.call("DELETE", path)
    assert (status, again["error"]) == (409, "command_finished")
    status, unknown = await gateway.call("DELETE", f"/api/v1/devices/{device_id}/commands/cmd_x")
    assert (status, unknown["error"]) == (404, "unknown_command")
    device = await connect(gateway, creds)
    await nothing_more(device)
    await device.close()


@pytest_twisted.ensureDeferred
async def test_commands_sent_with_api_send_are_listed_and_acked(start):
    gateway = await start()
    device_id, device = await online_device(gateway)
    _, sent = await gateway.call("POST", "/api/send", {"device_id": device_id, "command": "R"})
    frame = await device.frame()
    _, record = await gateway.call("GET", f"/api/v1/devices/{device_id}/commands/{sent['id']}")
    assert record["state"] == "sent"
    device.send({"type": "ack", "id": frame["id"], "payload": 7})
    await nothing_more(device)
    await sleep(0.05)
    _, listed = await gateway.call("GET", f"/api/v1/devices/{device_id}/commands")
    assert [(c["id"], c["state"], c["result"]) for c in listed["commands"]] == [
        (sent["id"], "acked", 7)
    ]
    await device.close()


@pytest_twisted.ensureDeferred
async def test_commands_sent_just_before_a_shutdown_are_still_recorded(start):
    first = await start()
    device_id, device = await online_device(first)
    _, sent = await first.call("POST", "/api/send", {"device_id": device_id, "command": "R"})
    await first.service.stopService()
    second = await start()
    status, record = await second.call("GET", f"/api/v1/devices/{device_id}/commands/{sent['id']}")
    assert (status, record["state"]) == (200, "sent")


@pytest_twisted.ensureDeferred
async def test_metrics_count_commands_by_state_and_the_queue_depth(start):
    gateway = await start()
    device_id, _ = await registered(gateway)
    for _ in range(2):
        status, body = await post(gateway, device_id, {"command": "X", "ttl": 60})
        assert status == 202, body
    deadline = time.monotonic() + 10
    while True:  # the expiry pass counts the queue once a second
        status, text = await gateway.call("GET", "/metrics")
        assert status == 200
        if b"elevgw_command_queue_depth 2.0" in text or time.monotonic() > deadline:
            break
        await sleep(0.2)
    lines = [line for line in text.splitlines() if line.startswith(b"elevgw_command")]
    assert b"elevgw_command_queue_depth 2.0" in lines, lines
    assert b'elevgw_command_states_total{state="queued"} 2.0' in lines, lines
    assert b"elevgw_command_waits 0.0" in lines, lines
