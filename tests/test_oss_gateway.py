"""Snapshots through a running gateway onto a local OSS endpoint that checks signatures."""

import time

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.python import usage

from images import tiny_png
from oss_server import FakeOSS
from wsclient import connect_device

BUCKET = "elevgw-gw-test"
KEY_ID = "LTAI5tGatewayKey"
SECRET = "gateway-secret-0123456789"
REGION = "cn-test"


@pytest_twisted.async_yield_fixture
async def oss(monkeypatch):
    server = FakeOSS(BUCKET, KEY_ID, SECRET, REGION)
    url = await server.listen(reactor)
    monkeypatch.setenv("OSS_ENDPOINT", url)
    monkeypatch.setenv("OSS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("OSS_ACCESS_KEY_SECRET", SECRET)
    monkeypatch.setenv("OSS_REGION", REGION)
    yield server
    server.release_hung()
    await server.stop_listening()


async def snapshot_via_api(gateway, device, device_id, timeout=10):
    waiting = ensureDeferred(
        gateway.call(
            "GET", "/api/v1/devices/remote/{}/snapshot?timeout={}".format(device_id, timeout)
        )
    )
    command = await device.frame()
    device.send_binary(tiny_png())
    reply = await device.frame()
    status, body = await waiting
    return command, reply, status, body


@pytest_twisted.ensureDeferred
async def test_snapshot_lands_on_oss_and_the_signed_url_serves_it(oss, gateway_factory):
    gateway = await gateway_factory(snapshots="oss://" + BUCKET)
    creds = await gateway.register()
    device = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    _, reply, status, body = await snapshot_via_api(gateway, device, creds["device_id"])
    assert status == 200, body
    assert reply["type"] == "ack" and reply["url"] == body["url"]
    assert "x-oss-signature=" in body["url"]
    [put] = oss.puts()
    assert (
        "snapshots%2F" + creds["device_id"] in put.uri
        or "/snapshots/" + creds["device_id"] in put.uri
    )
    response = await treq.get(body["url"], reactor=reactor)
    assert response.code == 200
    assert await response.content() == tiny_png()
    await device.close()


@pytest_twisted.ensureDeferred
async def test_oss_refusing_gives_502_an_error_frame_and_the_gateway_lives_on(
    oss, gateway_factory
):
    gateway = await gateway_factory(snapshots="oss://" + BUCKET)
    creds, other_creds = await gateway.register(), await gateway.register("B")
    device = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    other = await connect_device(gateway.ws_port, other_creds["device_id"], other_creds["token"])
    oss.deny_all = True
    command, reply, status, body = await snapshot_via_api(gateway, device, creds["device_id"])
    assert (status, body["error"]) == (502, "snapshot_store_failed")
    assert reply["type"] == "error" and reply["error"] == "snapshot_failed"
    assert (await other.request({"type": "heartbeat"}))["type"] == "pong"
    assert (await device.request({"type": "heartbeat"}))["type"] == "pong"
    oss.deny_all = False
    _, reply, status, body = await snapshot_via_api(gateway, device, creds["device_id"])
    assert status == 200
    await device.close()
    await other.close()


@pytest_twisted.ensureDeferred
async def test_hanging_oss_gives_504_and_heartbeats_keep_flowing(oss, gateway_factory):
    # The other device heartbeats as fast as it is answered: far past a device's rate limit.
    gateway = await gateway_factory(
        snapshots="oss://" + BUCKET, oss_timeout=1.0, message_burst=1_000_000
    )
    creds, other_creds = await gateway.register(), await gateway.register("B")
    device = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    other = await connect_device(gateway.ws_port, other_creds["device_id"], other_creds["token"])
    oss.hang = True
    waiting = ensureDeferred(
        gateway.call("GET", "/api/v1/devices/remote/{}/snapshot".format(creds["device_id"]))
    )
    await device.frame()
    device.send_binary(tiny_png())
    slowest = 0.0
    while not waiting.called:
        started = time.monotonic()
        assert (await other.request({"type": "heartbeat"}))["type"] == "pong"
        slowest = max(slowest, time.monotonic() - started)
    assert slowest < 0.5, slowest
    status, body = await waiting
    assert (status, body["error"]) == (504, "snapshot_store_failed")
    assert (await device.frame())["error"] == "snapshot_failed"
    oss.hang = False
    oss.release_hung()
    await device.close()
    await other.close()


def test_oss_without_keys_is_a_one_line_usage_error(monkeypatch):
    from elevgw.tap import Options

    for name in ("OSS_ENDPOINT", "OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(usage.UsageError) as raised:
        Options().parseOptions(["--snapshots", "oss://my-bucket"])
    assert "OSS_ACCESS_KEY_SECRET" in str(raised.value) and "\n" not in str(raised.value)


def test_oss_options_reach_the_store(monkeypatch):
    from elevgw.tap import Options

    monkeypatch.setenv("OSS_ENDPOINT", "https://oss-cn-shanghai.aliyuncs.com")
    monkeypatch.setenv("OSS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("OSS_ACCESS_KEY_SECRET", "secret")
    monkeypatch.setenv("ELEVGW_OSS_PUBLIC_URLS", "true")
    options = Options()
    options.parseOptions(["--snapshots", "oss://my-bucket", "--oss-url-expiry", "600"])
    settings = options.settings()
    assert settings.oss_public_urls is True and settings.oss_url_expiry == 600
    assert settings.oss_options()["public"] is True
