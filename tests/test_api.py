"""The northbound API over real HTTP: commands, snapshot requests, validation, the API key."""

import base64
import gc
import json

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher

from elevgw.north.api import APIRequest
from images import tiny_jpeg, tiny_png
from wsclient import online_device


@pytest_twisted.ensureDeferred
async def test_send_writes_the_command_to_the_device(gateway):
    device_id, device = await online_device(gateway)
    status, body = await gateway.call(
        "POST", "/api/send", {"device_id": device_id, "command": "REBOOT", "data": {"delay": 3}}
    )
    assert status == 200 and body["ok"] is True and body["id"].startswith("cmd_")
    frame = await device.frame()
    assert frame == {
        "type": "command",
        "id": body["id"],
        "payload": "REBOOT",
        "data": {"delay": 3},
    }
    device.send({"type": "ack", "id": body["id"], "payload": {"ok": True}})
    assert (await device.request({"type": "heartbeat"}))["type"] == "pong"
    await device.close()


@pytest.mark.parametrize(
    "body, status, code",
    [
        ({"device_id": "dev_nobody", "command": "REBOOT"}, 404, "unknown_device"),
        ({"command": "REBOOT"}, 400, "bad_device_id"),
        ({"device_id": "dev_x"}, 400, "bad_command"),
        ({"device_id": "dev_x", "command": ""}, 400, "bad_command"),
        ({"device_id": 5, "command": "REBOOT"}, 400, "bad_device_id"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_send_refuses_what_it_cannot_deliver(gateway, body, status, code):
    got_status, got = await gateway.call("POST", "/api/send", body)
    assert (got_status, got["error"]) == (status, code)
    assert got["detail"]


@pytest_twisted.ensureDeferred
async def test_send_to_a_known_device_that_is_not_connected_is_device_offline(gateway):
    device_id, device = await online_device(gateway)
    await device.close()
    for _ in range(100):  # the gateway sees the close after the client does
        if not len(gateway.service.gateway.registry):
            break
        await deferLater(reactor, 0.01)
    status, body = await gateway.call(
        "POST", "/api/send", {"device_id": device_id, "command": "REBOOT"}
    )
    assert (status, body["error"]) == (404, "device_offline")
    # Revoked is unknown again.
    await gateway.call("DELETE", f"/api/v1/devices/{device_id}")
    status, body = await gateway.call(
        "POST", "/api/send", {"device_id": device_id, "command": "REBOOT"}
    )
    assert (status, body["error"]) == (404, "unknown_device")


@pytest_twisted.ensureDeferred
async def test_send_to_a_connected_device_does_not_ask_the_store(gateway, monkeypatch):
    device_id, device = await online_device(gateway)

    def no_store(*args, **kwargs):
        raise AssertionError("the store was asked")

    monkeypatch.setattr(gateway.service.store, "get_device", no_store)
    status, body = await gateway.call(
        "POST", "/api/send", {"device_id": device_id, "command": "REBOOT"}
    )
    assert status == 200 and body["ok"] is True
    await device.close()


@pytest_twisted.ensureDeferred
async def test_send_to_an_offline_device_while_the_store_is_down_is_device_offline(
    gateway, monkeypatch
):
    from twisted.internet.defer import fail

    from elevgw.stores.interfaces import StoreUnavailable

    monkeypatch.setattr(
        gateway.service.store, "get_device", lambda device_id: fail(StoreUnavailable("down"))
    )
    status, body = await gateway.call(
        "POST", "/api/send", {"device_id": "dev_somebody", "command": "REBOOT"}
    )
    assert (status, body["error"]) == (404, "device_offline")


@pytest.mark.parametrize(
    "raw, status, code",
    [
        (b"", 400, "bad_json"),
        (b"{not json", 400, "bad_json"),
        (b"[1]", 400, "bad_json"),
        (b'{"location": "x' + b"y" * 70000 + b'"}', 413, "body_too_large"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_bodies_get_json_errors(gateway, raw, status, code):
    got_status, got = await gateway.call("POST", "/api/v1/devices/register", raw=raw)
    assert (got_status, got["error"]) == (status, code)


@pytest.mark.parametrize("location", [None, "", "   ", 12, "x" * 201])
@pytest_twisted.ensureDeferred
async def test_register_wants_a_location(gateway, location):
    status, body = await gateway.call("POST", "/api/v1/devices/register", {"location": location})
    assert (status, body["error"]) == (400, "bad_location")
    status, body = await gateway.call("GET", "/api/v1/devices")
    assert body == {"devices": []}


@pytest_twisted.ensureDeferred
async def test_unknown_routes_and_methods_answer_json(gateway):
    status, body = await gateway.call("GET", "/nowhere")
    assert (status, body["error"]) == (404, "not_found")
    status, body = await gateway.call("PUT", "/api/send", {})
    assert (status, body["error"]) == (405, "method_not_allowed")


@pytest_twisted.ensureDeferred
async def test_snapshot_of_an_offline_device_is_404(gateway):
    creds = await gateway.register()
    status, body = await gateway.call(
        "GET", "/api/v1/devices/remote/{}/snapshot".format(creds["device_id"])
    )
    assert (status, body["error"]) == (404, "device_offline")
    status, body = await gateway.call("GET", "/api/v1/devices/remote/dev_nobody/snapshot")
    assert (status, body["error"]) == (404, "unknown_device")


@pytest_twisted.ensureDeferred
async def test_snapshot_that_never_comes_is_504_and_a_late_one_is_still_stored(gateway):
    device_id, device = await online_device(gateway)
    status, body = await gateway.call(
        "GET", f"/api/v1/devices/remote/{device_id}/snapshot?timeout=0.2"
    )
    assert (status, body["error"]) == (504, "device_timeout")
    command = await device.frame()
    assert gateway.service.gateway.commands.pending_count() == 0
    device.send(
        {"type": "snapshot", "id": command["id"], "payload": base64.b64encode(tiny_png()).decode()}
    )
    ack = await device.frame()
    assert ack["type"] == "ack" and ack["url"]
    await device.close()


@pytest.mark.parametrize("timeout", ["0", "-1", "abc", "121"])
@pytest_twisted.ensureDeferred
async def test_snapshot_timeout_must_be_sane(gateway, timeout):
    status, body = await gateway.call(
        "GET", "/api/v1/devices/remote/dev_x/snapshot?timeout=" + timeout
    )
    assert (status, body["error"]) == (400, "bad_timeout")


@pytest_twisted.ensureDeferred
async def test_snapshot_without_an_id_answers_the_oldest_request(gateway):
    device_id, device = await online_device(gateway)
    path = f"/api/v1/devices/remote/{device_id}/snapshot"
    first = ensureDeferred(gateway.call("GET", path))
    first_command = await device.frame()
    second = ensureDeferred(gateway.call("GET", path))
    second_command = await device.frame()
    assert first_command["id"] != second_command["id"]
    device.send_binary(tiny_jpeg())
    await device.frame()
    status, body = await first
    assert status == 200 and body["content_type"] == "image/jpeg"
    assert not second.called
    device.send(
        {
            "type": "snapshot",
            "id": second_command["id"],
            "payload": base64.b64encode(tiny_png()).decode(),
        }
    )
    status, body = await second
    assert status == 200 and body["content_type"] == "image/png"
    await device.close()


@pytest_twisted.ensureDeferred
async def test_device_disconnecting_during_a_snapshot_request_is_504(gateway):
    device_id, device = await online_device(gateway)
    waiting = ensureDeferred(gateway.call("GET", f"/api/v1/devices/remote/{device_id}/snapshot"))
    await device.frame()
    await device.drop()
    status, body = await waiting
    assert (status, body["error"]) == (504, "device_disconnected")


@pytest_twisted.ensureDeferred
async def test_a_device_that_answers_garbage_gets_an_error_and_the_caller_502(gateway):
    device_id, device = await online_device(gateway)
    waiting = ensureDeferred(gateway.call("GET", f"/api/v1/devices/remote/{device_id}/snapshot"))
    command = await device.frame()
    device.send(
        {"type": "snapshot", "id": command["id"], "payload": base64.b64encode(b"text").decode()}
    )
    assert (await device.frame())["error"] == "not_an_image"
    status, body = await waiting
    assert (status, body["error"]) == (502, "bad_snapshot")
    await device.close()


@pytest_twisted.ensureDeferred
async def test_api_key_guards_every_route_but_healthz(gateway_factory):
    gateway = await gateway_factory(api_key="s3cret")
    status, _ = await gateway.call("GET", "/healthz", headers={"Authorization": "Bearer nope"})
    assert status == 200
    for method, path in [
        ("GET", "/api/v1/devices"),
        ("POST", "/api/v1/devices/register"),
        ("POST", "/api/send"),
        ("GET", "/snapshots/x/y.png"),
    ]:
        status, body = await gateway.call(
            method, path, {}, headers={"Authorization": "Bearer nope"}
        )
        assert (status, body["error"]) == (401, "unauthorized"), path
        status, body = await gateway.call(
            method, path, {}, headers={"Authorization": "Basic czNjcmV0"}
        )
        assert status == 401, path
    status, body = await gateway.call("GET", "/api/v1/devices")
    assert status == 200


class _RawHTTP(Protocol):
    """Everything the server sends until it closes: the answer as it went on the wire."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.done: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason=None) -> None:
        self.done.callback(self.received)


async def raw_post(gateway, path: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    protocol = _RawHTTP(
        b"POST %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json"
        b"\r\nContent-Length: %d\r\n\r\n%s" % (path.encode(), len(data), data)
    )
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", gateway.service.api_port())
    await connectProtocol(endpoint, protocol)
    return await protocol.done


@pytest_twisted.ensureDeferred
async def test_send_is_answered_in_one_write_with_a_length(gateway):
    """``/api/send`` skips Klein: the answer has a Content-Length, not chunked encoding."""
    device_id, device = await online_device(gateway)
    for body, status in (
        ({"device_id": device_id, "command": "REBOOT"}, b"200"),
        ({"command": "REBOOT"}, b"400"),
    ):
        answer = await raw_post(gateway, "/api/send", body)
        head, _, content = answer.partition(b"\r\n\r\n")
        lines = head.lower().split(b"\r\n")
        assert lines[0].split()[1] == status
        assert b"content-length: %d" % len(content) in lines
        assert not any(line.startswith(b"transfer-encoding") for line in lines)
        assert json.loads(content)
    assert (await device.frame())["payload"] == "REBOOT"
    await device.close()


@pytest_twisted.ensureDeferred
async def test_send_leaves_no_garbage_for_the_cyclic_collector(gateway):
    """A command call is freed by reference counting alone (see ``APIResource``)."""
    device_id, device = await online_device(gateway)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for body in (
            {"device_id": device_id, "command": "REBOOT"},
            {"device_id": "dev_nobody", "command": "REBOOT"},
            {"command": "REBOOT"},
        ):
            await gateway.call("POST", "/api/send", body)
        await gateway.call("GET", "/api/v1/devices")  # through Klein: leaves a cycle
        gc.collect()
        requests = [o for o in gc.garbage if isinstance(o, APIRequest)]
    finally:
        gc.set_debug(0)
        del gc.garbage[:]
    assert len(requests) == 1 and requests[0].path == b"/api/v1/devices"
    await device.close()


@pytest_twisted.ensureDeferred
async def test_send_failing_unexpectedly_is_500_without_a_traceback(gateway, monkeypatch):
    device_id, device = await online_device(gateway)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(gateway.service.gateway.commands, "send", broken)
    logged = []
    globalLogPublisher.addObserver(logged.append)
    try:
        status, body = await gateway.call(
            "POST", "/api/send", {"device_id": device_id, "command": "REBOOT"}
        )
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert (status, body["error"]) == (500, "internal_error")
    assert "boom" not in json.dumps(body)
    failures = [e for e in logged if "log_failure" in e]
    assert failures and failures[0]["log_failure"].check(RuntimeError)
    monkeypatch.undo()
    assert (await device.request({"type": "heartbeat"}))["type"] == "pong"
    await device.close()
