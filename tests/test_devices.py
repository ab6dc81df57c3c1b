"""Devices over real WebSockets: admission, takeover, revoke, bad frames, limits, logs, restart."""

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor

from elevgw.core import gateway as gateway_module
from images import tiny_png
from wsclient import connect_device


async def handshake_status(port, query="", headers=None, path="/ws"):
    """The HTTP status a WebSocket handshake gets (101 when admitted)."""
    request_headers = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    request_headers.update(headers or {})
    url = "http://127.0.0.1:{}{}{}".format(port, path, "?" + query if query else "")
    response = await treq.get(url, headers=request_headers, reactor=reactor, timeout=5)
    if response.code != 101:
        await response.content()
    return response.code


@pytest_twisted.ensureDeferred
async def test_handshake_refusals_are_plain_http_statuses(gateway):
    creds = await gateway.register()
    device_id, token = creds["device_id"], creds["token"]
    port = gateway.ws_port
    assert await handshake_status(port) == 401
    assert await handshake_status(port, "device_id=" + device_id) == 401
    assert await handshake_status(port, f"device_id={device_id}&token=") == 401
    assert await handshake_status(port, "device_id=dev_nobody&token=" + token) == 401
    assert await handshake_status(port, f"device_id={device_id}&token=wrong") == 401
    assert (
        await handshake_status(port, f"device_id={device_id}&token={token}", path="/other") == 404
    )


@pytest_twisted.ensureDeferred
async def test_a_bearer_header_can_carry_the_token(gateway):
    creds = await gateway.register()
    device = await connect_device(
        gateway.ws_port,
        creds["device_id"],
        "",
        headers={"Authorization": "Bearer " + creds["token"]},
    )
    assert (await device.request({"type": "heartbeat"}))["type"] == "pong"
    await device.close()


@pytest_twisted.ensureDeferred
async def test_store_down_answers_503_and_store_back_admits_again(gateway):
    creds = await gateway.register()
    query = "device_id={}&token={}".format(creds["device_id"], creds["token"])
    await gateway.service.store.stop()
    assert await handshake_status(gateway.ws_port, query) == 503
    status, body = await gateway.call("GET", "/healthz")
    assert status == 503 and body["status"] == "unavailable"
    status, body = await gateway.call("GET", "/api/v1/devices")
    assert (status, body["error"]) == (503, "store_unavailable")
    await gateway.service.store.start()
    device = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    await device.close()


@pytest_twisted.ensureDeferred
async def test_second_connection_takes_over_with_4001(gateway):
    creds = await gateway.register()
    first = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    second = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    code, reason = await first.closed
    assert code == 4001 and "taken over" in reason
    assert (await second.request({"type": "heartbeat"}))["type"] == "pong"
    status, device = await gateway.call("GET", "/api/v1/devices/" + creds["device_id"])
    assert status == 200 and device["online"] is True
    assert gateway.service.gateway.registry.takeovers == 1
    await second.close()


@pytest_twisted.ensureDeferred
async def test_revoking_closes_the_socket_with_4003_and_refuses_the_credentials(gateway):
    creds = await gateway.register()
    device = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    status, body = await gateway.call("DELETE", "/api/v1/devices/" + creds["device_id"])
    assert status == 200 and body["revoked"] is True and body["was_online"] is True
    code, _ = await device.closed
    assert code == 4003
    query = "device_id={}&token={}".format(creds["device_id"], creds["token"])
    assert await handshake_status(gateway.ws_port, query) == 401
    status, body = await gateway.call("GET", "/api/v1/devices/" + creds["device_id"])
    assert (status, body["error"]) == (404, "unknown_device")
    status, body = await gateway.call("DELETE", "/api/v1/devices/" + creds["device_id"])
    assert status == 404


@pytest_twisted.ensureDeferred
async def test_rotating_the_token_retires_the_old_one(gateway):
    creds = await gateway.register()
    status, body = await gateway.call(
        "POST", "/api/v1/devices/{}/token".format(creds["device_id"])
    )
    assert status == 200 and body["token"] != creds["token"]
    old = "device_id={}&token={}".format(creds["device_id"], creds["token"])
    assert await handshake_status(gateway.ws_port, old) == 401
    device = await connect_device(gateway.ws_port, creds["device_id"], body["token"])
    await device.close()
    status, body = await gateway.call("POST", "/api/v1/devices/dev_nobody/token")
    assert (status, body["error"]) == (404, "unknown_device")


BAD_FRAMES = [
    (b"not json at all", "bad_json"),
    (b"\xff\xfe\x00", "bad_json"),
    (b"[1, 2, 3]", "not_an_object"),
    (b'{"payload": "x"}', "missing_type"),
    (b'{"type": "dance"}', "unknown_type"),
    (b'{"type": "log", "device_id": "dev_someone_else", "payload": "x"}', "device_mismatch"),
    (b'{"type": "snapshot", "payload": "%%% not base64"}', "bad_image"),
    (b'{"type": "snapshot", "payload": "aGVsbG8gd29ybGQ="}', "not_an_image"),
]


@pytest_twisted.ensureDeferred
async def test_bad_frames_get_error_frames_and_leave_every_socket_usable(gateway):
    creds, other_creds = await gateway.register(), await gateway.register("B2")
    device = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    other = await connect_device(gateway.ws_port, other_creds["device_id"], other_creds["token"])
    for raw, code in BAD_FRAMES:
        reply = await device.request(raw)
        assert reply["type"] == "error" and reply["error"] == code, (raw, reply)
        assert reply["detail"]
        assert (await other.request({"type": "heartbeat"}))["type"] == "pong"
    device.send_binary(b"GIF89a not what we take")
    reply = await device.frame()
    assert reply["error"] == "not_an_image"
    assert (await device.request({"type": "heartbeat"}))["type"] == "pong"
    assert gateway.service.gateway.registry.get(creds["device_id"]) is not None
    await device.close()
    await other.close()


