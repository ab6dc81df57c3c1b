"""API input that once made 500s or dropped connections gets a JSON 4xx; limits answer 413,
414 and 503; snapshot files never leave their folder."""

import json
import os

import pytest
import pytest_twisted
from twisted.internet import defer

from elevgw.north.limits import MAX_LINE
from rawclient import metric, raw_request


def status_and_json(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


@pytest_twisted.ensureDeferred
async def test_a_lone_surrogate_in_a_body_is_400_not_500(gateway):
    for path in ("/api/v1/devices/register", "/api/send"):
        raw = b'{"location": "\\ud800", "device_id": "dev_x", "command": "\\udfff"}'
        status, body = await gateway.call("POST", path, raw=raw)
        assert (status, body["error"]) == (400, "bad_json"), (path, body)
    # A surrogate pair is a character like any other.
    status, body = await gateway.call(
        "POST", "/api/v1/devices/register", raw=b'{"location": "lift \\ud83d\\ude00"}'
    )
    assert status == 201 and body["location"] == "lift \U0001f600"


@pytest.mark.parametrize("before", ["9" * 30, str(2**63), "-1", "1e5", "9" * 5000])
@pytest_twisted.ensureDeferred
async def test_logs_before_out_of_range_is_400_not_500(gateway, before):
    creds = await gateway.register()
    status, body = await gateway.call(
        "GET", f"/api/v1/devices/{creds['device_id']}/logs?before={before}"
    )
    assert (status, body["error"]) == (400, "bad_before")


@pytest_twisted.ensureDeferred
async def test_a_body_nested_990_deep_is_400_bad_json(gateway):
    for depth in (40, 990, 30_000):
        raw = b'{"location": ' + b"[" * depth + b"]" * depth + b"}"
        status, body = await gateway.call("POST", "/api/v1/devices/register", raw=raw)
        assert (status, body["error"]) == (400, "bad_json"), depth
        status, body = await gateway.call("POST", "/api/send", raw=raw)
        assert (status, body["error"]) == (400, "bad_json"), depth


@pytest_twisted.ensureDeferred
async def test_a_url_over_16_kib_is_414_not_a_dropped_connection(gateway):
    path = "/api/v1/devices/" + "x" * (MAX_LINE + 10)
    answer = await raw_request(
        gateway.service.api_port(), f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    status, body = status_and_json(answer)
    assert (status, body["error"]) == (414, "url_too_long")
    assert await metric(gateway, "elevgw_limit_hits_total", limit="url_length") == 1


@pytest_twisted.ensureDeferred
async def test_a_header_line_over_16_kib_is_431(gateway):
    answer = await raw_request(
        gateway.service.api_port(),
        b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * (MAX_LINE + 10) + b"\r\n\r\n",
    )
    status, body = status_and_json(answer)
    assert (status, body["error"]) == (431, "header_too_large")


@pytest_twisted.ensureDeferred
async def test_a_declared_body_over_the_limit_is_refused_before_it_is_read(gateway_factory):
    gateway = await gateway_factory(max_body_size=1024)
    head = (
        b"POST /api/v1/devices/register HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n"
    )
    status, body = status_and_json(await raw_request(gateway.service.api_port(), head))
    assert (status, body["error"]) == (413, "body_too_large")
    assert await metric(gateway, "elevgw_limit_hits_total", limit="body_size") == 1


@pytest_twisted.ensureDeferred
async def test_a_chunked_body_over_the_limit_is_413(gateway_factory):
    gateway = await gateway_factory(max_body_size=1024)
    chunk = b"a" * 800
    request = (
        b"POST /api/v1/devices/register HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 3
        + b"0\r\n\r\n"
    )
    status, body = status_and_json(await raw_request(gateway.service.api_port(), request))
    assert (status, body["error"]) == (413, "body_too_large")


@pytest_twisted.ensureDeferred
async def test_a_body_within_the_limit_option_is_taken(gateway_factory):
    gateway = await gateway_factory(max_body_size=200)
    status, _ = await gateway.call("POST", "/api/v1/devices/register", {"location": "a" * 100})
    assert status == 201
    status, body = await gateway.call("POST", "/api/v1/devices/register", {"location": "a" * 300})
    assert (status, body["error"]) == (413, "body_too_large")


@pytest_twisted.ensureDeferred
async def test_calls_waiting_past_the_limit_get_503(gateway_factory):
    gateway = await gateway_factory(max_waiting_calls=2)
    creds = await gateway.register()
    from wsclient import connect_device

    device = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    path = f"/api/v1/devices/remote/{creds['device_id']}/snapshot?timeout=2"
    waiting = [defer.ensureDeferred(gateway.call("GET", path)) for _ in range(2)]
    await device.frame()
    await device.frame()
    status, body = await gateway.call("GET", "/api/v1/devices")
    assert (status, body["error"]) == (503, "busy")
    assert await metric(gateway, "elevgw_limit_hits_total", limit="api_waiting") == 1
    status, _ = await gateway.call("POST", "/api/send", {"device_id": "dev_x", "command": "X"})
    assert status == 404  # /api/send never waits, so it is never refused as busy
    for d in waiting:
        status, _ = await d
        assert status == 504
    status, _ = await gateway.call("GET", "/api/v1/devices")
    assert status == 200
    await device.close()


@pytest_twisted.ensureDeferred
async def test_a_symlink_under_the_snapshot_folder_is_not_followed(gateway, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG\r\n\x1a\n" + b"secret")
    folder = tmp_path / "snapshots"
    os.makedirs(folder / "dev_link", exist_ok=True)
    os.symlink(secret, folder / "dev_link" / "1.png")
    os.symlink(tmp_path, folder / "dev_dir")
    for key in ("dev_link/1.png", "dev_dir/secret.png"):
        status, body = await gateway.call("GET", "/snapshots/" + key)
        assert (status, body["error"]) == (404, "not_found"), key


def test_snapshot_writes_refuse_a_folder_that_resolves_elsewhere(tmp_path):
    from elevgw.snapshots.files import _read_or_none, _write_atomically

    root = tmp_path / "snapshots"
    outside = tmp_path / "outside"
    os.makedirs(root)
    os.makedirs(outside)
    os.symlink(outside, root / "dev_evil")
    with pytest.raises(OSError):
        _write_atomically(str(root / "dev_evil" / "1.png"), b"x", str(root))
    assert os.listdir(outside) == []
    (root / "dev_ok").mkdir()
    _write_atomically(str(root / "dev_ok" / "1.png"), b"x", str(root))
    assert _read_or_none(str(root / "dev_ok" / "1.png"), str(root)) == b"x"
