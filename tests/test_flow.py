"""The README's three-step flow, end to end over real sockets: register, connect, snapshot."""

import base64

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred

from images import tiny_png
from wsclient import connect_device


@pytest_twisted.ensureDeferred
async def test_register_connect_snapshot_and_fetch_the_image(gateway):
    creds = await gateway.register("上海中心01号")
    assert creds["device_id"].startswith("dev_") and creds["token"]
    assert creds["location"] == "上海中心01号"

    device = await connect_device(gateway.ws_port, creds["device_id"], creds["token"])
    pong = await device.request({"type": "heartbeat", "device_id": creds["device_id"]})
    assert pong["type"] == "pong" and isinstance(pong["ts"], int)

    status, listing = await gateway.call("GET", "/api/v1/devices")
    assert status == 200
    [entry] = listing["devices"]
    assert entry["online"] is True and entry["last_seen"] is not None

    snapshot_call = ensureDeferred(
        gateway.call("GET", "/api/v1/devices/remote/{}/snapshot".format(creds["device_id"]))
    )
    command = await device.frame()
    assert command["type"] == "command" and command["payload"] == "snapshot"
    assert command["id"].startswith("cmd_")
    png = tiny_png()
    device.send(
        {
            "type": "snapshot",
            "device_id": creds["device_id"],
            "id": command["id"],
            "payload": base64.b64encode(png).decode(),
        }
    )
    ack = await device.frame()
    assert ack["type"] == "ack" and ack["id"] == command["id"] and ack["url"]

    status, body = await snapshot_call
    assert status == 200, body
    assert body["device_id"] == creds["device_id"]
    assert body["content_type"] == "image/png" and body["size"] == len(png)
    assert body["url"] == ack["url"]

    response = await treq.get(body["url"], reactor=reactor)
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["image/png"]
    assert await response.content() == png
    await device.close()