@pytest_twisted.ensureDeferred
async def test_frame_over_the_size_limit_closes_with_1009(gateway_factory):
    gateway = await gateway_factory(max_message_size=1024)
    creds = await gateway.register()
    device = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    device.send({"type": "log", "payload": "x" * 2000})
    code, reason = await device.closed
    assert code == 1009, reason


@pytest_twisted.ensureDeferred
async def test_logs_are_acked_once_stored_and_listed_newest_first(gateway):
    creds = await gateway.register()
    device = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    for number in range(3):
        ack = await device.request(
            {"type": "log", "id": f"log-{number}", "payload": {"ad": number, "楼": "上海"}}
        )
        assert ack == {"type": "ack", "id": f"log-{number}"}
    device.send({"type": "log", "payload": "no id, no ack"})
    assert (await device.request({"type": "heartbeat"}))["type"] == "pong"
    status, body = await gateway.call("GET", "/api/v1/devices/{}/logs".format(creds["device_id"]))
    assert status == 200
    payloads = [entry["payload"] for entry in body["logs"]]
    assert payloads == [
        "no id, no ack",
        {"ad": 2, "楼": "上海"},
        {"ad": 1, "楼": "上海"},
        {"ad": 0, "楼": "上海"},
    ]
    timestamps = [entry["ts"] for entry in body["logs"]]
    assert timestamps == sorted(timestamps, reverse=True)
    status, body = await gateway.call(
        "GET", "/api/v1/devices/{}/logs?limit=2".format(creds["device_id"])
    )
    assert len(body["logs"]) == 2
    status, body = await gateway.call(
        "GET", "/api/v1/devices/{}/logs?limit=0".format(creds["device_id"])
    )
    assert (status, body["error"]) == (400, "bad_limit")
    status, body = await gateway.call("GET", "/api/v1/devices/dev_nobody/logs")
    assert status == 404
    await device.close()


@pytest_twisted.ensureDeferred
async def test_a_log_that_cannot_be_stored_gets_store_unavailable_not_an_ack(gateway):
    creds = await gateway.register()
    device = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    await gateway.service.store.stop()
    reply = await device.request({"type": "log", "id": "l1", "payload": "lost?"})
    assert (
        reply["type"] == "error" and reply["error"] == "store_unavailable" and reply["id"] == "l1"
    )
    assert (await device.request({"type": "heartbeat"}))["type"] == "pong"
    await gateway.service.store.start()
    assert (await device.request({"type": "log", "id": "l2", "payload": "kept"}))["type"] == "ack"
    await device.close()


@pytest_twisted.ensureDeferred
async def test_restart_keeps_devices_and_logs(gateway_factory, tmp_path):
    first = await gateway_factory()
    creds = await first.register("北京01")
    device = await connect_device(first.ws_port, creds["device_id"], creds["token"])
    await device.request({"type": "log", "id": "a", "payload": "before restart"})
    await first.service.stopService()
    code, _ = await device.closed
    assert code == 1001

    second = await gateway_factory()
    status, body = await second.call("GET", "/api/v1/devices/" + creds["device_id"])
    assert status == 200 and body["location"] == "北京01" and body["online"] is False
    assert body["last_seen"] is not None
    device = await connect_device(second.ws_port, creds["device_id"], creds["token"])
    status, body = await second.call("GET", "/api/v1/devices/{}/logs".format(creds["device_id"]))
    assert [entry["payload"] for entry in body["logs"]] == ["before restart"]
    await device.close()


@pytest_twisted.ensureDeferred
async def test_silent_device_is_closed_with_4000_by_the_running_sweep(gateway_factory):
    gateway = await gateway_factory(heartbeat_timeout=0.3, sweep_interval=0.1)
    creds = await gateway.register()
    device = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    code, _ = await device.closed
    assert code == 4000
    status, body = await gateway.call("GET", "/api/v1/devices/" + creds["device_id"])
    assert body["online"] is False


@pytest_twisted.ensureDeferred
async def test_binary_frame_is_stored_as_a_snapshot(gateway):
    creds = await gateway.register()
    device = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    png = tiny_png()
    device.send_binary(png)
    ack = await device.frame()
    assert ack["type"] == "ack" and ack["id"] is None
    response = await treq.get(ack["url"], reactor=reactor)
    assert await response.content() == png
    await device.close()


@pytest.mark.parametrize(
    "key", ["../elevgw.sqlite3", "..%2Felevgw.sqlite3", "a/../../x.png", "%2e%2e/x.png"]
)
@pytest_twisted.ensureDeferred
async def test_snapshot_keys_cannot_leave_the_folder(gateway, key):
    status, body = await gateway.call("GET", "/snapshots/" + key)
    assert status == 404, body


@pytest_twisted.ensureDeferred
async def test_drain_writes_every_last_seen_before_the_store_stops(gateway_factory, monkeypatch):
    monkeypatch.setattr(gateway_module, "LAST_SEEN_CHUNK", 1)  # one store call per device
    first = await gateway_factory()
    devices = []
    for _ in range(3):
        creds = await first.register()
        devices.append(await connect_device(first.ws_port, creds["device_id"], creds["token"]))
    await first.service.stopService()
    second = await gateway_factory()
    status, body = await second.call("GET", "/api/v1/devices")
    assert status == 200 and len(body["devices"]) == 3
    assert all(d["last_seen"] is not None for d in body["devices"])
